"""benchmarks.multi_worker_accuracy: the two jobs it compares, and the comparison.

Its --quick run (3 processes, ~35 s) is left to the benchmark itself to keep the suite under its time budget:
tests/learners/test_multi_worker.py runs the same 2-worker path through tools/launch_workers.py end to end,
including one step of 2 workers checked against one process on the global batch.
"""
from benchmarks import multi_worker_accuracy


def test_jobs_share_the_global_batch_and_learning_rate():
    budget = multi_worker_accuracy.FULL
    one = multi_worker_accuracy.job_flags("/w/one", budget, 1, 3)
    two = multi_worker_accuracy.job_flags("/w/two", budget, 2, 3)
    assert "--batch_size=128" in one and "--batch_size=64" in two
    # Same learning rate (no scaling by the worker count), same seed, same epochs and quantization.
    assert "--noenbl_lrn_rate_scaling" in two and not any("lrn_rate_scaling" in f for f in one)
    strip = lambda flags: [f for f in flags if not f.startswith(("--batch_size=", "--save_path", "--uql_save",  # noqa
                                                                "--log_dir", "--noenbl"))]
    assert strip(one) == strip(two) and "--seed=3" in one


def test_comparison_is_in_points_against_the_target():
    single = {"float_accuracy": 0.9000, "quant_accuracy": 0.8800}
    multi = {"float_accuracy": 0.9020, "quant_accuracy": 0.8840}
    diff = multi_worker_accuracy.compare(single, multi)
    assert abs(diff["float_accuracy"]["points"] - 0.2) < 1e-9 and diff["float_accuracy"]["met"]
    assert abs(diff["quant_accuracy"]["points"] - 0.4) < 1e-9 and not diff["quant_accuracy"]["met"]
