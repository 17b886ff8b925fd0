"""Bad flags and data stop a run before training with one clear line on stderr and exit status 2."""
import os

import pytest

from tests.learners.test_end_to_end import run_script


def _error_line(result):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("args,expected", [
    (["--no_such_flag=1"], "Unknown command line flag 'no_such_flag'"),
    (["--learner=uniform", "--uql_weight_bits=17"],
     "--uql_weight_bits=17 is not a valid bit width; expected an integer from 1 to 16, or 32 for float"),
    (["--learner=uniform", "--uql_bucket_size=0"], "--uql_bucket_size=0 is not valid; expected a positive integer"),
    (["--learner=uniform", "--uql_weight_overrides=conv("], "--uql_weight_overrides entry 'conv(' is not valid; "
                                                            "expected 'regex=bits'"),
    (["--learner=uniform", "--uql_weight_overrides=conv(=4"], "--uql_weight_overrides regex 'conv(' is not valid"),
    (["--learner=uniform", "--uql_weight_overrides=conv=4:chanel"],
     "--uql_weight_overrides entry 'conv=4:chanel' is not valid; expected the bits after '='"),
    (["--learner=uniform", "--uql_weight_overrides=conv=4:ternary"],
     "--uql_weight_overrides entry 'conv=4:ternary' is not valid: the ternary grid takes 2 bits, this layer gets 4"),
    (["--learner=uniform", "--uql_layer_bits=4,x"], "--uql_layer_bits=4,x is not valid; expected a comma-separated"),
    (["--learner=magic"], "flag --learner=magic: value should be one of <full-prec|uniform|ptq>"),
    (["--batch_size=0"], "--batch_size=0 is not valid; expected a value >= 1"),
    (["--resnet_size=21"], "resnet_size 21 is not supported; allowed values: 20, 32, 44, 56, 110"),
    (["--data_dir_local=/no/such/dir"], "--data_dir_local=/no/such/dir is not valid; expected an existing directory"),
    (["--learner=uniform", "--exec_mode=eval"], "no quantized checkpoint found in"),
    (["--learner=ptq", "--uql_calib_batches=0"], "--uql_calib_batches=0 is not valid; expected a value >= 1"),
])
def test_bad_flags(tmp_path, args, expected):
    line = _error_line(run_script("resnet_at_fmnist_run.py", args, str(tmp_path)))
    assert expected in line
    assert not os.path.exists(tmp_path / "models") and not os.path.exists(tmp_path / "models_uql")


def test_bad_data_file_names_the_path(tmp_path):
    data = tmp_path / "fmnist"
    data.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        with open("/usr/share/datasets/fashion-mnist/" + name, "rb") as source:
            payload = source.read()
        with open(data / name, "wb") as target:
            target.write(payload[:1000] if name.startswith("t10k-images") else payload)
    line = _error_line(run_script("resnet_at_fmnist_run.py", ["--data_dir_local=%s" % data], str(tmp_path)))
    assert str(data / "t10k-images-idx3-ubyte.gz") in line


def test_missing_cifar_file_names_the_path(tmp_path):
    line = _error_line(run_script("resnet_at_cifar10_run.py", ["--data_dir_local=%s" % tmp_path], str(tmp_path)))
    assert "data_batch_1.bin" in line and str(tmp_path) in line
