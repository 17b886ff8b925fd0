"""nets/model_file_run.py's deployment defaults (learners.deployment_settings): the symmetric weight grid and
quantized layer outputs where the command line leaves them unset and the other settings allow them, a flag given
never changed, a resumed run kept as recorded, and each decision one note."""
import json
import os

import pytest

from learners import deployment_settings, run_settings
from learners import flags as learner_flags
from learners.errors import UserError
from tests.learners.test_ignored_flags import parse_run_flags

FLAGS = learner_flags.FLAGS


@pytest.fixture
def apply(tmp_path):
    def parse_and_apply(args):
        parse_run_flags(tmp_path, args)
        notes = deployment_settings.apply(FLAGS, learner_flags.validate_flags)
        learner_flags.validate_flags()
        return notes
    yield parse_and_apply
    FLAGS.unparse_flags()


def settings():
    return FLAGS.uql_weight_scheme, FLAGS.uql_quantize_layer_outputs


@pytest.mark.parametrize("learner", ["uniform", "ptq"])
def test_unset_flags_take_the_deployment_settings(apply, learner):
    notes = apply(["--learner=%s" % learner, "--uql_weight_bits=4", "--uql_activation_bits=8"])
    assert settings() == ("symmetric", True)
    assert len(notes) == 1 and notes[0].startswith(
        "deployment settings of nets/model_file_run.py applied: --uql_weight_scheme=symmetric (weights on the grid "
        "int8 kernels store); --uql_quantize_layer_outputs (the input, layer outputs and logits")
    assert learner_flags.quant_config().weight_grid == "symmetric"


def test_a_flag_given_is_kept(apply):
    notes = apply(["--learner=uniform", "--uql_weight_scheme=asymmetric", "--nouql_quantize_layer_outputs"])
    assert settings() == ("asymmetric", False) and notes == []
    notes = apply(["--learner=uniform", "--uql_weight_scheme=asymmetric"])
    assert settings() == ("asymmetric", True)
    assert "--uql_weight_scheme" not in notes[0] and "--uql_quantize_layer_outputs" in notes[0]


@pytest.mark.parametrize("args,kept,reason", [
    # LSQ learns its own signed grid: the symmetric scheme would be refused, so the default stays off.
    (["--uql_weight_range=lsq"], "--uql_weight_scheme=asymmetric, not --uql_weight_scheme=symmetric",
     "--uql_weight_scheme='symmetric' is not valid with weight_range='lsq'"),
    (["--uql_weight_range=ternary", "--uql_weight_bits=2"], "--uql_weight_scheme=asymmetric",
     "not valid with weight_range='ternary'"),
    (["--uql_weight_bits=1"], "--uql_weight_scheme=asymmetric", "--uql_weight_bits=1 is not valid with"),
    (["--uql_act_range=pact"], "--nouql_quantize_layer_outputs, not --uql_quantize_layer_outputs",
     "--uql_act_range=pact learns its ranges"),
    (["--uql_act_range=lsq"], "--nouql_quantize_layer_outputs", "--uql_act_range=lsq learns its ranges"),
])
def test_settings_the_others_exclude_stay_off_with_a_reason(apply, args, kept, reason):
    notes = apply(["--learner=uniform"] + args)
    (note,) = [n for n in notes if n.startswith("deployment setting not applied")]
    assert kept in note and reason in note, note
    assert ("an int8 / ONNX export re-grids" in note) == ("weight_scheme" in kept)
    applied = [n for n in notes if n.startswith("deployment settings of")]
    assert len(applied) == 1  # the other setting still applies


def test_an_explicit_conflict_is_the_usual_one_line_refusal(apply):
    with pytest.raises(UserError) as caught:
        apply(["--learner=uniform", "--uql_weight_scheme=symmetric", "--uql_weight_range=lsq"])
    assert str(caught.value).startswith("--uql_weight_scheme='symmetric' is not valid with weight_range='lsq'")
    with pytest.raises(UserError) as caught:
        apply(["--learner=uniform", "--uql_quantize_layer_outputs", "--uql_act_range=pact"])
    assert str(caught.value).startswith("--uql_quantize_layer_outputs=True is not valid with act_range='pact'")


def test_the_users_own_error_is_raised_unchanged(apply):
    with pytest.raises(UserError) as caught:
        apply(["--learner=uniform", "--batch_size=0"])
    assert str(caught.value) == "--batch_size=0 is not valid; expected a value >= 1"


@pytest.mark.parametrize("args", [["--learner=full-prec"], ["--learner=uniform", "--exec_mode=eval"],
                                  ["--learner=ptq", "--exec_mode=export", "--export_dir=out"]])
def test_other_runs_keep_the_shared_defaults(apply, args):
    assert apply(args) == [] and settings() == ("asymmetric", False)


def test_a_resumed_run_keeps_its_recorded_settings(apply, tmp_path):
    prefix = str(tmp_path / "q" / "model.ckpt")
    os.makedirs(os.path.dirname(prefix))
    # A run recorded before the flag existed (ADDED_LATER: off) with the asymmetric grid, and its checkpoint.
    with open(run_settings.settings_path(prefix), "w") as handle:
        json.dump({"version": 1, "learner": "uniform", "settings": {"uql_weight_scheme": "asymmetric"}}, handle)
    open(prefix + "-3.index", "w").close()
    notes = apply(["--learner=uniform"])
    assert settings() == ("asymmetric", False)
    assert len(notes) == 2 and all(" as recorded by the run it resumes in %s" % (tmp_path / "q") in n for n in notes)
    # Nothing to resume (ptq calibrates afresh): the deployment settings apply.
    assert apply(["--learner=ptq"])[0].startswith("deployment settings of") and settings() == ("symmetric", True)
