"""benchmarks.accuracy_table: rows through the real run script from one float checkpoint per seed, rows
and seeds selectable and merged into one results file; then benchmarks.export_table on its checkpoints."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from benchmarks import accuracy_table, accuracy_targets, export_table, machine, publish

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def entry(label, seed, accuracy, float_accuracy, ratio=4.0):
    return {"label": label, "seed": seed, "accuracy": accuracy, "float_accuracy": float_accuracy, "ratio": ratio,
            "flags": "", "epochs": 1.0, "test_examples": 10000, "seconds": 1.0}


def test_rows_are_selected_by_label_or_slug_and_unknown_rows_are_refused():
    chosen = accuracy_table.select_rows("W2A8 channel, W4A4,W2A8_split_128")
    assert [row.label for row in chosen] == ["W2A8 channel", "W4A4", "W2A8 split/128"]
    assert accuracy_table.select_rows(None) == accuracy_table.ROWS
    for row in accuracy_table.ROWS:  # every label can be asked for on its own (a comma in one could not)
        assert accuracy_table.select_rows(row.label) == [row]
    with pytest.raises(publish.BenchmarkError, match="'W3A3' is no row"):
        accuracy_table.select_rows("W4A4,W3A3")
    assert accuracy_table.parse_seeds("2,0,2") == [0, 2]
    for bad in ("", "1,x", "-1"):
        with pytest.raises(publish.BenchmarkError, match="--seeds"):
            accuracy_table.parse_seeds(bad)


def test_a_row_is_a_label_and_flags_with_its_own_epochs_and_seed():
    row = accuracy_table.Row("W4A4 LSQ", "--uql_weight_bits=4 --uql_act_range=lsq --enbl_dst", epochs=3.0)
    flags = accuracy_table.run_flags("/w", row, 2, accuracy_table.FULL)
    assert flags[-3:] == ["--uql_weight_bits=4", "--uql_act_range=lsq", "--enbl_dst"]  # the row's flags win
    assert "--uql_quant_epochs=3.0" in flags and "--seed=2" in flags
    assert "--save_path=/w/seed2/float/model.ckpt" in flags
    assert "--uql_save_quant_model_path=/w/seed2/W4A4_LSQ/model.ckpt" in flags
    default = accuracy_table.run_flags("/w", accuracy_table.ROWS[0], 0, accuracy_table.FULL)
    assert "--uql_quant_epochs=1.0" in default


def test_parts_merge_by_row_and_seed_and_the_table_shows_mean_and_std():
    first = accuracy_table.merge(None, [entry("W4A4", 0, 0.90, 0.91), entry("W8A8", 0, 0.92, 0.91)], False,
                                 accuracy_table.FULL, "r.json")
    payload = {"quick": False, "budget": accuracy_table.FULL, "entries": first}
    merged = accuracy_table.merge(payload, [entry("W4A4", 1, 0.86, 0.89), entry("W4A4", 0, 0.88, 0.91)], False,
                                  accuracy_table.FULL, "r.json")
    assert [(e["label"], e["seed"], e["accuracy"]) for e in merged] == [
        ("W8A8", 0, 0.92), ("W4A4", 0, 0.88), ("W4A4", 1, 0.86)]  # ROWS order; a rerun replaces its entry
    table = accuracy_table.summarize(merged)
    assert table["W4A4"]["seeds"] == [0, 1]
    assert table["W4A4"]["mean"] == pytest.approx(np.mean([0.88, 0.86]))
    assert table["W4A4"]["std"] == pytest.approx(np.std([0.88, 0.86], ddof=1))
    assert table["W4A4"]["change"] == pytest.approx(np.mean([0.88 - 0.91, 0.86 - 0.89]))
    assert table["W8A8"]["std"] is None
    text = accuracy_table.render({"entries": merged, "budget": accuracy_table.FULL, "load_before": [0.1, 0, 0],
                                  "machine": {"cores": 2, "cpu": "c", "tensorflow": "t", "python": "p", "date": "d",
                                              "load_average": [0.1, 0, 0]}}, "cmd")
    assert "| W4A4 | 0,1 | 87.00 ± 1.41 | -3.00 | - | 4.00x |" in text
    assert "| float (starting point) | 0,1 | 90.00 ± 1.41 | - | - | 1.00x |" in text
    assert "Not run yet: W4A32 channel" in text and "busy" not in text
    with pytest.raises(publish.BenchmarkError, match="different float accuracies"):
        accuracy_table.merge(payload, [entry("W2A8 channel", 0, 0.9, 0.5)], False, accuracy_table.FULL, "r.json")
    with pytest.raises(publish.BenchmarkError, match="different budget"):
        accuracy_table.merge(payload, [], True, accuracy_table.QUICK, "r.json")


def test_w3a3_rows_with_a_longer_fine_tuning_are_judged_apart():
    entries = [entry("W3A3 ch min/max", 0, 0.900, 0.916), entry("W3A3 ch LSQ + dst", 0, 0.910, 0.916),
               entry("W3A3 ch min/max + dst", 0, 0.905, 0.916),
               dict(entry("W3A3 ch LSQ + dst (3 epochs)", 0, 0.913, 0.916), epochs=3.0),
               dict(entry("W3A3 ch PACT", 0, 0.880, 0.916), epochs=3.0)]
    checks = {what: (met, measured) for what, met, measured in accuracy_targets._learned_range_checks(
        accuracy_table.summarize(entries))}
    assert checks["W3A3 best setting within 0.5 points of float (1 epoch of fine-tuning)"] == (
        False, "W3A3 ch LSQ + dst -0.60, 1 seed")
    assert checks["W3A3 best setting within 0.5 points of float (3 epochs of fine-tuning)"] == (
        True, "W3A3 ch LSQ + dst (3 epochs) -0.30, 1 seed")
    # Learned-range rows against min/max, only at min/max's own budget (min/max + dst is no learned range).
    assert [what for what in checks if "at or above" in what] == ["W3A3 ch LSQ + dst at or above W3A3 ch min/max"]


def test_the_recorded_results_file_is_in_the_current_format():
    payload = publish.load_json(accuracy_table.DEFAULT_RESULTS)
    entries = accuracy_table.merge(payload, [], False, accuracy_table.FULL, accuracy_table.DEFAULT_RESULTS)
    # Rows can be measured in parts (--rows, --seeds): every recorded label must be a row of the table.
    assert {e["label"] for e in entries} <= {row.label for row in accuracy_table.ROWS}


def run(module, *args):
    done = subprocess.run([sys.executable, "-m", module] + list(args), cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]


def test_accuracy_table_quick(tmp_path):
    output, work = tmp_path / "acc.json", tmp_path / "work"
    run("benchmarks.accuracy_table", "--quick", "--output", str(output), "--work_dir", str(work))
    data = json.loads(output.read_text())
    assert [(e["label"], e["seed"]) for e in data["entries"]] == [
        (label, 0) for label in accuracy_table.QUICK_ROWS]
    for item in data["entries"]:
        assert 0.0 <= item["accuracy"] <= 1.0 and item["test_examples"] == 200
        assert item["float_accuracy"] == data["entries"][0]["float_accuracy"]  # one float checkpoint per seed
        # The row's own results.json agrees with what the table reports.
        results = json.loads((work / "seed0" / accuracy_table.slug(item["label"]) / "results.json").read_text())
        assert results["quant_accuracy"] == item["accuracy"] and results["compression_ratio"] == item["ratio"]
    # W8A8 with first/last float: roughly 4x smaller than float32, never less.
    assert 2.5 < data["entries"][0]["ratio"] < 4.0
    assert not os.path.exists(os.path.join(ROOT, "BENCHMARKS.md.tmp"))
    # The export table runs on the checkpoints the accuracy table left behind.
    export_json = tmp_path / "export.json"
    run("benchmarks.export_table", "--quick", "--output", str(export_json), "--work_dir", str(work))
    exported = json.loads(export_json.read_text())
    row = exported["rows"][0]["export"]
    files = row["files"]
    for key, name in (("packed", "model.tfq"), ("tflite_float", "model_float.tflite"),
                      ("tflite_int8", "model_int8.tflite")):
        assert files[key]["bytes"] == os.path.getsize(work / "seed0" / "export_W8A8" / name)
    # The packed 8-bit model is far smaller than the float checkpoint (which also holds Momentum slots).
    assert files["packed"]["bytes"] < exported["float_checkpoint_bytes"] / 4
    assert row["accuracy"]["frozen_graph"] == row["accuracy"]["quantized_checkpoint"]
    assert row["accuracy"]["quantized_checkpoint"] == pytest.approx(data["entries"][0]["accuracy"], abs=1e-6)
    for key, share in row["agreement_with_quantized_tf"].items():
        differ = row["disagreements_with_quantized_tf"][key]
        assert differ["images"] == round((1 - share) * row["test_images"])
        assert export_table.agreement_cell(row, key).startswith("%.4f" % share)
    row["disagreements_with_quantized_tf"]["tflite_int8"] = {"images": 36, "tied": 15, "reference_ties": 67}
    assert export_table.agreement_cell(row, "tflite_int8").endswith(" (36 differ, 15 tied)")
    assert export_table.agreement_cell(row, "no such file") == "-"
    layers = row["int8_layer_divergence"]["layers"]
    note = export_table.divergence_note("W8A8", row["int8_layer_divergence"])
    assert note.startswith("- W8A8, int8 TFLite (built-in kernels) against the TF graph on %d test images"
                           % row["int8_layer_divergence"]["images"])
    assert ("output %.2f %%; at most %d steps." % (100 * layers[-1]["differ"], max(r["max_steps"] for r in layers[1:]))
            in note)


def test_a_part_keeps_the_rows_another_part_wrote_while_it_ran(tmp_path, monkeypatch):
    output = tmp_path / "acc.json"
    publish.write_json(str(output), {"quick": True, "budget": accuracy_table.QUICK,
                                     "entries": [entry("W8A8", 0, 0.92, 0.91)]})

    def fake_run_row(work_dir, row, seed, budget):
        # Another part, started at the same time, finishes first and records its row.
        other = publish.load_json(str(output))
        other["entries"].append(entry("W4A32 channel", 1, 0.88, 0.90))
        publish.write_json(str(output), other)
        return entry(row.label, seed, 0.87, 0.91)

    monkeypatch.setattr(accuracy_table, "run_row", fake_run_row)
    accuracy_table.main(["--quick", "--rows", "W4A4", "--seeds", "0", "--output", str(output),
                         "--work_dir", str(tmp_path / "work")])
    recorded = json.loads(output.read_text())["entries"]
    assert [(e["label"], e["seed"], e["accuracy"]) for e in recorded] == [
        ("W8A8", 0, 0.92), ("W4A4", 0, 0.87), ("W4A32 channel", 1, 0.88)]


def test_section_is_rendered_again_from_a_results_file(tmp_path):
    machine_info = {"cores": 2, "cpu": "c", "tensorflow": "t", "python": "p", "date": "d", "load_average": [0.1, 0, 0]}
    path, markdown = tmp_path / "acc.json", tmp_path / "BENCHMARKS.md"
    publish.write_json(str(path), {"quick": False, "budget": accuracy_table.FULL, "machine": machine_info,
                                   "load_before": [0.1, 0, 0], "command": "python -m benchmarks.accuracy_table --x",
                                   "entries": [entry("W4A4", 0, 0.905, 0.915), entry("W4A4", 1, 0.895, 0.905)]})
    markdown.write_text("# title\n")
    accuracy_table.main(["--render_json", str(path), "--markdown", str(markdown)])
    text = markdown.read_text()
    assert "Command (the last part run): `python -m benchmarks.accuracy_table --x`" in text
    assert "| W4A4 | 0,1 | 90.00 ± 0.71 | -1.00 | - | 4.00x |" in text


def test_issue34_group_expands_to_every_target_family_and_epochs_are_bounded(tmp_path):
    chosen = [row.label for row in accuracy_table.select_rows("issue34,W8A8")]
    assert chosen == list(accuracy_table.ROW_GROUPS["issue34"]) + ["W8A8"]
    flags = {row.label: row.flags.split() for row in accuracy_table.ROWS}
    assert {"--uql_weight_range=ternary", "--uql_weight_bits=2"} <= set(flags["W2 ternary A4 ch LSQ + dst"])
    assert {"--uql_weight_range=binary", "--uql_weight_bits=1"} <= set(flags["W1 binary A4 ch LSQ + dst"])
    for family, prefixes, _ in accuracy_targets.CONVERGED_LIMITS:  # every family has a row in the group
        assert any(label.startswith(prefixes) for label in accuracy_table.ROW_GROUPS["issue34"]), family
    for bad in ("0", "5.5", "-1"):
        with pytest.raises(publish.BenchmarkError, match="--epochs=.* is not valid; expected more than 0 and at "
                                                         "most 5"):
            accuracy_table.main(["--quick", "--epochs", bad, "--work_dir", str(tmp_path)])


def test_converged_targets_judge_each_family_by_its_best_row():
    entries = [entry("W2A2 ch LSQ + dst", s, 0.920, 0.935) for s in (0, 1, 2)]  # -1.5: exactly at the limit
    entries += [entry("W2A2 ch LSQ + dst + all recipes", s, 0.900, 0.935) for s in (0, 1, 2)]
    entries += [entry("W1 binary A4 ch LSQ + dst", s, 0.9040, 0.935) for s in (0, 1)]  # -3.1
    entries += [entry("W4A8 ch PTQ AdaRound", 0, 0.930, 0.935), entry("W4A8 ch PTQ nearest", 0, 0.931, 0.935)]
    checks = {what: (met, measured) for what, met, measured in
              accuracy_targets.converged_checks(accuracy_table.summarize(entries))}
    assert checks["W2A2 within 1.5 points of the converged float (best row)"] == (
        True, "W2A2 ch LSQ + dst -1.50, 3 seeds")
    assert checks["binary weights, A4 within 3.0 points of the converged float (best row)"] == (
        False, "W1 binary A4 ch LSQ + dst -3.10, 2 seeds")
    assert checks["W4A8 PTQ with AdaRound within 1.0 point of the converged float (best row)"][0] is True
    assert checks["W4A8 PTQ AdaRound at or above nearest rounding"] == (False, "93.00 vs 93.10")
    assert not any(what.startswith(("W3A3", "ternary", "W4A4")) for what in checks)  # rows not run: not judged
    payload = {"entries": entries, "budget": dict(accuracy_table.FULL, baselines="/cache", float=["--nb_epochs_rat=8"]),
               "load_before": [0.1, 0, 0], "machine": {"cpu": "c", "cores": 2, "tensorflow": "2.21",
                                                       "python": "3.11", "date": "d", "load_average": [0.1, 0, 0]}}
    assert accuracy_table.section_of(payload) == accuracy_table.CONVERGED_SECTION
    text = accuracy_table.render(payload, "cmd")
    assert text.startswith("## Accuracy against converged float models")
    assert "- Target: binary weights, A4 within 3.0 points of the converged float (best row): **not met**" in text
    assert ("- Not run yet: W4A4 all layers LSQ + dst, W3A3 ch LSQ + dst, W3A3 ch PACT, W2A2 ch LSQ + dst 5 epochs, "
            "W2A2 ch LSQ + dst progressive 8-4-2, W2 ternary") in text


def test_ptq_rows_alone_form_their_own_table_with_adaround_times(tmp_path, monkeypatch):
    """PTQ rows run alone go to the post-training section and results file (they may calibrate float models other
    than the fine-tuning table's), with AdaRound's calibration seconds and its targets against the float model."""
    assert accuracy_table.is_ptq_part(list(accuracy_table.PTQ_ROWS), None)
    assert not accuracy_table.is_ptq_part(list(accuracy_table.PTQ_ROWS), "/cache")  # converged: its own table
    assert not accuracy_table.is_ptq_part(["W4A8 ch PTQ nearest", "W4A4"], None)
    entries = [entry("W4A8 ch PTQ nearest", s, a, 0.915) for s, a in ((0, 0.90), (1, 0.902), (2, 0.898))]
    entries += [dict(entry("W4A8 ch PTQ AdaRound", s, a, 0.915), adaround_seconds=t)
                for s, a, t in ((0, 0.908, 31.5), (1, 0.905, 30.0), (2, 0.9, 33.25))]
    payload = {"entries": entries, "budget": accuracy_table.FULL, "load_before": [0.1, 0, 0],
               "machine": {"cpu": "c", "cores": 2, "tensorflow": "2.21", "python": "3.11", "date": "d",
                           "load_average": [0.1, 0, 0]}}
    assert accuracy_table.section_of(payload) == accuracy_table.PTQ_SECTION
    assert accuracy_table.section_of(dict(payload, entries=entries + [entry("W4A4", 0, 0.9, 0.915)])) == \
        accuracy_table.SECTION
    text = accuracy_table.render(payload, "cmd")
    assert text.startswith("## Post-training quantization: nearest rounding and AdaRound")
    assert "seed 0 31.5, seed 1 30.0, seed 2 33.2" in text
    # AdaRound's mean 90.43 against float 91.50: -1.07, beyond the 1-point limit; above nearest's 90.00.
    assert "- Target: W4A8 PTQ AdaRound within 1.0 point of its float model: **not met** (-1.07, 3 seeds)." in text
    assert "- Target: W4A8 PTQ AdaRound at or above nearest rounding: met (90.43 vs 90.00)." in text
    assert "Not run yet" not in text and "PocketFlow" not in text
    # The default results file of a PTQ-only part is the post-training one.
    seen = {}
    monkeypatch.setattr(accuracy_table, "merge", lambda existing, new, quick, budget, path: seen.setdefault(
        "output", path) and (_ for _ in ()).throw(publish.BenchmarkError("stop")))
    with pytest.raises(publish.BenchmarkError, match="stop"):
        accuracy_table.main(["--rows", ",".join(accuracy_table.PTQ_ROWS), "--work_dir", str(tmp_path)])
    assert seen["output"] == accuracy_table.PTQ_RESULTS


def test_adaround_cpu_seconds_against_a_float_epoch(tmp_path, monkeypatch):
    """AdaRound's CPU seconds per seed, as a share of a float epoch's (two float runs of 0.15 and 0.6 epoch, their
    difference scaled to one epoch; --nb_epochs_rat scales the model's 3 base epochs), and by phase."""
    usages = iter([(10.0, 1.0), (30.0, 2.0), (40.0, 2.0), (100.0, 5.0)])  # (user, system) before/after each run
    monkeypatch.setattr(accuracy_table.resource, "getrusage",
                        lambda who: types.SimpleNamespace(**dict(zip(("ru_utime", "ru_stime"), next(usages)))))
    runs = []
    monkeypatch.setattr(accuracy_table.subprocess, "run", lambda argv, **kw: runs.append(argv) or
                        types.SimpleNamespace(returncode=0, stderr=""))
    epoch = accuracy_table.float_epoch_cpu_seconds(str(tmp_path), 1, accuracy_table.FULL)
    # 21 then 63 CPU seconds for 0.15 and 0.6 epoch: 42 for 0.45 epoch, 93.3 for one.
    assert epoch == pytest.approx(42.0 / 0.45)
    assert [[a for a in argv if a.startswith(("--learner", "--nb_epochs_rat", "--seed"))] for argv in runs] == [
        ["--learner=full-prec", "--seed=1", "--nb_epochs_rat=0.05"],
        ["--learner=full-prec", "--seed=1", "--nb_epochs_rat=0.2"]]
    entries = [dict(entry("W4A8 ch PTQ AdaRound", s, 0.91, 0.915), adaround_seconds=20.0, adaround_cpu_seconds=c,
                    adaround_cpu_by_phase={"layer inputs": c / 2, "optimisation": c / 2})
               for s, c in ((0, 7.0), (1, 13.0))]
    payload = {"entries": entries, "budget": accuracy_table.FULL, "load_before": [0.1, 0, 0],
               "float_epoch_cpu_seconds": 280.0,
               "machine": {"cpu": "c", "cores": 2, "tensorflow": "2.21", "python": "3.11", "date": "d",
                           "load_average": [0.1, 0, 0]}}
    text = accuracy_table.render(payload, "cmd")
    assert ("CPU seconds per seed (every thread of the process): seed 0 7.0 (2.5 % of a float epoch), seed 1 13.0 "
            "(4.6 % of a float epoch); a float training epoch: 280 CPU seconds") in text
    assert "by phase, mean over the seeds: layer inputs 5.00, optimisation 5.00." in text
    assert ("- Target: AdaRound's calibration at most 5 % of a float epoch's compute: met (at most 4.6 %, 2 seeds)."
            in text)
    entries[1]["adaround_cpu_seconds"] = 14.5
    assert "compute: **not met** (at most 5.2 %, 2 seeds)" in accuracy_table.render(payload, "cmd")


def test_a_long_table_resumes_keeping_finished_rows_and_their_controls(tmp_path, monkeypatch):
    output, calls, stops = tmp_path / "acc.json", [], [("W4A4", 1)]

    def fake_run_row(work_dir, row, seed, budget):
        calls.append((row.label, seed))
        if (row.label, seed) in stops:
            stops.remove((row.label, seed))
            raise RuntimeError("stopped part-way")
        control = row.label.startswith("float fine-tuned")
        return dict(entry(row.label, seed, 0.93 if control else 0.90, 0.91), flags=row.flags, epochs=1.0)

    monkeypatch.setattr(accuracy_table, "run_row", fake_run_row)
    monkeypatch.setattr(machine, "end_load", lambda quick=False: [0.1, 0.1, 0.1])
    argv = ["--rows", "W8A8,W4A4", "--seeds", "0,1", "--output", str(output), "--work_dir", str(tmp_path / "w"),
            "--allow_busy", "--markdown", str(tmp_path / "B.md")]
    with pytest.raises(RuntimeError, match="part-way"):
        accuracy_table.main(argv)
    kept = json.loads(output.read_text())["entries"]
    # Seed 0's rows and seed 1's first row were finished before the stop: all three kept, each with its control.
    assert [(e["label"], e["seed"], e["control_accuracy"]) for e in kept] == [
        ("W8A8", 0, 0.93), ("W8A8", 1, 0.93), ("W4A4", 0, 0.93)]
    calls.clear()
    accuracy_table.main(argv)
    assert calls == [("W4A4", 1)]  # the rest from the file, controls too (seed 1's was measured with W8A8)
    final = json.loads(output.read_text())["entries"]
    assert [(e["label"], e["seed"]) for e in final] == [("W8A8", 0), ("W8A8", 1), ("W4A4", 0), ("W4A4", 1)]
    assert final[-1]["control_accuracy"] == 0.93
    calls.clear()
    accuracy_table.main(argv + ["--rerun"])
    assert ("W8A8", 0) in calls and ("W4A4", 1) in calls


def test_a_run_refused_by_its_own_error_line_ends_the_table_in_that_line(tmp_path):
    # The seed's float directory is held by another process: the row's run refuses in one line (exit 2) and the
    # benchmark says so in one line naming the row, no traceback. A run that crashes is a bug: its stderr is kept.
    float_dir = tmp_path / "seed0" / "float"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, %r); from tfquant import "
                               "files; files.lock_directory(%r); print('held', flush=True); time.sleep(600)"
                               % (ROOT, str(float_dir))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run([sys.executable, "-m", "benchmarks.accuracy_table", "--quick", "--rows=W8A8",
                               "--work_dir=%s" % tmp_path], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        "error: row 'W8A8' seed 0 refused: run directory %s is in use by process %d (lock %s); expected one process "
        "per run directory: wait for it to end, or choose another --save_path / --uql_save_quant_model_path"
        % (float_dir, holder.pid, float_dir / ".tfquant.lock")], done.stderr[-3000:]
    crashed = subprocess.run([sys.executable, "-c", "raise ValueError('a bug')"], capture_output=True, text=True)
    with pytest.raises(RuntimeError, match=r"(?s)^the probe failed:\n.*ValueError: a bug"):
        publish.check_run(crashed, "the probe")
    publish.check_run(subprocess.run([sys.executable, "-c", "pass"], capture_output=True, text=True), "a success")
