"""The flag tables define exactly the flags learners/flags.py defined before it was split by concern: every name,
kind, default, help text and choice, and the run scripts' own defaults (fixture dumped before the split)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "flags_before_split.json")
# Run in a fresh interpreter: other tests change flag defaults (use_script_defaults) in this one.
DUMP = """
import json
from absl import flags
from learners import flags as learner_flags
learner_flags.define_flags()
rows = []
for name, flag in sorted(flags.FLAGS._flags().items()):
    if not (flags.FLAGS.find_module_defining_flag(name) or "").startswith("learners"):
        continue
    rows.append({"name": name, "kind": type(flag).__name__, "parser": type(flag.parser).__name__,
                 "default": flag.default, "help": flag.help,
                 "choices": sorted(getattr(flag.parser, "enum_values", None) or []) or None})
print(json.dumps({"flags": rows, "script_defaults": learner_flags.SCRIPT_DEFAULTS}, sort_keys=True, default=repr))
"""


def test_every_flag_is_defined_as_before_the_split():
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", DUMP], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=300, check=True)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    with open(FIXTURE) as handle:
        expected = json.load(handle)
    assert len(expected["flags"]) == 91
    assert [row["name"] for row in found["flags"]] == [row["name"] for row in expected["flags"]]
    for got, want in zip(found["flags"], expected["flags"]):
        assert got == want, want["name"]
    assert found["script_defaults"] == expected["script_defaults"]
