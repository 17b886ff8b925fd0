"""A flag that takes effect only with another flag's setting is refused without it, instead of being ignored."""
import pytest

from learners import flags as learner_flags
from learners.errors import UserError
from tests.learners.test_bad_input import _error_line
from tests.learners.test_end_to_end import run_script

FLAGS = learner_flags.FLAGS


def parse_run_flags(tmp_path, args):
    """Parse a run script's flags afresh, its output paths under tmp_path (not validated)."""
    learner_flags.define_flags()
    FLAGS.unparse_flags()
    FLAGS(["prog", "--save_path=%s/m/model.ckpt" % tmp_path, "--uql_save_quant_model_path=%s/q/model.ckpt"
           % tmp_path, "--log_dir=%s/logs" % tmp_path] + args)


@pytest.fixture
def validate(tmp_path):
    def parse_and_validate(args):
        parse_run_flags(tmp_path, args)
        learner_flags.validate_flags()
    yield parse_and_validate
    FLAGS.unparse_flags()


@pytest.mark.parametrize("args,flag,setting", [
    (["--learner=uniform", "--export_dir=out"], "--export_dir=out", "--exec_mode=export"),
    (["--learner=uniform", "--export_int8"], "--export_int8=True", "--exec_mode=export"),
    (["--learner=uniform", "--export_onnx"], "--export_onnx=True", "--exec_mode=export"),
    (["--learner=uniform", "--loss_w_dst=2"], "--loss_w_dst=2.0", "--enbl_dst"),
    (["--learner=uniform", "--tempr_dst=2"], "--tempr_dst=2.0", "--enbl_dst"),
    (["--learner=uniform", "--uql_bucket_type=split"], "--uql_bucket_type=split", "--uql_use_buckets"),
    (["--learner=uniform", "--uql_bucket_size=64"], "--uql_bucket_size=64",
     "--uql_use_buckets --uql_bucket_type=split or block"),
    (["--learner=uniform", "--uql_use_buckets", "--uql_bucket_size=64"], "--uql_bucket_size=64",
     "--uql_use_buckets --uql_bucket_type=split or block"),
    (["--learner=uniform", "--uql_act_range=pact", "--uql_ema_decay=0.9"], "--uql_ema_decay=0.9",
     "--uql_act_range=ema"),
    (["--learner=uniform", "--uql_pact_decay=0.1"], "--uql_pact_decay=0.1", "--uql_act_range=pact"),
    (["--learner=uniform", "--uql_freeze_bn_delay=100"], "--uql_freeze_bn_delay=100", "--uql_fold_batch_norms"),
    (["--learner=ptq", "--uql_calib_percentile=99"], "--uql_calib_percentile=99.0", "--uql_calibrator=percentile"),
])
def test_flag_without_the_setting_it_needs_is_one_line(validate, args, flag, setting):
    with pytest.raises(UserError) as caught:
        validate(args)
    assert str(caught.value) == ("%s has no effect without %s; expected %s with it, or the flag left out"
                                 % (flag, setting, setting))


@pytest.mark.parametrize("args", [
    ["--learner=uniform", "--exec_mode=export", "--export_dir=out", "--export_int8", "--export_onnx"],
    ["--learner=uniform", "--enbl_dst", "--loss_w_dst=2", "--tempr_dst=3"],
    ["--learner=uniform", "--uql_use_buckets", "--uql_bucket_type=split", "--uql_bucket_size=64"],
    ["--learner=uniform", "--uql_ema_decay=0.9"],  # ema is the default range
    ["--learner=uniform", "--uql_act_range=pact", "--uql_pact_decay=0"],
    ["--learner=uniform", "--uql_fold_batch_norms", "--uql_freeze_bn_delay=5"],
    ["--learner=ptq", "--uql_calibrator=percentile", "--uql_calib_percentile=99", "--uql_calib_batches=2"],
    # Flags of another learner pass: one flag set may serve the float run and the quantized runs after it.
    ["--learner=full-prec", "--uql_weight_bits=2", "--uql_quant_epochs=0.5", "--uql_calib_batches=2"],
    ["--learner=uniform", "--uql_calibrator=mse"],
    ["--learner=uniform", "--uql_use_buckets", "--uql_bucket_type=channel"],
])
def test_flags_with_their_setting_pass(validate, args):
    validate(args)


def test_defaults_are_not_given_flags(validate):
    # Settings under which the dependent flags do not apply, with every one of them left at its default.
    validate(["--learner=ptq", "--uql_act_range=lsq", "--uql_calibrator=mse"])


def test_run_script_refuses_an_ignored_flag_before_training(tmp_path):
    line = _error_line(run_script("convnet_at_fmnist_run.py", ["--learner=uniform", "--uql_freeze_bn_delay=10"],
                                  str(tmp_path)))
    assert line == ("error: --uql_freeze_bn_delay=10 has no effect without --uql_fold_batch_norms; expected "
                    "--uql_fold_batch_norms with it, or the flag left out")
    assert not (tmp_path / "models").exists() and not (tmp_path / "models_uql").exists()


@pytest.mark.parametrize("script,args,expected", [
    ("convnet_at_fmnist_run.py", ["--keras_model=model.h5"],
     "error: --keras_model=model.h5 has no effect with the convnet_at_fmnist run script; expected "
     "nets/keras_model_run.py for a Keras model, or the flag left out"),
    ("resnet_at_fmnist_run.py", ["--dataset=fmnist"], "error: --dataset=fmnist has no effect with the "
                                                      "resnet_at_fmnist run script"),
    ("resnet_at_fmnist_run.py", ["--keras_unsafe"], "error: --keras_unsafe=True has no effect with the "
                                                    "resnet_at_fmnist run script"),
    ("convnet_at_fmnist_run.py", ["--resnet_size=32"],
     "error: --resnet_size=32 has no effect with the convnet_at_fmnist run script; expected a ResNet run script, "
     "or the flag left out"),
    ("keras_model_run.py", ["--resnet_size=32", "--keras_model=model.h5", "--dataset=fmnist"],
     "error: --resnet_size=32 has no effect with nets/keras_model_run.py"),
])
def test_flags_of_another_run_script_are_refused(tmp_path, script, args, expected):
    line = _error_line(run_script(script, args, str(tmp_path)))
    assert line.startswith(expected)
    assert not (tmp_path / "models").exists()


def test_resnet_size_with_a_resnet_script_passes_the_check():
    from learners import helper_factory
    FLAGS.unparse_flags()
    learner_flags.define_flags()
    FLAGS(["prog", "--resnet_size=32"])
    try:
        helper_factory._refuse_flags_of_other_scripts(FLAGS, "resnet_at_fmnist")
        with pytest.raises(UserError, match="--resnet_size=32 has no effect with the convnet_at_fmnist run script"):
            helper_factory._refuse_flags_of_other_scripts(FLAGS, "convnet_at_fmnist")
    finally:
        FLAGS.unparse_flags()
