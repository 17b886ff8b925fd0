"""Your own model file, any format (issue 33's target on our own stand-ins): models written in plain Keras 3 /
TensorFlow code, each trained in float on Fashion-MNIST, through `nets/model_file_run.py` with --learner
uniform (W4A8, quantization-aware fine-tuning) and --learner ptq (W8A8, calibration only), both trained for
deployment (symmetric per-channel weights, and every tensor an int8 model holds quantized in training:
--uql_weight_scheme=symmetric --uql_quantize_layer_outputs), each run exported to int8 TFLite and ONNX. Every
accuracy is compared with the file's own float accuracy (target: at most 1 point below it), and every exported
file's top-1 with the quantized TF graph's (export.json's agreement_with_quantized_tf; target: the same class on
>= 99.5 % of the test images: an exported file that disagrees with the trained model is a wrong result).
Each training run also writes --save_model (the file's own format), reloaded in plain Keras 3 / TensorFlow in
another process: its top-1 must equal the quantized model's (the export's frozen graph) on >= 99.9 % of the
test images.

Stand-ins (benchmarks.model_file_stand_ins): conv + batch norm + dense (.keras), a depthwise model (Keras 3
model.export SavedModel), an attention model (MultiHeadAttention + gelu MLP, .keras), a tf.Module SavedModel, a TF1
frozen graph (.pb) and a Keras 3 conv + batch norm + dense model frozen the TF2 way (convert_variables_to_constants_v2:
unfused batch norm, names found by the run script).

  .venv/bin/python -m benchmarks.model_files
  .venv/bin/python -m benchmarks.model_files --quick --models=attention --output /tmp/mf.json --work_dir /tmp/mf

The full run (6 stand-ins x 2 learners on all 60,000 / 10,000 images, each run trained, exported and its
saved model reloaded) is estimated at 30-60 minutes on a quiet 2-core machine (extrapolated from --quick runs
under load, not measured). --quick trains the stand-ins on 512 images only, so their accuracies are near chance
and its target checks say nothing about accuracy; it checks that every step runs.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import numpy as np

from benchmarks import keras_ptq, machine, publish, stats
from benchmarks.model_file_stand_ins import FILES, SAVED

SECTION = "model_files"
RUN_SCRIPT = os.path.join(publish.REPO_ROOT, "nets", "model_file_run.py")
LEARNERS = {"uniform": ("W4A8", ["--learner=uniform", "--uql_weight_bits=4", "--uql_activation_bits=8"]),
            "ptq": ("W8A8", ["--learner=ptq", "--uql_weight_bits=8", "--uql_activation_bits=8"])}
# Trained for deployment: the int8 files then hold the trained weight grids and ranges, nothing calibrated or
# rounded again (without these the files re-rounded asymmetric weights and calibrated the input, the outputs
# before a batch norm and the logits, and lost up to 1.5 points against the quantized graph).
# nets/model_file_run.py sets both itself where the command line leaves them unset; given here so the records say so.
DEPLOYABLE = ["--uql_weight_scheme=symmetric", "--uql_quantize_layer_outputs"]
LABELS = {"conv_bn": "conv + BN + dense (.keras)", "depthwise": "depthwise (Keras 3 export)",
          "attention": "attention (.keras)", "module": "tf.Module SavedModel", "frozen": "frozen graph (.pb)",
          "frozen_v2": "conv + BN + dense frozen by TF2 (.pb)"}
EXPORTED = ("tflite_int8", "onnx")
TOLERANCE = 0.01  # one point of accuracy
AGREEMENT = 0.995  # each exported file's top-1 equals the quantized TF graph's on this share of images
RELOAD_AGREEMENT = 0.999  # the reloaded --save_model's top-1 equals the quantized model's on this share of images
FULL = {"float_epochs": 3, "quant_epochs": 1.0, "calib_batches": 20, "train_images": None, "test_images": None,
        "common": ["--batch_size=128", "--batch_size_eval=500", "--summ_step=100"]}
QUICK = {"float_epochs": 3, "quant_epochs": 0.25, "calib_batches": 2, "train_images": 512, "test_images": 200,
         "common": ["--batch_size=32", "--batch_size_eval=100", "--summ_step=4"]}


def _scaled(images):
    """uint8 N x 28 x 28 images as float32 N x 28 x 28 x 1 in [0, 1] (the stand-ins have no preprocessing layer)."""
    return (images[..., None] / 255.0).astype(np.float32)


def write_npz(path, train_images=None, test_images=None):
    """Fashion-MNIST as an .npz of 28x28x1 float32 in [0, 1] (the first N images of each split if given)."""
    keras_ptq.write_npz(path, train_images, test_images, images=_scaled)


def run(argv, cwd, what):
    """(seconds, stdout) of one subprocess; a failure stops the benchmark with its stderr."""
    os.makedirs(cwd, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=publish.REPO_ROOT)
    env.pop("TF_USE_LEGACY_KERAS", None)
    seconds, done = stats.timed(lambda: subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True))
    publish.check_run(done, what)
    return seconds, done.stdout


def build_models(plan, names):
    """Train and write the stand-ins not yet in the work directory; returns {name: the file's own accuracy}."""
    missing = [n for n in names if not os.path.exists(os.path.join(plan.models_dir, n + ".float.json"))]
    if missing:
        os.makedirs(plan.models_dir, exist_ok=True)
        run([sys.executable, "-m", "benchmarks.model_file_stand_ins", plan.npz, plan.models_dir,
             str(plan.budget["float_epochs"])] + missing, publish.REPO_ROOT, "training the stand-ins %s" % missing)
    return {n: publish.load_json(os.path.join(plan.models_dir, n + ".float.json"))["file_accuracy"] for n in names}


class Plan:
    """Where the data, the model files and each run live."""

    def __init__(self, work_dir, budget):
        self.work_dir, self.budget = work_dir, budget
        subsets = "" if budget["train_images"] is None else "_%d_%d" % (budget["train_images"], budget["test_images"])
        self.npz = os.path.join(work_dir, "fmnist%s.npz" % subsets)
        self.models_dir = os.path.join(work_dir, "models%s_e%s" % (subsets, budget["float_epochs"]))

    def run_dir(self, model, learner):
        return os.path.join(self.work_dir, "runs", "%s_%s" % (model, learner))

    def flags(self, model, learner):
        """The run script's flags of one (model, learner) run (the export repeats them)."""
        name, extra = FILES[model]
        _, learner_flags = LEARNERS[learner]
        budget = self.budget
        schedule = (["--uql_quant_epochs=%s" % budget["quant_epochs"]] if learner == "uniform"
                    else ["--uql_calib_batches=%d" % budget["calib_batches"]])
        return ([sys.executable, RUN_SCRIPT, "--model=%s" % os.path.join(self.models_dir, name),
                 "--data_npz=%s" % self.npz, "--uql_quantize_all_layers"] + extra + learner_flags + DEPLOYABLE
                + schedule + budget["common"])


def run_model(plan, model, learner, file_accuracy):
    """Quantize one model with one learner, export it to int8 TFLite and ONNX; returns its entry."""
    cwd = plan.run_dir(model, learner)
    saved = os.path.join(cwd, SAVED[model])
    for stale in (saved, saved + ".quant_report.json"):  # a rerun's SavedModel directory would be refused
        if os.path.isdir(stale):
            shutil.rmtree(stale)
        elif os.path.exists(stale):
            os.remove(stale)
    seconds, _ = run(plan.flags(model, learner) + ["--save_model=%s" % saved], cwd, "%s %s" % (model, learner))
    results = publish.load_json(os.path.join(cwd, "models_uql", "results.json"))
    export_seconds, _ = run(plan.flags(model, learner) + ["--exec_mode=export", "--export_dir=export",
                                                          "--export_int8", "--export_onnx"],
                            cwd, "exporting %s %s" % (model, learner))
    exported = publish.load_json(os.path.join(cwd, "export", "export.json"))
    _, printed = run([sys.executable, "-m", "benchmarks.model_file_stand_ins", "--reload", model, saved, plan.npz,
                      os.path.join(cwd, "export", "inference.pb")], publish.REPO_ROOT,
                     "reloading %s %s's --save_model" % (model, learner))
    reloaded = json.loads(printed.strip().splitlines()[-1])
    entry = {"model": model, "learner": learner, "bits": LEARNERS[learner][0], "file_accuracy": file_accuracy,
             "float_accuracy": results["float_accuracy"], "quantized": results["quant_accuracy"],
             "test_examples": results["test_examples"], "seconds": seconds, "export_seconds": export_seconds,
             "agreement_with_quantized_tf": exported.get("agreement_with_quantized_tf", {}),
             "reload_agreement": reloaded["agreement"], "reload_accuracy": reloaded["accuracy"]}
    for kind in EXPORTED:
        entry[kind] = exported["accuracy"].get(kind)
    return entry


def within(entry, key):
    """Whether entry[key] loses at most one point of the file's own float accuracy (None: not measured); a
    quantized model more accurate than an under-trained file (fine-tuning trains it further) meets the target."""
    value = entry.get(key)
    return None if value is None else value >= entry["file_accuracy"] - TOLERANCE


def checks(entry):
    """{check name: True/False/None} of the issue's targets for one entry (None: not measured)."""
    found = {key: within(entry, key) for key in ("quantized",) + EXPORTED}
    for kind in EXPORTED:
        agreement = entry.get("agreement_with_quantized_tf", {}).get(kind)
        found["agreement_" + kind] = None if agreement is None else agreement >= AGREEMENT
    agreement = entry.get("reload_agreement")
    found["reload"] = None if agreement is None else agreement >= RELOAD_AGREEMENT
    return found


def met(entry):
    """Whether every target of the entry was measured and met."""
    return all(value is True for value in checks(entry).values())


def _pct(value):
    return "-" if value is None else "%.2f" % (100 * value)


def _agreement(entry, kind):
    return _pct(entry.get("agreement_with_quantized_tf", {}).get(kind))


def render(payload, command):
    """The BENCHMARKS.md section of a results payload."""
    entries, budget = payload["entries"], payload["budget"]
    lines = ["## Your own model file: Keras 3, SavedModel, frozen graph (Fashion-MNIST)", "",
             "Command: `%s`" % command, ""]
    lines += machine.machine_lines(payload["machine"], payload["load_before"])
    lines += ["- Stand-ins written by plain Keras 3 / TensorFlow code (benchmarks/model_file_stand_ins.py), each "
              "trained in float for %s epoch(s) of Adam; `nets/model_file_run.py --uql_quantize_all_layers %s`: "
              "uniform W4A8 for %s epoch(s), ptq W8A8 over %d batches; each run exported with `--export_int8 "
              "--export_onnx`. Shared flags: %s. Test images: %s."
              % (budget["float_epochs"], " ".join(budget.get("deployable", DEPLOYABLE)), budget["quant_epochs"],
                 budget["calib_batches"], " ".join(budget["common"]),
                 entries[0]["test_examples"] if entries else "-"),
              "- 'file' is the model file's own accuracy (Keras / TensorFlow on the test images); 'float' the run "
              "script's evaluation of the imported file; 'reloaded' the --save_model output reloaded in plain Keras "
              "3 / TensorFlow, 'same top-1' its agreement with the quantized model; 'TFLite =' and 'ONNX =' the share "
              "of test images each exported file gives the quantized TF graph's class (export.json); 'ok' = quantized, "
              "TFLite int8 and ONNX all at most 1 point below 'file', both files >= %.1f %% '=' and same top-1 >= "
              "%.1f %%." % (100 * AGREEMENT, 100 * RELOAD_AGREEMENT), ""]
    rows = []
    for entry in entries:
        rows.append([LABELS[entry["model"]], "%s %s" % (entry["learner"], entry["bits"]), _pct(entry["file_accuracy"]),
                     _pct(entry["float_accuracy"]), _pct(entry["quantized"]), _pct(entry["tflite_int8"]),
                     _pct(entry["onnx"]), _agreement(entry, "tflite_int8"), _agreement(entry, "onnx"),
                     _pct(entry.get("reload_accuracy")), _pct(entry.get("reload_agreement")),
                     "yes" if met(entry) else "**no**"])
    lines += ["Test accuracy %:", "",
              publish.markdown_table(["model", "learner", "file", "float", "quantized", "TFLite int8", "ONNX",
                                      "TFLite =", "ONNX =", "reloaded", "same top-1", "ok"], rows), ""]
    accurate = sum(all(checks(e)[k] for k in ("quantized",) + EXPORTED) for e in entries)
    reloads = sum(bool(checks(e)["reload"]) for e in entries)
    agreeing = sum(all(checks(e)["agreement_" + k] for k in EXPORTED) for e in entries)
    lines.append("- Target: every model and learner at most 1 point below the file's float accuracy in the quantized "
                 "graph, TFLite int8 and ONNX: %s (%d of %d)." % (
                     "met" if accurate == len(entries) else "**not met**", accurate, len(entries)))
    lines.append("- Target: every TFLite int8 and ONNX file gives the quantized TF graph's class on >= %.1f %% of the "
                 "test images: %s (%d of %d)." % (100 * AGREEMENT, "met" if agreeing == len(entries) else "**not met**",
                                                  agreeing, len(entries)))
    lines.append("- Target: the saved model reloaded in plain Keras 3 / TensorFlow gives the quantized model's top-1 "
                 "on >= %.1f %% of the test images: %s (%d of %d)." % (
                     100 * RELOAD_AGREEMENT, "met" if reloads == len(entries) else "**not met**", reloads,
                     len(entries)))
    return "\n".join(lines)


def _names(spec, known, flag):
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if not names or unknown:
        raise publish.BenchmarkError("--%s=%s is not valid; expected a comma-separated list of %s"
                                     % (flag, spec, ", ".join(known)))
    return names


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_arguments(parser, output_help="results file (default benchmarks/results/%s.json; none with "
                          "--quick)" % SECTION)
    parser.add_argument("--work_dir", default="/tmp/tfquant_model_files", help="data, model files and runs")
    parser.add_argument("--models", default=",".join(FILES), help="stand-ins to run (default all)")
    parser.add_argument("--learners", default=",".join(LEARNERS), help="default uniform,ptq")
    args = parser.parse_args(argv)
    if args.render_json:
        payload = publish.load_full_run(args.render_json)
        publish.write_section(SECTION, render(payload, payload["command"]), args.markdown)
        return payload
    models = _names(args.models, list(FILES), "models")
    learners = _names(args.learners, list(LEARNERS), "learners")
    budget = dict(QUICK if args.quick else FULL, deployable=DEPLOYABLE)
    plan = Plan(args.work_dir, budget)
    load_before = publish.start(args)
    if not os.path.exists(plan.npz):
        write_npz(plan.npz, budget["train_images"], budget["test_images"])
    file_accuracies = build_models(plan, models)
    entries = []
    for model in models:
        for learner in learners:
            entry = run_model(plan, model, learner, file_accuracies[model])
            entry["checks"] = checks(entry)
            entries.append(entry)
            print("%-10s %-8s file %.4f quantized %.4f tflite_int8 %s (= %s) onnx %s (= %s) reloaded %s same top-1 "
                  "%s: %s "
                  "(%.0f s + %.0f s export)" % (
                      model, learner, entry["file_accuracy"], entry["quantized"], _pct(entry["tflite_int8"]),
                      _agreement(entry, "tflite_int8"), _pct(entry["onnx"]), _agreement(entry, "onnx"),
                      _pct(entry["reload_accuracy"]), _pct(entry["reload_agreement"]),
                      "targets met" if met(entry) else "NOT MET (%s)" % ", ".join(
                          k for k, v in checks(entry).items() if v is not True),
                      entry["seconds"], entry["export_seconds"]), flush=True)
    end_info = machine.machine_info(load=machine.end_load(args.quick))
    payload = {"quick": args.quick, "budget": budget, "machine": end_info, "load_before": load_before,
               "command": publish.command_line(), "entries": entries,
               "targets_met": bool(entries) and all(met(entry) for entry in entries)}
    publish.write_json(publish.results_path(args, SECTION), payload)
    if not args.quick:
        publish.publish(SECTION, render(payload, payload["command"]), args.markdown, load_before,
                        payload["machine"]["load_average"], args.allow_busy)
    return payload


if __name__ == "__main__":
    publish.run_main(main)
