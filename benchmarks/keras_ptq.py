"""Your own model and post-training calibration (issue 14): a tf_keras MobileNetV2 through the run script, and
--learner ptq against quantization-aware fine-tuning (QAT), on all 10,000 Fashion-MNIST test images.

(a) Fashion-MNIST becomes a 32x32x3 .npz (zero-padded 28 -> 32, the channel repeated; uint8, which the model
rescales itself) and a tf_keras MobileNetV2 (alpha 0.35, weights=None, 10 classes) is saved as .h5; it is
trained in float by `nets/keras_model_run.py --learner full-prec`, then fine-tuned W4A8 (channel buckets)
by `--learner uniform`, each a subprocess of the real run script.
(b) The PTQ table: ResNet-20 (the accuracy table's float checkpoint of seed 0, trained there if missing) and
the Keras model, `--learner ptq` at W8A8 and W4A8 (channel buckets) with each calibrator, against QAT at the
same bits, with each calibration's time against one float training epoch (training images / the logged
images per second).

  .venv/bin/python -m benchmarks.keras_ptq
  .venv/bin/python -m benchmarks.keras_ptq --quick --output /tmp/keras_ptq.json --work_dir /tmp/keras_ptq
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import textwrap

import numpy as np

from benchmarks import accuracy_table, machine, publish, stats

SECTION = "keras_ptq"
DEFAULT_RESULTS = os.path.join(publish.RESULTS_DIR, "keras_ptq.json")
KERAS_SCRIPT = os.path.join(publish.REPO_ROOT, "nets", "keras_model_run.py")
CALIBRATORS = ("max", "percentile", "mse", "entropy")
CHANNEL = ["--uql_use_buckets", "--uql_bucket_type=channel"]
BITS = {"W8A8": ["--uql_weight_bits=8", "--uql_activation_bits=8"] + CHANNEL,
        "W4A8": ["--uql_weight_bits=4", "--uql_activation_bits=8"] + CHANNEL}
MODELS = ("keras", "resnet20")
KERAS_LABEL = "Keras MobileNetV2-0.35"
RESNET_LABEL = "ResNet-20"
IMAGE_SIZE = 32
N_TRAIN = 60000
# Full run: every calibrator at both widths for both models; QAT where the Keras target needs it and for
# ResNet-20 at W4A8 (--qat adds the rest). Quick: each kind of run once, on subsets.
FULL = {"keras_float_epochs": 5.0, "keras_lrn_rate": 0.05, "keras_qat_epochs": 2.0, "resnet_qat_epochs": 1.0,
        "calib_batches": 20, "train_images": None, "test_images": None,
        "common": ["--batch_size=128", "--batch_size_eval=500", "--summ_step=100"],
        "ptq": [(model, bits, calibrator) for model in MODELS for bits in BITS for calibrator in CALIBRATORS],
        "qat": [("keras", "W4A8"), ("resnet20", "W4A8")]}
QUICK = {"keras_float_epochs": 0.25, "keras_lrn_rate": 0.05, "keras_qat_epochs": 0.125, "resnet_qat_epochs": 0.125,
         "calib_batches": 2, "train_images": 1024, "test_images": 200,
         "common": ["--batch_size=32", "--batch_size_eval=100", "--summ_step=4"],
         # Quick (the test suite's time): float and one PTQ row of the Keras model; the other rows are the same
         # run-script calls with other flags or another model (tests/nets/test_keras_model.py fine-tunes one).
         "ptq": [("keras", "W4A8", "entropy")], "qat": []}

# Runs in a subprocess: tf_keras needs TF_USE_LEGACY_KERAS before TensorFlow is imported.
MAKE_MODEL = textwrap.dedent("""
    import os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import tf_keras as K
    K.utils.set_random_seed(int(sys.argv[2]))
    inputs = K.Input((%d, %d, 3))
    # The model owns its preprocessing: uint8 pixels to [-1, 1], as MobileNetV2 expects.
    scaled = K.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    model = K.applications.MobileNetV2(input_tensor=scaled, alpha=0.35, weights=None, classes=10)
    # Keras's MobileNetV2 keeps batch-norm averages with momentum 0.999, made for ImageNet-length training: after
    # the few thousand steps here they still hold ~10%% of their initial values, and evaluation (which uses
    # them) fell to 16%% while the same weights with batch statistics scored 89%%. 0.99 forgets in ~500 steps.
    for layer in model.layers:
        if isinstance(layer, K.layers.BatchNormalization):
            layer.momentum = 0.99
    model.save(sys.argv[1])
    """ % (IMAGE_SIZE, IMAGE_SIZE))


def fmnist_as_rgb32(images):
    """Fashion-MNIST images N x 28 x 28 (uint8) as N x 32 x 32 x 3: zero border of 2, the channel repeated."""
    border = (IMAGE_SIZE - images.shape[1]) // 2
    padded = np.pad(images, ((0, 0), (border, border), (border, border)))
    return np.repeat(padded[..., None], 3, axis=-1)


def write_npz(path, train_images=None, test_images=None, images=fmnist_as_rgb32):
    """A Fashion-MNIST archive from the project's reader (the first N images of each split if given), each split's
    uint8 images passed through `images` (default: the 32x32x3 RGB images this benchmark's models read)."""
    from nets.data import fmnist  # pylint: disable=import-outside-toplevel  (imports TensorFlow)

    data = fmnist.load_fmnist()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    temporary = path + ".tmp.npz"
    np.savez(temporary, x_train=images(data["train_images"][:train_images]),
             y_train=data["train_labels"][:train_images],
             x_test=images(data["test_images"][:test_images]), y_test=data["test_labels"][:test_images])
    os.replace(temporary, path)


def write_keras_model(path, seed=0):
    """Save the untrained MobileNetV2-0.35 as .h5."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    done = subprocess.run([sys.executable, "-c", MAKE_MODEL, path, str(seed)], cwd=publish.REPO_ROOT,
                          capture_output=True, text=True)
    publish.check_run(done, "building the Keras model")


def count_weights(path):
    """Number of stored weight values (trainable or not) in a Keras .h5 file."""
    import h5py  # pylint: disable=import-outside-toplevel  (a tf_keras dependency)

    sizes = []
    with h5py.File(path, "r") as handle:
        handle["model_weights"].visititems(lambda _, item: sizes.append(item.size) if isinstance(
            item, h5py.Dataset) else None)
    return int(sum(sizes))


def epoch_seconds(stdout, learner, train_images):
    """One training epoch in seconds: train_images / the median of the run's logged images per second.

    The first logged window holds the graph's warm-up, so it is left out when there are others.
    """
    pattern = re.compile(r"^%s iter \d+/\d+ .*\| (\d+) img/s" % re.escape(learner))
    rates = [int(m.group(1)) for m in map(pattern.match, stdout.splitlines()) if m and int(m.group(1)) > 0]
    rates = rates[1:] or rates
    return train_images / statistics.median(rates) if rates else None


class Plan:
    """Where each run of one benchmark lives, and the flags every run of a model shares."""

    def __init__(self, work_dir, budget, float_dir, quick):
        self.work_dir, self.budget, self.quick = work_dir, budget, quick
        self.keras_dir = os.path.join(work_dir, "keras")
        # Made once and reused by later runs in the same work_dir, so their float checkpoint stays valid.
        self.model_file = os.path.join(self.keras_dir, "mobilenet_v2_035.h5")
        subsets = "" if budget["train_images"] is None else "_%d_%d" % (budget["train_images"], budget["test_images"])
        self.npz = os.path.join(self.keras_dir, "fmnist32%s.npz" % subsets)
        self.resnet_float = float_dir
        self.resnet_table = accuracy_table.QUICK if quick else accuracy_table.FULL

    def run_dir(self, model, label):
        return os.path.join(self.work_dir, model, accuracy_table.slug(label))

    def float_flags(self, model):
        """Flags defining a model's float checkpoint (the same in every run, or the settings check refuses)."""
        common = list(self.budget["common"])
        if model == "keras":
            return (["--keras_model=%s" % self.model_file, "--data_npz=%s" % self.npz,
                     "--save_path=%s" % os.path.join(self.keras_dir, "float", "model.ckpt"),
                     "--nb_epochs_rat=%s" % self.budget["keras_float_epochs"],
                     "--lrn_rate_init=%s" % self.budget["keras_lrn_rate"], "--seed=0"] + common)
        # The accuracy table's float flags: its float checkpoint is this one.
        return (["--save_path=%s" % os.path.join(self.resnet_float, "model.ckpt"), "--seed=0"]
                + self.resnet_table["float"] + self.resnet_table["common"])

    def train_images(self, model):
        """Training images one epoch of `model` goes through (the Keras archive holds only its subset)."""
        if model == "keras":
            return self.budget["train_images"] or N_TRAIN
        subset = [int(f.split("=")[1]) for f in self.resnet_table["common"] if f.startswith("--train_subset=")]
        return subset[0] if subset else N_TRAIN

    def command(self, model, label, flags):
        """argv of one run of the real run script, its outputs under run_dir(model, label)."""
        out = self.run_dir(model, label)
        start = ([sys.executable, KERAS_SCRIPT] if model == "keras"
                 else [sys.executable, "-m", accuracy_table.RUN_MODULE])
        return start + self.float_flags(model) + ["--log_dir=%s" % os.path.join(out, "logs"),
                                                  "--uql_save_quant_model_path=%s" % os.path.join(out, "model.ckpt")
                                                  ] + flags


def run(argv, what):
    """(seconds, stdout) of one run-script subprocess; a failure stops the benchmark with its stderr."""
    seconds, done = stats.timed(lambda: subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True))
    publish.check_run(done, what)
    return seconds, done.stdout


def train_keras_float(plan):
    """Train the Keras file in float (--learner full-prec); returns its entry (throughput, time)."""
    argv = plan.command("keras", "float", ["--learner=full-prec"])
    seconds, stdout = run(argv, "Keras float training")
    return {"model": "keras", "method": "float", "seconds": seconds, "epochs": plan.budget["keras_float_epochs"],
            "epoch_seconds": epoch_seconds(stdout, "full-prec", plan.train_images("keras"))}


def run_quantized(plan, model, method, bits, calibrator=None):
    """One --learner uniform (QAT) or ptq run from the model's float checkpoint; returns its entry."""
    epochs = plan.budget["keras_qat_epochs" if model == "keras" else "resnet_qat_epochs"]
    if method == "qat":
        label = "qat %s" % bits
        flags = ["--learner=uniform", "--uql_quant_epochs=%s" % epochs, "--uql_lrn_rate_init=0.01"]
    else:
        label = "ptq %s %s" % (bits, calibrator)
        flags = ["--learner=ptq", "--uql_calibrator=%s" % calibrator,
                 "--uql_calib_batches=%d" % plan.budget["calib_batches"]]
    seconds, stdout = run(plan.command(model, label, flags + BITS[bits]), "%s %s" % (model, label))
    results = publish.load_json(os.path.join(plan.run_dir(model, label), "results.json"))
    entry = {"model": model, "method": method, "bits": bits, "accuracy": results["quant_accuracy"],
             "float_accuracy": results["float_accuracy"], "test_examples": results["test_examples"],
             "ratio": results["compression_ratio"], "seconds": seconds}
    if method == "qat":
        entry.update(epochs=epochs, epoch_seconds=epoch_seconds(stdout, "uniform", plan.train_images(model)))
    else:
        entry.update(calibrator=calibrator, calib_seconds=results["calib_seconds"],
                     calib_batches=results["calib_batches"])
    # The first run of a model without a float checkpoint trains it: its float throughput is the epoch to beat.
    float_epoch = epoch_seconds(stdout, "full-prec", plan.train_images(model))
    if float_epoch:
        entry["float_epoch_seconds"] = float_epoch
    return entry


def parse_qat(spec):
    """Extra QAT rows from 'model:bits,...' (e.g. keras:W8A8,resnet20:W8A8)."""
    rows = []
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        model, _, bits = part.partition(":")
        if model not in MODELS or bits not in BITS:
            raise publish.BenchmarkError("--qat=%s is not valid: %r; expected model:bits with model in %s and "
                                         "bits in %s" % (spec, part, ", ".join(MODELS), ", ".join(BITS)))
        rows.append((model, bits))
    return rows


def find(entries, model, method, bits=None, calibrator=None):
    """The entry of (model, method, bits, calibrator), or None."""
    return next((e for e in entries if e["model"] == model and e["method"] == method
                 and e.get("bits") == bits and e.get("calibrator") == calibrator), None)


def float_accuracy(entries, model):
    """The float accuracy every quantized run of `model` reports (the same checkpoint), or None."""
    values = {e["float_accuracy"] for e in entries if e["model"] == model and "float_accuracy" in e}
    if len(values) > 1:
        raise publish.BenchmarkError("the runs of %s report different float accuracies %s; expected one float "
                                     "checkpoint" % (model, sorted(values)))
    return values.pop() if values else None


def float_epoch_seconds(entries, model):
    """(seconds, 'float' or 'qat'): one training epoch of `model`, from float training when this run trained
    its float model, else from its QAT fine-tuning (slower: the quantizer's ops too); (None, None) without."""
    mine = [e for e in entries if e["model"] == model]
    sources = (("float", "epoch_seconds", ("float",)), ("float", "float_epoch_seconds", ("qat", "ptq")),
               ("qat", "epoch_seconds", ("qat",)))
    for source, key, methods in sources:
        timed = [e[key] for e in mine if e["method"] in methods and e.get(key)]
        if timed:
            return timed[0], source
    return None, None


def _pct(value):
    return "-" if value is None else "%.2f" % (100 * value)


def target_lines(entries):
    """The issue's targets on the entries measured."""
    checks = []
    keras_float, qat = float_accuracy(entries, "keras"), find(entries, "keras", "qat", "W4A8")
    if keras_float is not None and qat:
        change = qat["accuracy"] - keras_float
        checks.append(("Keras W4A8 (QAT) within 1 point of its float accuracy", change >= -0.01,
                       "%+.2f" % (100 * change)))
    for model, name in (("resnet20", RESNET_LABEL), ("keras", KERAS_LABEL)):
        rows = [e for e in entries if e["model"] == model and e["method"] == "ptq" and e["bits"] == "W8A8"]
        reference = float_accuracy(entries, model)
        if rows:
            best = max(rows, key=lambda e: e["accuracy"])
            change = best["accuracy"] - reference
            checks.append(("%s: best calibrator at W8A8 within 0.3 point of float" % name, change >= -0.003,
                           "%s, %+.2f" % (best["calibrator"], 100 * change)))
        calibrations = [e for e in entries if e["model"] == model and e["method"] == "ptq"]
        epoch, source = float_epoch_seconds(entries, model)
        if calibrations and epoch:
            slowest = max(calibrations, key=lambda e: e["calib_seconds"])
            checks.append(("%s: calibration over %d batches faster than one training epoch" % (
                name, slowest["calib_batches"]), slowest["calib_seconds"] < epoch,
                "slowest %.1f s (%s %s) vs %.0f s (%s epoch)" % (slowest["calib_seconds"], slowest["calibrator"],
                                                                slowest["bits"], epoch, source)))
    return ["- Target: %s: %s (%s)." % (what, "met" if ok else "**not met**", value) for what, ok, value in checks]


def render(payload, command):
    """The BENCHMARKS.md section of a results payload."""
    entries, budget = payload["entries"], payload["budget"]
    lines = ["## Your own model and post-training calibration (Fashion-MNIST, all 10,000 test images)", "",
             "Command: `%s`" % command, ""]
    lines += machine.machine_lines(payload["machine"], payload["load_before"])
    lines += ["- %s: tf_keras MobileNetV2 (alpha 0.35, weights=None, batch-norm momentum 0.99, %s parameters) saved "
              "as .h5, on Fashion-MNIST made 32x32x3 (zero-padded, channel repeated) as an .npz; float: %s epochs of "
              "`nets/keras_model_run.py "
              "--learner full-prec` (--lrn_rate_init=%s, cosine); QAT: `--learner uniform` for %s epoch(s) "
              "(--uql_lrn_rate_init=0.01). %s: the float checkpoint in %s (the accuracy table's budget, seed 0); QAT "
              "%s epoch(s)."
              % (KERAS_LABEL, payload.get("keras_parameters", "?"), budget["keras_float_epochs"],
                 budget["keras_lrn_rate"], budget["keras_qat_epochs"], RESNET_LABEL,
                 payload.get("resnet_float_dir", "?"), budget["resnet_qat_epochs"]),
              "- Every quantized row: per-channel weights (channel buckets), first and last layers float; PTQ "
              "calibrates activation ranges over %d training batches of %s, no training. Shared flags: %s. A '-' "
              "was not run (more QAT rows: --qat)."
              % (budget["calib_batches"], budget["common"][0].split("=")[1], " ".join(budget["common"])), ""]
    rows = []
    for model, name in (("resnet20", RESNET_LABEL), ("keras", KERAS_LABEL)):
        for bits in BITS:
            ptq = [find(entries, model, "ptq", bits, c) for c in CALIBRATORS]
            qat = find(entries, model, "qat", bits)
            if not any(ptq) and not qat:
                continue
            rows.append([name, bits, _pct(float_accuracy(entries, model))]
                        + [_pct(e["accuracy"]) if e else "-" for e in ptq] + [_pct(qat["accuracy"]) if qat else "-"])
    lines += ["Test accuracy % (PTQ per calibrator; QAT at the same bits):", "",
              publish.markdown_table(["model", "bits", "float"] + ["PTQ %s" % c for c in CALIBRATORS] + ["QAT"],
                                     rows), ""]
    times = []
    for model, name in (("resnet20", RESNET_LABEL), ("keras", KERAS_LABEL)):
        epoch, source = float_epoch_seconds(entries, model)
        for bits in BITS:
            ptq = [find(entries, model, "ptq", bits, c) for c in CALIBRATORS]
            if any(ptq):
                times.append([name, bits] + ["%.1f" % e["calib_seconds"] if e else "-" for e in ptq]
                             + ["%.0f (%s)" % (epoch, source) if epoch else "-"])
    lines += ["Calibration time, seconds (`calib_seconds` of results.json: building the calibration graph, restoring "
              "the float weights, both passes over the batches and the ranges; evaluation excluded):", "",
              publish.markdown_table(["model", "bits"] + list(CALIBRATORS) + ["one training epoch"], times), ""]
    lines += target_lines(entries)
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser, output_help="results file (default %s; none with --quick)"
                          % os.path.relpath(DEFAULT_RESULTS, publish.REPO_ROOT))
    parser.add_argument("--work_dir", default="/tmp/tfquant_keras_ptq", help="data, models, checkpoints and logs")
    parser.add_argument("--float_dir", help="ResNet-20's float checkpoint directory, trained there when it holds "
                        "none (default: the accuracy table's, seed 0; --quick: under --work_dir)")
    parser.add_argument("--keras_float_epochs", type=float, help="float training of the Keras model (default %s)"
                        % FULL["keras_float_epochs"])
    parser.add_argument("--keras_qat_epochs", type=float, help="default %s" % FULL["keras_qat_epochs"])
    parser.add_argument("--resnet_qat_epochs", type=float, help="default %s" % FULL["resnet_qat_epochs"])
    parser.add_argument("--qat", help="more QAT rows, e.g. keras:W8A8,resnet20:W8A8 (default: %s)"
                        % ",".join("%s:%s" % row for row in FULL["qat"]))
    args = parser.parse_args(argv)
    if args.render_json:
        payload = publish.load_full_run(args.render_json)
        publish.write_section(SECTION, render(payload, payload["command"]), args.markdown)
        return payload
    budget = dict(QUICK if args.quick else FULL)
    for name in ("keras_float_epochs", "keras_qat_epochs", "resnet_qat_epochs"):
        if getattr(args, name) is not None:
            if not getattr(args, name) > 0:
                raise publish.BenchmarkError("--%s=%s is not valid; expected a positive number of epochs"
                                             % (name, getattr(args, name)))
            budget[name] = getattr(args, name)
    budget["qat"] = budget["qat"] + [row for row in parse_qat(args.qat) if row not in budget["qat"]]
    output = args.output or (None if args.quick else DEFAULT_RESULTS)
    float_dir = args.float_dir or (os.path.join(args.work_dir, "resnet20", "float") if args.quick else
                                   accuracy_table.float_dir("/tmp/tfquant_accuracy_table", 0))
    plan = Plan(args.work_dir, budget, float_dir, args.quick)
    load_before = publish.start(args)
    if not os.path.exists(plan.npz):
        write_npz(plan.npz, budget["train_images"], budget["test_images"])
    if not os.path.exists(plan.model_file):
        write_keras_model(plan.model_file)
    entries = [train_keras_float(plan)]
    print("keras float: %.0f s, one epoch %s s" % (entries[0]["seconds"], entries[0]["epoch_seconds"]), flush=True)
    runs = [(model, "qat", bits, None) for model, bits in budget["qat"]] + [
        (model, "ptq", bits, calibrator) for model, bits, calibrator in budget["ptq"]]
    for model, method, bits, calibrator in runs:
        entry = run_quantized(plan, model, method, bits, calibrator)
        entries.append(entry)
        print("%-9s %-4s %-5s %-10s %.4f (float %.4f, %.0f s)" % (
            model, method, bits, calibrator or "", entry["accuracy"], entry["float_accuracy"], entry["seconds"]),
            flush=True)
    for model in MODELS:
        float_accuracy(entries, model)  # one float checkpoint per model, or an error
    end_info = machine.machine_info(load=machine.end_load(args.quick))
    payload = {"quick": args.quick, "budget": budget, "machine": end_info, "load_before": load_before,
               "keras_parameters": count_weights(plan.model_file), "command": publish.command_line(),
               "resnet_float_dir": os.path.abspath(float_dir),
               "entries": entries}
    publish.write_json(output, payload)
    if not args.quick:
        publish.publish(SECTION, render(payload, payload["command"]), args.markdown, load_before,
                        payload["machine"]["load_average"], args.allow_busy)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
