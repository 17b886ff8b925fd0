"""benchmarks.bit_allocation --weight_grid lsq: the LSQ rows (auto measured on the LSQ grid, auto measured on the
min/max grid, uniform) from one float checkpoint; the min/max-measured allocation checked against brute force."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from benchmarks import accuracy_table, bit_allocation, bit_allocation_lsq, publish
from tfquant import allocation, sensitivity

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUDGET = next(b for b in bit_allocation.BUDGETS if b.label == "W3 A2.5")
# As benchmarks.bit_search_check: means of float32 losses, quantized by two different computations.
ABS_TOLERANCE, REL_TOLERANCE = 1e-5, 1e-4


@pytest.fixture(scope="module")
def lsq_run(tmp_path_factory):
    if os.environ.get("TFQ_SLOW_TESTS") != "1":
        # A quick LSQ table fine-tunes three rows and measures twice: about 5 minutes alone, past the suite's
        # budget (the min/max rows' quick run, which shares every step but the grid, stays in the suite).
        pytest.skip("the quick LSQ bit-allocation run takes minutes here; TFQ_SLOW_TESTS=1 runs it")
    tmp = tmp_path_factory.mktemp("alloc_lsq")
    output, work, markdown = tmp / "alloc.json", tmp / "work", tmp / "BENCHMARKS.md"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bit_allocation", "--quick", "--weight_grid", "lsq",
                           "--output", str(output), "--work_dir", str(work), "--markdown", str(markdown)],
                          cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not markdown.exists()
    return json.loads(output.read_text()), str(work)


def _dir(work, method):
    return accuracy_table.row_dir(work, "%s %s" % (BUDGET.label, method), 0)


def _load(work, method, name):
    return json.loads(open(os.path.join(_dir(work, method), name)).read())


def test_lsq_rows_train_lsq_weights_on_the_bits_they_name(lsq_run):
    data, work = lsq_run
    entries = {e["method"]: e for e in data["entries"]}
    assert [(e["budget"], e["method"]) for e in data["entries"]] == [
        ("W3 A2.5", "lsq auto"), ("W3 A2.5", "lsq auto min/max"), ("W3 A2.5", "lsq uniform")]
    assert len({e["float_accuracy"] for e in data["entries"]}) == 1  # one float checkpoint
    stored = _load(work, "lsq auto", "bit_allocation.json")
    assert entries["lsq auto"]["bits"] == bit_allocation_lsq.chosen_bits(stored)
    minmax_bits = entries["lsq auto min/max"]["bits"]
    # Activations are measured alike on either weight grid: the same activation bits.
    assert minmax_bits["activation"] == entries["lsq auto"]["bits"]["activation"]
    assert entries["lsq auto min/max"]["differing_layers"] == sorted(
        name for name, bits in minmax_bits["weight"].items() if stored_bits(stored)[name] != bits)
    ops_of = {layer["name"]: layer["ops"] for kind in ("weight", "activation") for layer in stored[kind]["layers"]}
    for method, expected in (("lsq auto", entries["lsq auto"]["bits"]), ("lsq auto min/max", minmax_bits),
                             ("lsq uniform", None)):
        report = _load(work, method, "quant_report.json")
        layers = {layer["name"]: layer for layer in report["layers"]}
        # Every row trained learned-step weights on its allocated layers.
        assert {layers[ops_of[name][0]]["weight_grid"] for name in expected_names(stored)} == {"lsq"}
        if expected is None:  # uniform: 3 bits on every allocated weight layer
            assert {layers[ops_of[name][0]]["bits"] for name in expected_names(stored)} == {3}
            continue
        # Each row really ran with its allocation, op by op.
        for kind in ("weight", "activation"):
            for name, bits in expected[kind].items():
                assert [layers[op]["bits"] for op in ops_of[name]] == [bits] * len(ops_of[name]), (method, name)
        results = _load(work, method, "results.json")
        assert results["quant_accuracy"] == entries[method]["accuracy"]


def stored_bits(stored):
    return {layer["name"]: layer["bits"] for layer in stored["weight"]["layers"]}


def expected_names(stored):
    return [layer["name"] for layer in stored["weight"]["layers"]]


def _minmax_numpy(value, bits):
    """Q_b(value) on one min/max range for the whole tensor (no buckets), in NumPy."""
    low, high = float(value.min()), float(value.max())
    levels = 2 ** bits - 1
    codes = np.round((value.astype(np.float64) - low) / (high - low) * levels)
    return (codes * (high - low) / levels + low).astype(np.float32)


def test_min_max_measured_allocation_is_brute_force_on_the_min_max_grid(lsq_run):
    """Every weight layer quantized alone in NumPy on its min/max range at every width, the whole loss run with it
    fed (the run's seeded training batch and float checkpoint), solved for the budget: the allocation the min/max
    row ran. Those sensitivities differ from the LSQ auto row's, measured on the LSQ grid."""
    from learners import bit_allocation as run_allocation, flags as learner_flags, graphs, helper_factory
    data, work = lsq_run
    stored = _load(work, "lsq auto", "bit_allocation.json")
    run_flags = bit_allocation.run_script_flags(work, BUDGET, bit_allocation_lsq.AUTO, 0, data["plan"],
                                                grid_flags=bit_allocation_lsq.GRID_FLAGS)
    learner_flags.define_flags()
    settings = learner_flags.FLAGS
    settings.unparse_flags()
    settings(["test"] + run_flags)
    helper = helper_factory.make_helper_for("resnet_at_fmnist")(settings)
    batches = run_allocation._training_batches(helper, 0, stored["sensitivity_batches"])
    graph, images, labels, loss = run_allocation._float_model(helper, batches[0])
    widths = range(stored["weight"]["bit_min"], stored["weight"]["bit_max"] + 1)
    reference = {}
    with graph.as_default():
        model_variables = list(tf.compat.v1.global_variables())
    with graphs.new_session(graph) as sess:
        graphs.restore_variables(sess, model_variables,
                                 os.path.normpath(os.path.join(_dir(work, "lsq auto"), stored["float_checkpoint"])))
        for x, y in batches:
            feed = {images: x, labels: y}
            base = float(sess.run(loss, feed))
            for layer in stored["weight"]["layers"]:
                read = [graph.get_operation_by_name(op).inputs[1] for op in layer["ops"]]
                value = sess.run(read[0])
                assert value.size == layer["size"]
                for bits in widths:
                    fed = dict(feed)
                    fed.update({tensor: _minmax_numpy(value, bits) for tensor in read})
                    increase = (float(sess.run(loss, fed)) - base) / len(batches)
                    reference.setdefault(layer["name"], {}).setdefault(bits, 0.0)
                    reference[layer["name"]][bits] += increase
    items = [allocation.AllocationItem(layer["name"], layer["size"],
                                       sensitivity.non_increasing(reference[layer["name"]]))
             for layer in stored["weight"]["layers"]]
    solved = allocation.solve(items, BUDGET.weight_bits).bits
    minmax = next(e for e in data["entries"] if e["method"] == "lsq auto min/max")
    assert minmax["bits"]["weight"] == solved
    # The LSQ auto row measured its weights elsewhere: on the LSQ grid, not on min/max.
    far = [(layer["name"], bits) for layer in stored["weight"]["layers"] for bits in widths
           if abs(layer["measured"][str(bits)] - reference[layer["name"]][bits])
           > ABS_TOLERANCE + REL_TOLERANCE * abs(reference[layer["name"]][bits])]
    assert len(far) > len(items), far
    differing = sorted(name for name, bits in solved.items() if stored_bits(stored)[name] != bits)
    assert minmax["differing_layers"] == differing
    text = bit_allocation.render(data, "cmd")
    assert "| W3 A2.5 | 0 | %.2f | %.2f |" % (100 * accuracy_of(data, "lsq auto"), 100 * minmax["accuracy"]) in text
    assert "%d of %d" % (len(differing), len(items)) in text


def accuracy_of(data, method):
    return next(e["accuracy"] for e in data["entries"] if e["method"] == method)


def _entry(method, seed, accuracy, differing=()):
    entry = {"budget": "W3 A4", "method": method, "seed": seed, "accuracy": accuracy, "float_accuracy": 0.9,
             "search_seconds": 1.0, "epoch_seconds": 100.0}
    if method == bit_allocation_lsq.MINMAX_AUTO:
        entry.update(differing_layers=list(differing), bits={"weight": {"a": 2, "b": 3, "c": 4}})
    return entry


def test_lsq_table_pairs_the_two_autos_per_seed_and_keeps_the_min_max_table():
    """The LSQ table: each method's mean ± std, the paired auto difference and the differing layers per seed; the
    min/max table above it is unchanged by the LSQ rows."""
    plan = dict(bit_allocation.FULL, budgets=["W3 A4"])
    entries = [_entry(m, 0, a) for m, a in (("auto", 0.9), ("uniform", 0.89), ("random 0", 0.88))]
    entries += [_entry(bit_allocation_lsq.AUTO, s, a) for s, a in ((0, 0.91), (1, 0.93))]
    entries += [_entry(bit_allocation_lsq.MINMAX_AUTO, s, a, d) for s, a, d in ((0, 0.90, "a"), (1, 0.90, "ab"))]
    entries += [_entry(bit_allocation_lsq.UNIFORM, s, 0.8) for s in (0, 1)]
    merged, budgets = bit_allocation.merge(None, entries, plan, "r.json")
    assert budgets == ["W3 A4"]
    assert bit_allocation.summarize(merged)["W3 A4"]["auto"] == (0.9, None)  # LSQ rows left out
    text = bit_allocation.render({"quick": False, "plan": plan, "entries": merged, "load_before": None, "machine": {
        "cores": 2, "cpu": "x", "tensorflow": "2", "python": "3", "date": "d", "load_average": None}}, "cmd")
    assert "| W3 A4 | 0 | 1 | 90.00 | 89.00 | 88.00 |" in text
    assert ("| W3 A4 | 0,1 | 92.00 ± 1.41 | 90.00 ± 0.00 | 80.00 ± 0.00 | +2.00 ± 1.41 | 1 of 3, 2 of 3 |"
            in text), text
    assert "changed the bits of 1, 2 weight layers (seeds 0,1) and moved accuracy by +2.00 points" in text


def test_lsq_rows_refuse_budgets_without_a_choice_and_options_they_do_not_take(tmp_path):
    out = str(tmp_path / "r.json")
    for argv, message in ((["--budgets", "W2 A4,W3 A4"], "--budgets=W2 A4,W3 A4 is not valid with --weight_grid=lsq: "
                           "LSQ's narrowest weight width is 2 bits, so at W2 A4 every layer takes it"),
                          (["--timing"], "--timing is not valid with --weight_grid=lsq"),
                          (["--randoms", "2"], "--randoms is not valid with --weight_grid=lsq")):
        with pytest.raises(publish.BenchmarkError, match=message):
            bit_allocation.main(["--weight_grid", "lsq", "--output", out] + argv)
    assert not os.path.exists(out)
    assert [b.label for b in bit_allocation_lsq.budgets()] == ["W3 A4", "W3 A2.5"]


def test_a_seed_whose_float_checkpoint_is_missing_is_refused_before_any_run(tmp_path):
    """LSQ rows of seed 1 in the results file came from a float checkpoint; a --work_dir without it would train a
    new one for the next LSQ rows, which could not be compared (merge would refuse them after every run). The
    min/max rows of that seed do not hold the LSQ rows back: the two families are compared apart."""
    out, work = tmp_path / "r.json", tmp_path / "work"
    plan = dict(bit_allocation.FULL, budgets=["W3 A4"])
    publish.write_json(str(out), {"quick": False, "plan": plan, "entries": [_entry("auto", 1, 0.9)]})
    bit_allocation.check_float_checkpoints(publish.load_json(str(out)), str(work), [1], ["W3 A4"], str(out),
                                           lsq=True)
    publish.write_json(str(out), {"quick": False, "plan": plan, "entries": [_entry(bit_allocation_lsq.AUTO, 1, 0.9)]})
    with pytest.raises(publish.BenchmarkError, match=r"--work_dir=%s has no float checkpoint of seed 1, whose rows "
                       % work):
        bit_allocation.main(["--weight_grid", "lsq", "--seeds", "0,1", "--output", str(out), "--work_dir", str(work)])
    assert not work.exists()
    os.makedirs(os.path.join(accuracy_table.float_dir(str(work), 1)))
    open(os.path.join(accuracy_table.float_dir(str(work), 1), "checkpoint"), "w").close()
    # With the checkpoint there the check passes (and an unrelated budget's rows never ask for one).
    bit_allocation.check_float_checkpoints({"entries": [_entry(bit_allocation_lsq.AUTO, 1, 0.9)]}, str(work), [0, 1],
                                           ["W3 A4"], "r", lsq=True)
    bit_allocation.check_float_checkpoints({"entries": [_entry(bit_allocation_lsq.AUTO, 2, 0.9)]}, str(work), [2],
                                           ["W3 A2.5"], "r", lsq=True)
