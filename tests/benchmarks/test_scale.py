"""benchmarks.scale --quick: every model and mode measured, figures consistent, BENCHMARKS.md untouched."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_scale_quick(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("untouched\n")
    output = tmp_path / "scale.json"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--quick", "--output", str(output),
                           "--markdown", str(markdown)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(output.read_text())
    assert result["quick"] is True and markdown.read_text() == "untouched\n"
    networks = {run["model"]: run["network"] for run in result["runs"]}
    assert networks == {"resnet_50": "resnet_18", "mobilenet_v2": "mobilenet_v2_x0.35",
                        "transformer": "transformer_patches"}
    for model in ("resnet_50", "mobilenet_v2", "transformer"):
        entries = result["summary"][model]
        assert entries["float"]["quantize_s"] == 0.0
        for mode in ("float", "w4a4-channel", "w8a8"):
            entry = entries[mode]
            for key in ("build_s", "session_start_s", "step_s", "peak_rss_kb"):
                assert entry[key] > 0 and math.isfinite(entry[key]), (model, mode, key)
        for mode in ("w4a4-channel", "w8a8"):
            # The rewrite adds ops; the ratio is the one the summary's own figures give.
            assert entries[mode]["quantize_s"] > 0 and entries[mode]["graph_ops"] > entries["float"]["graph_ops"]
            ratio = result["ratios"][model][mode]
            assert math.isclose(ratio["step_ratio"], entries[mode]["step_s"] / entries["float"]["step_s"])
            assert math.isclose(ratio["quantize_over_build"],
                                entries[mode]["quantize_s"] / entries["float"]["build_s"])
            assert ratio["rss_ratio"] is None  # one process per model in --quick: no per-mode peak


def test_the_resnet_targets_are_judged_as_the_ilsvrc12_script_trains_it():
    import types

    from benchmarks import scale
    from learners import flags as learner_flags

    assert learner_flags.SCRIPT_DEFAULTS["resnet_at_ilsvrc12"]["uql_recompute_quantized"] == "all"
    assert scale._quant_config(scale.RESNET_SCRIPT_MODE).recompute_quantized == "all"
    assert scale._quant_config("w4a4-channel-recompute-weights").recompute_quantized == "weights"
    entry = {"build_s": 1.0, "quantize_s": 0.2, "session_start_s": 1.0, "step_s": 1.0, "peak_rss_kb": 1024.0,
             "graph_ops": 10}
    summary = {model: {mode: dict(entry) for mode in scale.MODES} for model in scale.MODELS}
    ratios = {model: {mode: {"quantize_over_build": 0.2, "step_ratio": 1.0, "rss_ratio": 1.0}
                      for mode in scale.MODES[1:]} for model in scale.MODELS}
    ratios["resnet_50"]["w4a4-channel"] = {"quantize_over_build": 0.21, "step_ratio": 0.98, "rss_ratio": 1.16}
    ratios["resnet_50"][scale.RESNET_SCRIPT_MODE] = {"quantize_over_build": 0.25, "step_ratio": 1.031,
                                                     "rss_ratio": 1.019}
    info = {"cores": 2, "cpu": "c", "tensorflow": "t", "python": "p", "date": "d", "load_average": [0.1, 0.1, 0.1]}
    args = types.SimpleNamespace(image_size=224, batch_size=32, repeats=1, warmup=2, steps=5)
    text = scale.render(args, summary, ratios, info, [0.1, 0.1, 0.1], "cmd")
    assert ("`w4a4-channel-recompute`): quantize_graph 0.25 x the float graph build (<= 0.50), step 1.031 x float "
            "(<= 1.10), peak RSS 1.019 x float (<= 1.15)") in text
    assert "(`w4a4-channel`): step 0.980 x float, peak RSS 1.160 x float" in text
