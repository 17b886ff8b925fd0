"""The k-bit export table (issue 32): every deployable file of a k-bit model, as a runtime loads and runs it.

Models: ResNet-20 Fashion-MNIST at W4A8 and W2A8 (symmetric channel grids, batch norms folded, every int8
tensor trained; trained by benchmarks.accuracy_table's runner into its --work_dir) and a MatMul-heavy MLP
(784-2048-2048-10, 5.8 M weights, W4 with block buckets of 32, float activations), trained here. Each is
exported with the real CLI (python -m tfquant.export --int8 --onnx); the MLP's float ONNX model is tf2onnx's
conversion of its frozen graph (the same weights as floats). Per file: bytes on disk, bytes over tfquant's
accounted size, the memory its loading and one run add to a fresh process (RSS after minus before, in a
process of its own), median latency at batch 1 and 32 with one thread and with every core, and from
export.json its agreement with the quantized TF graph and its accuracy. Memory and latency are read by
benchmarks.file_measure with the onnxruntime options tfquant checks and recommends (tfquant/export/ort_session.py);
the MLP's two ONNX files are also measured as onnxruntime optimizes them offline (model_ort.onnx,
model_float_ort.onnx: saved by a session with those options, their weights in a .data file beside them that
onnxruntime maps, checked against their sources; a row's bytes count both files).
"""
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from benchmarks import accuracy_table, file_measure, publish

tf1 = tf.compat.v1

# Every layer quantized (--uql_quantize_all_layers): a first or last layer trained float has no integer form, and
# the int8 / k-bit files re-grid it to 8 bits, which moves 7-8 % of its output codes and about 0.3 % of the classes
# off the trained graph's (issue 32's agreement investigation).
SYMMETRIC = ("--uql_use_buckets --uql_bucket_type=channel --uql_weight_scheme=symmetric --uql_fold_batch_norms "
             "--uql_quantize_layer_outputs --uql_activation_bits=8 --uql_quantize_all_layers")
RESNET_ROWS = [accuracy_table.Row("W4A8 ch symmetric all layers", "--uql_weight_bits=4 " + SYMMETRIC),
               accuracy_table.Row("W2A8 ch symmetric all layers", "--uql_weight_bits=2 " + SYMMETRIC)]
MLP_FULL = {"units": (2048, 2048), "steps": 3000, "train_images": 60000, "block": 32}
MLP_QUICK = {"units": (64,), "steps": 30, "train_images": 512, "block": 16}
# Files of an export directory: (file name, what the table calls it, runtime).
FILES = (("model_float.onnx", "ONNX float", "onnx"), ("model.onnx", "ONNX k-bit", "onnx"),
         ("model_float_ort.onnx", "ONNX float, optimized offline, weights mapped", "onnx"),
         ("model_ort.onnx", "ONNX k-bit, optimized offline, weights mapped", "onnx"),
         ("model_float.tflite", "TFLite float", "tflite"), ("model_int8.tflite", "TFLite int8", "tflite"),
         ("model_int4.tflite", "LiteRT INT4", "tflite"))
AGREEMENT_KEYS = {"model.onnx": "onnx", "model_float.tflite": "tflite_float", "model_int8.tflite": "tflite_int8",
                  "model_int4.tflite": "tflite_int4"}

# Initializers of at least this many bytes go to the offline-optimized files' .data file (ort_session).
EXTERNAL_MIN_BYTES = 1024

# Processes per memory reading (medians reported): the float model's RSS reading flips between two values.
MEMORY_PROCESSES_FULL, MEMORY_PROCESSES_QUICK = 5, 1


def measure(kind, path, npz, repeats, memory_processes=MEMORY_PROCESSES_FULL):
    """{rss_added_kb, rss_added_warm_kb, rss_added_lean_kb, heap_added_kb, latency_ms: {...}} of one file
    (benchmarks.file_measure: fresh processes, tfquant's onnxruntime session options)."""
    return file_measure.measure(kind, path, npz, repeats, memory_processes, publish.REPO_ROOT)


def write_offline_optimized(export_dir, images):
    """model_ort.onnx and model_float_ort.onnx: the MLP's two ONNX files as onnxruntime optimizes them with
    tfquant's options (MatMulNBits, FusedGemm), saved once: the offline optimization onnxruntime offers. Their
    initializers of EXTERNAL_MIN_BYTES or more are in `<file>.data` beside them, which onnxruntime maps on loading.

    Returns:
      {written file: {source, top1_agreement, max_abs_logit_diff}}: each run against its source file on `images`.
    """
    from tfquant.export import onnx_check, ort_session  # pylint: disable=import-outside-toplevel
    compared = {}
    for source, target in (("model.onnx", "model_ort.onnx"), ("model_float.onnx", "model_float_ort.onnx")):
        source_path, target_path = os.path.join(export_dir, source), os.path.join(export_dir, target)
        expected = onnx_check.run(ort_session.create(source_path, threads=1, optimized_path=target_path,
                                                     external_min_bytes=EXTERNAL_MIN_BYTES), images)
        logits = onnx_check.run(ort_session.create(target_path, threads=1), images)
        compared[target] = {"source": source,
                            "top1_agreement": float(np.mean(logits.argmax(-1) == expected.argmax(-1))),
                            "max_abs_logit_diff": float(np.max(np.abs(logits - expected)))}
    return compared


def _mlp_forward(units):
    def forward(images, is_training=False):
        del is_training
        x = tf.reshape(images, [-1, 28 * 28])
        for number, width in enumerate(tuple(units) + (10,)):
            with tf1.variable_scope("fc%d" % (number + 1)):
                kernel = tf1.get_variable("weights", [x.shape[-1], width],
                                          initializer=tf1.glorot_uniform_initializer())
                bias = tf1.get_variable("biases", [width], initializer=tf1.zeros_initializer())
                x = tf.nn.bias_add(tf.matmul(x, kernel), bias)
            if number < len(units):
                x = tf.nn.relu(x)
        return x
    return forward


def train_mlp(run_dir, settings, train_images, train_labels):
    """Train the MLP quantization-aware (W4, block buckets, float activations) into a run directory."""
    import tfquant  # pylint: disable=import-outside-toplevel
    from tfquant.export import inference_graph  # pylint: disable=import-outside-toplevel
    forward = _mlp_forward(settings["units"])
    config = tfquant.QuantConfig(weight_bits=4, use_buckets=True, bucket_type="block", weight_scheme="symmetric",
                                 bucket_size=settings["block"], quantize_all_layers=True)
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(0)
        images = tf1.placeholder(tf.float32, [None, 28, 28, 1])
        labels = tf1.placeholder(tf.int64, [None])
        logits = forward(images)
        report = tfquant.quantize_graph(graph, config, is_training=True)
        logits = report.output(logits)
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        train = tf1.train.AdamOptimizer(1e-3).minimize(loss)
        saver = tf1.train.Saver()
        rng = np.random.default_rng(0)
        with tf1.Session(graph=graph) as sess:
            sess.run(tf1.global_variables_initializer())
            for _ in range(settings["steps"]):
                pick = rng.integers(0, len(train_images), 100)
                sess.run(train, {images: train_images[pick], labels: train_labels[pick]})
            saver.save(sess, os.path.join(run_dir, "model.ckpt"), global_step=settings["steps"])
    with open(os.path.join(run_dir, "quant_report.json"), "w") as handle:
        handle.write(report.to_json())
    inference_graph.save_inference_graph(run_dir, forward, [None, 28, 28, 1])


def float_onnx(export_dir):
    """model_float.onnx: tf2onnx's conversion of the export's frozen graph (the quantized weights as floats)."""
    from tfquant.export import onnx_kbit_export  # pylint: disable=import-outside-toplevel
    graph_def = tf1.GraphDef()
    with open(os.path.join(export_dir, "inference.pb"), "rb") as handle:
        graph_def.ParseFromString(handle.read())
    model = onnx_kbit_export._converted(graph_def)  # pylint: disable=protected-access
    with open(os.path.join(export_dir, "model_float.onnx"), "wb") as handle:
        handle.write(model.SerializeToString())


# Files this table writes into an export directory beside the export's own (float_onnx, write_offline_optimized).
OWN_FILES = ("model_float.onnx", "model_ort.onnx", "model_float_ort.onnx")


def remove_own_files(out_dir):
    """Remove what an earlier run of this table added to an export directory (OWN_FILES and their .data files),
    so that the exporter, which replaces only a directory holding an export, takes it again."""
    from tfquant.export import ort_session  # pylint: disable=import-outside-toplevel
    for name in OWN_FILES:
        path = os.path.join(out_dir, name)
        for written in (path, ort_session.external_data_path(path)):
            if os.path.isfile(written) and not os.path.islink(written):
                os.remove(written)


def export(run_dir, out_dir, npz, flags, quick):
    """python -m tfquant.export on a run directory (a previous export there, with this table's own files, is
    replaced); returns its export.json. The exporter's one-line refusal (a directory holding anything else)
    becomes a BenchmarkError."""
    remove_own_files(out_dir)
    argv = [sys.executable, "-m", "tfquant.export", "--checkpoint_dir", run_dir, "--eval_npz", npz,
            "--output_dir", out_dir, "--latency_images=0"] + flags + (["--eval_subset=200"] if quick else [])
    done = subprocess.run(argv, cwd=publish.REPO_ROOT, capture_output=True, text=True)
    publish.check_run(done, "export of %s" % run_dir)
    return publish.load_json(os.path.join(out_dir, "export.json"))


def file_rows(name, out_dir, data, npz, repeats, memory_processes):
    """One table entry per file of an export directory (an offline-optimized file's bytes include its .data)."""
    from tfquant.export import ort_session  # pylint: disable=import-outside-toplevel
    accounted = data["packed"]["total_storage_bits"] / 8.0
    rows = []
    for file_name, label, kind in FILES:
        path = os.path.join(out_dir, file_name)
        if not os.path.exists(path):
            continue
        key = AGREEMENT_KEYS.get(file_name)
        data_path = ort_session.external_data_path(path)
        size = os.path.getsize(path) + (os.path.getsize(data_path) if os.path.exists(data_path) else 0)
        entry = {"model": name, "file": label, "name": file_name, "bytes": size, "over_accounted": size / accounted,
                 "agreement": data.get("agreement_with_quantized_tf", {}).get(key),
                 "disagreements": data.get("disagreements_with_quantized_tf", {}).get(key),
                 "accuracy": data.get("accuracy", {}).get(key)}
        entry.update(measure(kind, path, npz, repeats, memory_processes))
        rows.append(entry)
    return rows


def run(work_dir, quick, seed=0):
    """Train (where missing), export and measure every model; returns the payload."""
    from learners.runner import dataset_arrays  # pylint: disable=import-outside-toplevel
    from nets.convnet_at_fmnist import ModelHelper  # pylint: disable=import-outside-toplevel
    os.makedirs(work_dir, exist_ok=True)
    settings = MLP_QUICK if quick else MLP_FULL
    repeats = 3 if quick else 50
    memory_processes = MEMORY_PROCESSES_QUICK if quick else MEMORY_PROCESSES_FULL
    helper = ModelHelper(batch_size=100, batch_size_eval=200 if quick else 500, eval_subset=200 if quick else None,
                         seed=0)
    x_test, y_test = dataset_arrays(helper, evaluation=True)
    x_train, y_train = dataset_arrays(helper, evaluation=False, limit=settings["train_images"])
    npz = os.path.join(work_dir, "kbit_fmnist.npz")
    np.savez(npz, x_test=x_test, y_test=y_test, x_train=x_train[:200])
    rows, exports = [], {}
    mlp_dir = os.path.join(work_dir, "mlp_w4_block")
    if not os.path.exists(os.path.join(mlp_dir, "quant_report.json")):
        os.makedirs(mlp_dir, exist_ok=True)
        train_mlp(mlp_dir, settings, x_train, y_train)
    out = os.path.join(work_dir, "export_mlp_w4_block")
    exports["MLP W4 block/%d" % settings["block"]] = data = export(mlp_dir, out, npz, ["--onnx"], quick)
    float_onnx(out)
    offline = write_offline_optimized(out, x_test)
    rows += file_rows("MLP W4 block/%d" % settings["block"], out, data, npz, repeats, memory_processes)
    if not quick:
        for row in RESNET_ROWS:
            row_dir = accuracy_table.row_dir(work_dir, row.label, seed)
            if not os.path.exists(os.path.join(row_dir, "quant_report.json")):
                accuracy_table.run_row(work_dir, row, seed, accuracy_table.FULL)
            resnet_npz = os.path.join(work_dir, "fmnist_resnet_test.npz")
            if not os.path.exists(resnet_npz):
                from benchmarks import export_table  # pylint: disable=import-outside-toplevel
                export_table.write_test_npz(resnet_npz)
            out = os.path.join(os.path.dirname(row_dir), "export_kbit_" + accuracy_table.slug(row.label))
            exports[row.label] = data = export(row_dir, out, resnet_npz, ["--int8", "--onnx"], quick)
            rows += file_rows("ResNet-20 " + row.label, out, data, resnet_npz, repeats, memory_processes)
    return {"rows": rows, "offline_optimized": offline,
            "exports": {name: {"onnx": data.get("onnx"), "int4": data.get("int4"), "packed": data["packed"]}
                        for name, data in exports.items()},
            "quick": quick}


def targets(payload):
    """(what, value, limit, met) of issue 32's targets the payload measures."""
    checks = []
    by_model = {}
    for row in payload["rows"]:
        by_model.setdefault(row["model"], {})[row["name"]] = row
    for model, files in by_model.items():
        kbit = files.get("model.onnx")
        if kbit is None:
            continue
        accounted = kbit["bytes"] / kbit["over_accounted"]
        limit = 1.10 * accounted + 16384
        checks.append(("%s: k-bit ONNX bytes <= 1.10 x accounted + 16 KiB" % model, kbit["bytes"], limit,
                       kbit["bytes"] <= limit))
        if kbit["agreement"] is not None:
            checks.append(("%s: k-bit ONNX agreement >= 0.999" % model, kbit["agreement"], 0.999,
                           kbit["agreement"] >= 0.999))
        if "model_float.onnx" in files and model.startswith("MLP"):
            base = files["model_float.onnx"]
            ratio = kbit["latency_ms"]["b1_t1"] / base["latency_ms"]["b1_t1"]
            checks.append(("%s: batch-1 latency (1 thread) <= 0.6 x float ONNX" % model, ratio, 0.6, ratio <= 0.6))
            ratio = kbit["rss_added_kb"] / max(base["rss_added_kb"], 1)
            checks.append(("%s: memory added <= 0.3 x float ONNX's" % model, ratio, 0.3, ratio <= 0.3))
            if "model_ort.onnx" in files and "model_float_ort.onnx" in files:
                ratio = files["model_ort.onnx"]["rss_added_kb"] / max(files["model_float_ort.onnx"]["rss_added_kb"], 1)
                checks.append(("%s: memory added <= 0.3 x float ONNX's, both optimized offline, weights mapped" % model,
                               ratio, 0.3, ratio <= 0.3))
        if "model_int8.tflite" in files and "W4A8" in model:
            for name in ("model.onnx", "model_int4.tflite"):
                if name in files:
                    ratio = files[name]["bytes"] / files["model_int8.tflite"]["bytes"]
                    checks.append(("%s: %s bytes <= 0.6 x int8 file" % (model, name), ratio, 0.6, ratio <= 0.6))
    for model, data in payload["exports"].items():
        weights = (data.get("onnx") or {}).get("weights", {})
        if model.startswith("MLP") and weights:
            fused = sum(bool(w.get("fused")) and w.get("kernel", {}).get("bits") == 4 for w in weights.values())
            checks.append(("%s: MatMuls fused into MatMulNBits(bits=4)" % model, fused, len(weights),
                           fused == len(weights)))
    return checks


def _mb(kb):
    return "-" if kb is None else "%.1f" % (kb / 1024.0)


def memory_lines(payload):
    """The memory readings of the ONNX files (benchmarks.file_measure), each file's against its float file's."""
    rows = [r for r in payload["rows"] if r.get("rss_added_warm_kb") is not None]
    if not rows:
        return []
    floats = {(r["model"], r["name"].replace("model_float", "model")): r for r in rows if "float" in r["name"]}
    keys = ("rss_added_kb", "rss_added_warm_kb", "rss_added_lean_kb", "rss_added_lean_warm_kb", "heap_added_kb")
    table = []
    for row in rows:
        base = floats.get((row["model"], row["name"])) if "float" not in row["name"] else None
        ratios = ["-" if base is None or row[k] is None or not base[k] else "%.2f" % (row[k] / base[k])
                  for k in keys]
        runs = row.get("rss_added_kb_runs") or [row["rss_added_kb"]]
        table.append((row["model"], row["file"], "%s (%s-%s)" % (_mb(row["rss_added_kb"]), _mb(min(runs)),
                                                                  _mb(max(runs))),
                      _mb(row["rss_added_warm_kb"]), _mb(row["rss_added_lean_kb"]),
                      _mb(row["rss_added_lean_warm_kb"]), _mb(row["heap_added_kb"]))
                     + tuple(ratios))
    return ["Memory of the ONNX files (MB; median of %d fresh processes each, onnxruntime with tfquant's session "
            "options, `tfquant/export/ort_session.py`, one thread, batch 1). First session: the issue's reading, "
            "which includes about 9.5 MB that onnxruntime's first session costs any model (a one-Relu model adds "
            "it too: library code paged in, environment, thread pool). After a one-op session: the same with a "
            "one-Relu model loaded and run first. mmap threshold fixed: the first-session reading with "
            "MALLOC_MMAP_THRESHOLD_=131072, so freed loading copies leave the process. Both: the model's own RSS. "
            "Heap in use: the bytes the "
            "session holds in malloc's heap. k-bit / float: each reading of the k-bit file over its float "
            "file's." % len(rows[0].get("rss_added_kb_runs") or [0]), "",
            publish.markdown_table(("model", "file", "first session (min-max)", "after a one-op session",
                                    "mmap threshold fixed", "both", "heap in use", "k-bit / float: first session",
                                    "after one-op", "mmap fixed", "both", "heap"), table)]


def _margins_text(margins, unit):
    """'0: 30, 1: 4' (margin: images) for whole output steps, else the values themselves (the ten largest)."""
    if unit == "output steps" and all(m == round(m) for m in margins):
        counts = {}
        for margin in margins:
            counts[int(round(margin))] = counts.get(int(round(margin)), 0) + 1
        return ", ".join("%d: %d" % (value, count) for value, count in sorted(counts.items()))
    shown = ", ".join("%.3g" % m for m in margins[-10:])
    return shown if len(margins) <= 10 else "... " + shown


def disagreement_lines(payload):
    """Per file that classifies some test image differently from the quantized TF graph: how many, and the TF
    graph's top-1 minus top-2 logit on those images (export.json, disagreements_with_quantized_tf)."""
    lines = []
    for row in payload["rows"]:
        differ = row.get("disagreements")
        if not differ or not differ.get("images") or differ.get("max_tf_margin") is None:
            continue
        unit = differ["margin_unit"]
        listed = "" if len(differ["tf_margins"]) == differ["images"] else " (the %d largest)" % len(
            differ["tf_margins"])
        lines.append("- %s, %s: %d images differ (%d tied); the TF graph's margin on them, in %s%s: %s%s; largest %.4g"
                     % (row["model"], row["file"], differ["images"], differ["tied"], unit,
                        " of %.4g" % differ["output_step"] if differ.get("output_step") else "", listed,
                        _margins_text(differ["tf_margins"], unit), differ["max_tf_margin"]))
    if not lines:
        return []
    return ["Images classified differently from the quantized TF graph, and by how much that graph preferred its "
            "class (its largest logit minus its second largest; 0 is a tie; in whole steps, margin: images):",
            ""] + lines + [""]


def render(payload, command, machine_lines):
    """The BENCHMARKS.md section."""
    table = [(r["model"], r["file"], r["bytes"], "%.2f" % r["over_accounted"], "%.1f" % (r["rss_added_kb"] / 1024.0),
              "%.3f" % r["latency_ms"]["b1_t1"], "%.3f" % r["latency_ms"]["b32_t1"],
              "%.3f" % r["latency_ms"]["b1_tall"], "%.3f" % r["latency_ms"]["b32_tall"],
              "-" if r["agreement"] is None else "%.4f" % r["agreement"],
              "-" if r["accuracy"] is None else "%.2f" % (100 * r["accuracy"])) for r in payload["rows"]]
    lines = ["## k-bit files: sizes, memory, latency, agreement (issue 32)", "",
             "Command: `%s`" % command, ""] + machine_lines + [
        "- Bytes over accounted: the file's size over tfquant's accounted storage (the report's total storage "
        "bits / 8). Memory: RSS a fresh process gains by loading the file and running one image. Latency: median "
        "ms per run of the batch. Agreement: share of test images given the quantized TF graph's class.", "",
        publish.markdown_table(("model", "file", "bytes", "over accounted", "memory added MB", "b1 1 thread",
                                "b32 1 thread", "b1 all cores", "b32 all cores", "agreement", "accuracy %"), table),
        ""] + disagreement_lines(payload) + memory_lines(payload)
    offline = "; ".join("%s: %.4f of classes equal, logits within %.2g" % (name, c["top1_agreement"],
                                                                           c["max_abs_logit_diff"])
                        for name, c in sorted(payload.get("offline_optimized", {}).items()))
    lines += ["", "Files optimized offline against the files they come from (test images): " + offline,
              "", "Targets (issue 32):", "",
              publish.markdown_table(("target", "measured", "limit", "met"),
                                     [(what, "%.4g" % value, "%.4g" % limit, "yes" if met else "**no**")
                                      for what, value, limit, met in targets(payload)])]
    return "\n".join(lines + [""])
