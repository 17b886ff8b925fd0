"""benchmarks.run_all: every section of BENCHMARKS.md has a part (or is kept on purpose), the busy rule, --only,
one error line when a part fails, and the --quick dry run rewriting a blanked section in a temporary copy."""
import os
import re
import subprocess
import sys

import pytest

from benchmarks import run_all

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "benchmarks.run_all"] + list(args), cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=1200,
                          env=dict(os.environ, PYTHONPATH=REPO_ROOT, TF_CPP_MIN_LOG_LEVEL="3"))


def test_every_section_of_benchmarks_md_has_a_part_or_is_kept():
    with open(os.path.join(REPO_ROOT, "BENCHMARKS.md")) as handle:
        sections = re.findall(r"<!-- BEGIN (\S+) -->", handle.read())
    owned = {s for p in run_all.PARTS for s in p.sections}
    assert set(sections) == owned | set(run_all.KEPT_SECTIONS), set(sections) ^ (owned | set(run_all.KEPT_SECTIONS))
    for part in run_all.PARTS:
        assert os.path.exists(os.path.join(REPO_ROOT, "benchmarks", part.module + ".py")), part


def test_busy_rule_is_one_per_core():
    run_all.check_quiet(False, load=1.9, core_count=2)
    with pytest.raises(run_all.RunAllError, match="load average 2.10 on 2 cores, above 1.0 per core"):
        run_all.check_quiet(False, load=2.1, core_count=2)
    run_all.check_quiet(True, load=9.0, core_count=2)


def test_only_keeps_run_order_and_skip_long_drops_accuracy_runs():
    chosen = run_all.choose("bit_allocation,rewrite_cost", False)
    assert [p.name for p in chosen] == ["rewrite_cost", "bit_allocation"]
    assert [p.name for p in run_all.choose("bit_allocation,rewrite_cost", True)] == ["rewrite_cost"]
    assert not any(p.long for p in run_all.choose(None, True))
    assert {p.name for p in run_all.choose(None, False)} == {p.name for p in run_all.PARTS}
    # export_table reads accuracy_table's checkpoints: it comes after it.
    names = [p.name for p in run_all.PARTS]
    assert names.index("accuracy_table") < names.index("export_table") < names.index("keras_ptq")


def test_bad_flags_and_busy_machine_are_one_error_line():
    done = _run("--only", "rewrite_cost,nonsense")
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert done.stderr.startswith("error: --only=rewrite_cost,nonsense is not valid; expected a comma-separated")
    listed = run_all.listing(run_all.choose("accuracy_table,memory", False), "/w")
    assert re.search(r"^accuracy_table +~8 h +yes +accuracy_table .*--work_dir /w/acc$", listed, re.M), listed
    assert re.search(r"^total ~8 h", listed, re.M), listed
    if os.getloadavg()[0] > run_all.BUSY_LOAD_PER_CORE * (os.cpu_count() or 1):  # the usual state of a test run
        busy = _run("--only", "allreduce")
        assert busy.returncode == 2 and busy.stderr.startswith("error: the machine is busy"), busy.stderr


def test_a_failing_part_stops_the_run_with_one_error_line(monkeypatch, tmp_path):
    broken = run_all.Part("broken", "allreduce", ("allreduce",), (), ("--quick", "--no_such_flag"), 1)
    after = run_all.Part("after", "allreduce", ("allreduce",), (), ("--quick",), 1)
    monkeypatch.setattr(run_all, "PARTS", (broken, after))
    printed = []
    with pytest.raises(run_all.RunAllError) as raised:
        run_all.dry_run([broken, after], os.path.join(REPO_ROOT, "BENCHMARKS.md"), out=printed.append)
    assert "part broken --quick failed (exit status 2" in str(raised.value)
    assert "--no_such_flag" in str(raised.value)
    assert not any("after" in line for line in printed), printed  # nothing ran after the failure


def test_quick_dry_run_smoke_runs_a_part_and_rewrites_a_blanked_section_in_a_copy(tmp_path):
    """allreduce: its real --quick run (no results file is committed: smoke only). memory: its section blanked in
    the copy and rewritten by its own --render_json from the committed results (its quick run replaced by --help,
    which keeps the test short; the tests of benchmarks.memory run its --quick mode), by two parts."""
    markdown = tmp_path / "BENCHMARKS.md"
    with open(os.path.join(REPO_ROOT, "BENCHMARKS.md")) as handle:
        original = handle.read()
    markdown.write_text(original)
    memory = run_all.Part("memory", "memory", ("memory",), (), ("--help",), 1)
    again = memory._replace(name="memory_again")  # two parts writing one section (as bit_allocation's two do)
    printed = []
    times, checked, smoke_only, copy = run_all.dry_run(run_all.choose("allreduce", False) + [memory, again],
                                                       str(markdown), out=printed.append)
    assert checked == ["memory"] and smoke_only == ["allreduce"] and times["allreduce"] > 0
    assert markdown.read_text() == original  # the file given is copied, never written
    body = re.search(r"<!-- BEGIN memory -->\n(.*?)<!-- END memory -->", copy, re.S).group(1)
    assert run_all.BLANK not in copy and "| " in body and "memory" in body.lower()
    assert any(line.startswith("dry run of 3 parts done in") for line in printed), printed
    # The check itself: a blanked section that nothing rewrites is reported.
    run_all.blank_sections(str(markdown), ["allreduce", "memory"])
    assert run_all.unwritten_sections(str(markdown), ["allreduce", "memory", "scale"]) == ["allreduce", "memory"]
