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
