"""Entry point shared by the run scripts: parse flags, pick the learner, turn user errors into one line."""
import sys

import learners

learners.import_tensorflow_quietly()

import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from learners import flags as learner_flags  # noqa: E402
from learners import (analysis, deployment_settings, directory_flags, distributed, layer_analysis,  # noqa: E402
                      run_lock, stopping)
from learners.graphs import dataset_arrays  # noqa: E402  (also the name benchmarks and tests import)
from learners.errors import UserError  # noqa: E402
from learners.full_precision import FullPrecLearner  # noqa: E402
from learners.ptq import PTQLearner  # noqa: E402
from learners.uniform_quant import UniformQuantLearner  # noqa: E402
from tfquant.errors import TfquantError  # noqa: E402
from tfquant.export import run_directory  # noqa: E402

FLAGS = flags.FLAGS


def _parse_flags(argv):
    """absl parsing with one clear line (and exit status 2) for an unknown or malformed flag."""
    try:
        return FLAGS(argv)
    except flags.Error as exc:
        sys.stderr.write("error: %s\n" % str(exc).splitlines()[0])
        sys.exit(2)


def _main(make_helper, after_train, deployment_defaults=False):
    def main(argv):
        if len(argv) > 1:
            raise UserError("unexpected argument %r; expected only --flag=value options" % argv[1])
        settings_notes = []
        if deployment_defaults:
            settings_notes = deployment_settings.apply(FLAGS, learner_flags.validate_flags)
            for note in settings_notes:
                print("note: %s" % note, flush=True)
        learner_flags.validate_flags()
        stopping.install()
        cluster = distributed.cluster_from_environment(FLAGS.collective_timeout_secs)
        if FLAGS.nb_workers > 1 and (cluster is None or cluster.nb_workers != FLAGS.nb_workers):
            raise UserError("--nb_workers=%d is not valid for this process (TF_CONFIG lists %s); expected "
                            "./run_local.sh <run script> --nb_workers N, which starts the workers, or TF_CONFIG on "
                            "every machine" % (FLAGS.nb_workers, cluster.nb_workers if cluster else "no cluster"))
        writes = FLAGS.exec_mode == "train"
        run_lock.set_chief(cluster is None or cluster.is_chief)
        if writes:
            # A directory already there is locked before the data is read, so a second run stops at once.
            run_lock.hold_all(_run_prefixes(FLAGS), create=False)
        helper = make_helper(FLAGS)
        if writes:
            run_lock.hold_all(_run_prefixes(FLAGS))
        if cluster is not None:
            try:
                helper.shard_training_data(cluster.task_index, cluster.nb_workers)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        if FLAGS.learner == "full-prec":
            learner = FullPrecLearner(helper, FLAGS, cluster)
        elif FLAGS.learner == "ptq":
            if cluster is not None:
                raise UserError("--learner=ptq is not valid with several workers; expected one process (calibration "
                                "does not train, so it gains nothing from more workers)")
            learner = PTQLearner(helper, FLAGS, learner_flags.quant_config())
        else:
            learner = UniformQuantLearner(helper, FLAGS, learner_flags.quant_config(), cluster)
        if FLAGS.learner != "full-prec":
            learner.settings_notes = settings_notes
        if FLAGS.exec_mode == "train":
            results = learner.train()
            if after_train is not None and results is not None:
                after_train(helper, FLAGS, results)
        elif cluster is not None and not cluster.is_chief:
            return  # evaluation and export are the chief's
        elif FLAGS.exec_mode == "export":
            for line in export_latest(helper, learner.output_dir, FLAGS):
                print(line)
        elif FLAGS.exec_mode == "analyze":
            for line in layer_analysis.analyze(helper, FLAGS, learner):
                print(line)
        else:
            accuracy, loss, count = learner.evaluate()
            print("%s eval: accuracy %.4f | loss %.4f | %d test images" % (learner.name, accuracy, loss, count))
            if FLAGS.learner != "full-prec":
                print("report: %s" % analysis.record_latest_fidelity(helper, FLAGS, learner))

    def guarded(argv):
        try:
            main(argv)
        except stopping.Stopped as exc:
            sys.stderr.write("%s\n" % exc)
            sys.exit(exc.exit_status)
        except TfquantError as exc:
            if FLAGS.debug:
                raise
            sys.stderr.write("error: %s\n" % exc)
            sys.exit(2)
        except OSError as exc:
            # A file the run writes or reads outside the checked paths (full disk, permissions, read-only).
            if FLAGS.debug:
                raise
            where = exc.filename if exc.filename is not None else "a file"
            sys.stderr.write("error: %s cannot be accessed (%s); expected a readable/writable path with free space\n"
                             % (where, exc.strerror or exc))
            sys.exit(2)
    return guarded


def _run_prefixes(settings):
    """The checkpoint prefixes a training run of the chosen learner may write (the float one first)."""
    return directory_flags.locked_prefixes(settings.learner, "train", settings.save_path,
                                           settings.uql_save_quant_model_path)


def export_latest(helper, checkpoint_dir, settings):
    """Export the latest quantized checkpoint in `checkpoint_dir` and evaluate the files on the helper's test set.

    Args:
      helper: the run script's ModelHelper (its test set, and training images for the ranges training did
        not record).
      checkpoint_dir: the quantized run directory.
      settings: the parsed flags (export_dir, export_int8, export_int8_calibration, export_onnx).
    Returns:
      the lines to print, among them `accuracy <file kind> <value>` for the checkpoint and each file.
    Raises:
      UserError: one line naming what does not fit.
    """
    test_data = dataset_arrays(helper, evaluation=True)
    calibration = None
    if settings.export_int8 or settings.export_onnx:
        calibration = dataset_arrays(helper, evaluation=False, limit=run_directory.CALIBRATION_IMAGES)[0]
    try:
        result = run_directory.export_run_directory(
            checkpoint_dir, settings.export_dir, tflite=settings.export_int8, int8=settings.export_int8,
            int8_calibration=settings.export_int8_calibration, onnx=settings.export_onnx, test_data=test_data,
            calibration_images=calibration, output_name="--export_dir=" + settings.export_dir)
    except TfquantError as exc:
        raise UserError(run_directory.one_line(exc)) from None
    lines = run_directory.summary_lines(result, settings.export_dir)
    return lines[:-1] + _deployment_hint(result) + lines[-1:]  # the details line last


def _deployment_hint(result):
    """The training flags under which the int8 / ONNX files would compute the trained graph, when they do not."""
    untrained = result.get("not_as_trained", {})
    reasons = set(untrained.get("weights", {}))
    config = result.get("config", {})
    flags = []
    if "kept float in training" in reasons:
        flags.append("--uql_quantize_all_layers")
    if reasons - {"kept float in training"} and config.get("weight_range", "minmax") == "minmax":
        flags.append("--uql_weight_scheme=symmetric")
    if untrained.get("calibrated") and config.get("act_range", "ema") == "ema":
        if not config.get("quantize_layer_outputs"):
            flags.append("--uql_quantize_layer_outputs")
        if config.get("activation_bits") == 32:
            flags.append("--uql_activation_bits=8")
    if not flags:
        return []
    return ["hint: train with %s for int8 / ONNX files that compute the trained graph" % " ".join(flags)]


def run(make_helper, after_train=None, deployment_defaults=False):
    """Run the job: make_helper(FLAGS) builds the ModelHelper from the parsed flags.

    after_train: optional function (helper, FLAGS, what learner.train() returned) run after training.
    deployment_defaults: train quantized runs with the int8 runtimes' settings where the command line leaves them
      unset (learners.deployment_settings; nets/model_file_run.py).
    """
    # Saver's "Restoring parameters" INFO lines would interleave with the progress lines.
    tf.get_logger().setLevel("WARNING")
    learner_flags.define_flags()
    app.run(_main(make_helper, after_train, deployment_defaults), flags_parser=_parse_flags)
