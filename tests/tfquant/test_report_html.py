"""quant_report.html, `python -m tfquant.report`, the report's fidelity entry and the layer switches.

A tiny graph (conv -> ReLU -> dense, 4-bit channel-bucket weights, 8-bit activations) is quantized, switched
and measured by tfquant alone; its report, with a bit allocation, results and an analysis beside it, is
rendered and the page parsed back: every number on it must be the JSON's.
"""
import copy
import html.parser
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfquant
from tfquant import fidelity, layer_switches, report_cli, report_html
from tfquant.report import ReportError, read_report
from tfquant.report_schema import layer_layout
from tests.tfquant import reference

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
tf1 = tf.compat.v1


def _measured_report():
    """(report dict with fidelity, float logits, quantized logits, the switched layers' names)."""
    rng = np.random.RandomState(0)
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [None, 8, 8, 1])
        kernel = tf1.get_variable("conv/kernel", initializer=rng.randn(3, 3, 1, 4).astype(np.float32))
        hidden = tf.nn.relu(tf.nn.conv2d(images, kernel, 1, "SAME"))
        dense = tf1.get_variable("fc/kernel", initializer=rng.randn(256, 3).astype(np.float32) * 0.1)
        logits = tf.matmul(tf.reshape(hidden, [-1, 256]), dense)
        config = tfquant.QuantConfig(weight_bits=4, activation_bits=8, quantize_all_layers=True,
                                     use_buckets=True, bucket_type="channel")
        report = tfquant.quantize_graph(graph, config, is_training=False)
        switches, (output,) = layer_switches.insert_switches(graph, report, [report.output(logits)])
        data = rng.rand(20, 8, 8, 1).astype(np.float32)
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            layouts = {layer.name: layer_layout(layer) for layer in report.weight_layers if layer.quantized}
            measured = fidelity.measure(sess, switches, [{images: data[:10]}, {images: data[10:]}], output, layouts)
            float_logits = sess.run(output, {images: data, **layer_switches.switch_feed(switches, [])})
            # Ranges never recorded: the activation takes each batch's own range, so run the same two batches.
            quant_logits = np.concatenate([sess.run(output, {images: data[:10]}),
                                           sess.run(output, {images: data[10:]})])
            only_fc = sess.run(output, {images: data, **layer_switches.switch_feed(switches, ["MatMul"])})
            weights = sess.run([kernel, dense])
    report.fidelity = dict(measured, examples=20, batches=2)
    return json.loads(report.to_json()), (data, weights, float_logits, quant_logits, only_fc)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("run")
    report, arrays = _measured_report()
    report["allocation"] = {"search_seconds": 1.5, "weight": {
        "equivalent_bits": 4, "mean_bits": 3.5, "budget_bits": 100, "used_bits": 90,
        "layers": [{"name": "conv/kernel", "ops": ["Conv2D"], "size": 36, "bits": 4,
                    "sensitivity": {"2": 0.5, "3": 0.125, "4": 0.03125}, "measured": {"2": 0.5}}]}}
    (directory / "quant_report.json").write_text(json.dumps(report))
    (directory / "results.json").write_text(json.dumps({"model": "tiny", "dataset": "random", "float_accuracy": 0.75,
                                                         "quant_accuracy": 0.6875, "test_examples": 16}))
    (directory / "analysis.json").write_text(json.dumps({
        "examples": 16, "float_accuracy": 0.75, "quantized_accuracy": 0.6875, "quantized_loss": 0.9375,
        "ranked_by": "loss_recovery_at_override", "layers": [
            {"name": "Conv2D", "kind": "weight", "bits": 4, "weight_variable": "conv/kernel",
             "accuracy_alone_quantized": 0.7, "accuracy_all_but_this_quantized": 0.74, "recovery_if_float": 0.0525,
             "drop_alone": 0.05, "override_bits": 8, "accuracy_at_override": 0.72, "recovery_at_override": 0.0325,
             "loss_recovery_at_override": 0.1875, "override": "--uql_weight_overrides 'conv/kernel=8'"}]}))
    assert report_cli.main([str(directory)]) == 0
    return directory, arrays


class _Numbers(html.parser.HTMLParser):
    """(data-key, text) of every element carrying a data-key."""

    def __init__(self):
        super().__init__()
        self.found, self.open = [], []

    def handle_starttag(self, tag, attrs):
        key = dict(attrs).get("data-key")
        self.open.append((tag, key, []))

    def handle_endtag(self, tag):
        while self.open:
            open_tag, key, text = self.open.pop()
            if key is not None:
                self.found.append((key, "".join(text)))
            if open_tag == tag:
                break

    def handle_data(self, data):
        for _, _, text in self.open:
            text.append(data)


def _resolve(sources, key):
    value = sources
    for part in key.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def test_fidelity_of_the_tiny_graph_matches_numpy(run_dir):
    _, (data, (kernel, dense), float_logits, quant_logits, only_fc) = run_dir
    report = json.loads((run_dir[0] / "quant_report.json").read_text())
    by_name = {entry["name"]: entry for entry in report["fidelity"]["layers"]}
    q_kernel = reference.quantize_np(kernel, 4, "channel", (3,))
    expected = 10 * np.log10(np.sum(kernel.astype(np.float64) ** 2) / np.sum((kernel - q_kernel) ** 2.0))
    assert by_name["Conv2D"]["sqnr_db"] == pytest.approx(expected, rel=1e-4)
    assert by_name["Conv2D"]["levels_group"] is not None and len(by_name["Conv2D"]["levels"]) <= 16
    # The float network is the plain NumPy forward pass (every switch off).
    hidden = np.maximum(0, tf.nn.conv2d(data, kernel, 1, "SAME").numpy()).reshape(-1, 256)
    np.testing.assert_allclose(float_logits, hidden @ dense, rtol=1e-4, atol=1e-5)
    # Only the dense layer quantized: float hidden values times its NumPy-quantized weights.
    np.testing.assert_allclose(only_fc, hidden @ reference.quantize_np(dense, 4, "channel", (1,)), rtol=1e-4,
                               atol=1e-5)
    output = report["fidelity"]["output"]
    assert output["sqnr_db"] == pytest.approx(
        10 * np.log10(np.sum(float_logits.astype(np.float64) ** 2) / np.sum((float_logits - quant_logits) ** 2.0)),
        rel=1e-4)
    assert output["top1_agreement"] == pytest.approx(np.mean(float_logits.argmax(1) == quant_logits.argmax(1)))


def test_every_number_on_the_page_is_the_json_s(run_dir):
    directory, _ = run_dir
    page = (directory / "quant_report.html").read_text()
    sources = {"report": json.loads((directory / "quant_report.json").read_text()),
               "results": json.loads((directory / "results.json").read_text()),
               "analysis": json.loads((directory / "analysis.json").read_text())}
    parser = _Numbers()
    parser.feed(page)
    keys = {}
    for key, text in parser.found:
        value = _resolve(sources, key)
        assert value is not None or text == "–", key
        if value is not None:
            assert float(text) == value, (key, text, value)
        keys[key] = text
    # Everything measured is on the page: each layer's fidelity, every histogram bin, the sensitivity curve,
    # the analysis and the accuracies.
    for j, entry in enumerate(sources["report"]["fidelity"]["layers"]):
        for field in ("sqnr_db", "rmse_over_step", "clipped_fraction", "output_sqnr_db", "range_used.0",
                      "range_used.1", "observed.0", "observed.1"):
            assert "report.fidelity.layers.%d.%s" % (j, field) in keys
        for b in range(len(entry["histogram"]["counts"])):
            assert "report.fidelity.layers.%d.histogram.counts.%d" % (j, b) in keys
    for bits in (2, 3, 4):
        assert "report.allocation.weight.layers.0.sensitivity.%d" % bits in keys
    for key in ("results.float_accuracy", "results.quant_accuracy", "report.summary.compression_ratio",
                "analysis.layers.0.accuracy_all_but_this_quantized", "analysis.layers.0.recovery_if_float",
                "analysis.quantized_loss", "analysis.layers.0.override_bits", "analysis.layers.0.accuracy_at_override",
                "analysis.layers.0.recovery_at_override", "analysis.layers.0.loss_recovery_at_override"):
        assert key in keys
    assert "loss removed at override" in page and "Ranked by the loss the suggested override removes" in page
    assert "conv/kernel=8" in page
    # Self-contained: no script, no link, no address; histograms collapsed.
    assert "http" not in page and "<script" not in page and "src=" not in page and "<link" not in page
    assert page.count("<details>") == len(sources["report"]["fidelity"]["layers"]) and "<details open" not in page
    assert len(page.encode("utf-8")) < 200_000


def test_old_reports_still_read_and_bad_fidelity_is_refused(run_dir, tmp_path):
    data = json.loads((run_dir[0] / "quant_report.json").read_text())
    old = copy.deepcopy(data)
    old["version"] = 1
    del old["fidelity"], old["allocation"]
    path = tmp_path / "quant_report.json"
    path.write_text(json.dumps(old))
    report = read_report(str(path))
    assert report.fidelity is None and json.loads(report.to_json())["version"] == 2
    assert "<h2>Layers</h2>" in report_html.render(report.to_dict())
    for change, fragment in ((lambda d: d["fidelity"]["layers"][0].update(name="elsewhere"), "layers[0].name"),
                             (lambda d: d["fidelity"]["layers"][0].update(sqnr_db="high"), "layers[0].sqnr_db"),
                             (lambda d: d["fidelity"].update(extra=1), "fidelity."),
                             (lambda d: d["fidelity"]["layers"][1]["histogram"].update(counts=[-1]), "histogram")):
        bad = copy.deepcopy(data)
        change(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(ReportError, match=fragment.replace("[", r"\[").replace("]", r"\]")):
            read_report(str(path))


def test_two_runs_compared_layer_by_layer(run_dir, tmp_path, capsys):
    directory, _ = run_dir
    other = tmp_path / "other"
    other.mkdir()
    report = json.loads((directory / "quant_report.json").read_text())
    report["fidelity"]["layers"][0]["sqnr_db"] = 30.0
    (other / "quant_report.json").write_text(json.dumps(report))
    results = json.loads((directory / "results.json").read_text())
    (other / "results.json").write_text(json.dumps(dict(results, quant_accuracy=0.75)))
    analysis = json.loads((directory / "analysis.json").read_text())
    analysis["layers"][0]["loss_recovery_at_override"] = 0.0625
    (other / "analysis.json").write_text(json.dumps(analysis))
    assert report_cli.main([str(directory), str(other)]) == 0
    out = capsys.readouterr().out
    first = json.loads((directory / "quant_report.json").read_text())["fidelity"]["layers"][0]["sqnr_db"]
    assert "quant_accuracy   0.6875 -> 0.75 (+0.0625)" in out
    assert any(line.startswith("layer") and line.endswith("loss removed at override") for line in out.splitlines())
    assert "0.0525 -> 0.0525 (+0)  0.1875 -> 0.0625 (-0.125)" in out  # gain if float, loss removed at override
    assert "%s -> 30.0 (%+.4g)" % (report_html.number_text(first), 30.0 - first) in out
    assert (other / "quant_report.html").exists()


def test_module_command_refuses_a_bad_directory_in_one_line(tmp_path):
    # One process (TensorFlow's import is most of its time): exit 2, one `error:` line, no runpy warning about
    # tfquant.report running as __main__ after the package imported it.
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run([sys.executable, "-m", "tfquant.report", str(tmp_path / "missing")], capture_output=True,
                          text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and done.stderr.startswith("error: ")
    assert "quant_report.json" in done.stderr and done.stdout == ""


def test_numpy_helpers():
    assert fidelity.grid_step([0.0, 0.5, 1.5, 1.0]) == 0.5 and fidelity.grid_step([2.0]) is None
    # A 3x3 kernel at 8 bits skips levels: its smallest gap is several steps, the bits give the step back.
    step = 2.0 / 255
    used = np.array([0, 3, 7, 100, 180, 255]) * step - 1.0
    assert fidelity.grid_step(used) == pytest.approx(3 * step)
    assert fidelity.grid_step(used, bits=8) == pytest.approx(step)
    x = np.array([0.0, 0.1, 1.0, 3.0])
    q = np.array([0.0, 0.0, 1.0, 2.0])
    stats = fidelity.TensorStats()
    stats.add(x, q, 1.0)
    record = stats.record()
    # Only 3.0 is more than half a step from its level (clipped at 2).
    assert record["clipped_fraction"] == 0.25
    assert record["sqnr_db"] == pytest.approx(10 * np.log10(10.01 / 1.01), rel=1e-5)
    assert record["rmse_over_step"] == pytest.approx(np.sqrt(1.01 / 4), rel=1e-5)
    w = np.arange(24.0).reshape(2, 3, 4)
    rows = fidelity.group_rows(w, tfquant.GroupLayout("channel", channel_axes=(2,)))
    assert [list(r) for r in rows] == [list(w[..., c].reshape(-1)) for c in range(4)]
    assert [list(r) for r in fidelity.group_rows(w, tfquant.GroupLayout("split", bucket_size=10))] == \
        [list(range(0, 10)), list(range(10, 20)), list(range(20, 24))]


def test_malformed_analysis_file_is_one_error_line(run_dir, tmp_path, capsys):
    directory, _ = run_dir
    for name in ("quant_report.json", "results.json"):
        (tmp_path / name).write_text((directory / name).read_text())
    (tmp_path / "analysis.json").write_text('{"layers": {"a": 1}}')
    assert report_cli.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: analysis file") and err.count("\n") == 1
    assert not (tmp_path / "quant_report.html").exists()


def test_analysis_written_before_the_override_measurement_still_renders(run_dir):
    """An analysis.json without the override columns (older tfquant) renders them as '–', ranked as it was."""
    old = json.loads((run_dir[0] / "analysis.json").read_text())
    for field in ("ranked_by", "quantized_loss"):
        del old[field]
    for field in ("override_bits", "accuracy_at_override", "recovery_at_override", "loss_recovery_at_override"):
        del old["layers"][0][field]
    report = json.loads((run_dir[0] / "quant_report.json").read_text())
    page = report_html.render(report, None, old)
    assert "Worst first." in page and "loss removed by the suggested override" not in page
    assert 'data-key="analysis.layers.0.recovery_if_float">0.0525<' in page
    assert 'data-key="analysis.layers.0.accuracy_at_override"' not in page
