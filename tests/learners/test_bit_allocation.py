"""--uql_auto_bits: flag validation, a tiny ConvNet run whose stored allocation fits its budget and is reused by
a resumed run and by evaluation, and reproducibility of the allocation from the same seed and checkpoint."""
import json
import math
import re
import types

import numpy as np
import pytest
import tensorflow as tf

from learners import bit_allocation
from learners import flags as learner_flags
from learners.errors import UserError
from nets.convnet_at_fmnist import ModelHelper
from tests.learners.test_end_to_end import run_script

tf1 = tf.compat.v1

FLAGS = learner_flags.FLAGS


@pytest.fixture
def parse():
    learner_flags.define_flags()

    def parse_and_validate(args, tmp):
        FLAGS.unparse_flags()
        FLAGS(["prog", "--save_path=%s/m/model.ckpt" % tmp, "--uql_save_quant_model_path=%s/q/model.ckpt" % tmp,
               "--log_dir=%s/logs" % tmp] + args)
        learner_flags.validate_flags()
    yield parse_and_validate
    FLAGS.unparse_flags()


AUTO = ["--learner=uniform", "--uql_auto_bits"]


@pytest.mark.parametrize("args,expected", [
    (["--learner=uniform", "--uql_enbl_rl_agent"], "--uql_enbl_rl_agent is not available: tfquant has no RL agent; "
                                                    "expected --uql_auto_bits"),
    (AUTO + ["--uql_equivalent_bits=1.5"], "--uql_equivalent_bits=1.5 is below --uql_w_bit_min=2: no weight "
                                            "allocation fits"),
    (AUTO + ["--uql_w_bit_min=6", "--uql_w_bit_max=4", "--uql_equivalent_bits=5"],
     "--uql_w_bit_min=6 is above --uql_w_bit_max=4; expected min <= max"),
    (AUTO + ["--uql_equivalent_bits=9"], "--uql_equivalent_bits=9.0 is above --uql_w_bit_max=8"),
    (AUTO + ["--uql_w_bit_max=17", "--uql_equivalent_bits=4"], "--uql_w_bit_max=17 is not valid; expected an integer "
                                                              "from 1 to 16"),
    (["--learner=uniform", "--uql_a_equivalent_bits=3"], "--uql_a_equivalent_bits=3.0 is given without "
                                                         "--uql_auto_bits"),
    (AUTO + ["--uql_a_equivalent_bits=1"], "--uql_a_equivalent_bits=1.0 is below --uql_a_bit_min=2"),
    (AUTO + ["--uql_a_equivalent_bits=3", "--uql_a_bit_min=4"], "--uql_a_equivalent_bits=3.0 is below "
                                                                "--uql_a_bit_min=4"),
    (AUTO + ["--uql_layer_bits=4,4,4,4"], "--uql_layer_bits=4,4,4,4 is given with --uql_auto_bits"),
    (AUTO + ["--uql_weight_overrides=.*=4"], "--uql_weight_overrides=.*=4 is given with --uql_auto_bits"),
    (["--uql_auto_bits"], "--uql_auto_bits is not valid with --learner=full-prec"),
    (AUTO + ["--uql_weight_range=lsq", "--uql_w_bit_min=1", "--uql_equivalent_bits=2"],
     "--uql_w_bit_min=1 is not valid with --uql_weight_range=lsq"),
    (AUTO + ["--uql_sensitivity_batches=0"], "--uql_sensitivity_batches=0 is not valid"),
    (AUTO + ["--uql_w_measured_widths=-1"], "--uql_w_measured_widths=-1 is not valid; expected 0"),
    (["--learner=uniform", "--uql_w_measured_widths=3"], "--uql_w_measured_widths=3 is given without --uql_auto_bits"),
    (AUTO + ["--uql_a_measured_widths=3"], "--uql_a_measured_widths=3 is given without --uql_a_equivalent_bits"),
    # Flags only the allocation reads are refused without it rather than ignored.
    (["--learner=uniform", "--uql_equivalent_bits=3"], "--uql_equivalent_bits=3.0 is given without --uql_auto_bits"),
    (["--learner=uniform", "--uql_w_bit_min=3"], "--uql_w_bit_min=3 is given without --uql_auto_bits"),
    (["--learner=uniform", "--uql_w_bit_max=4"], "--uql_w_bit_max=4 is given without --uql_auto_bits"),
    (["--learner=uniform", "--uql_sensitivity_batches=4"], "--uql_sensitivity_batches=4 is given without "
                                                            "--uql_auto_bits"),
    (["--learner=uniform", "--uql_a_bit_max=4"], "--uql_a_bit_max=4 is given without --uql_auto_bits"),
    (AUTO + ["--uql_a_bit_min=3"], "--uql_a_bit_min=3 is given without --uql_a_equivalent_bits"),
    (AUTO + ["--uql_a_bit_max=4"], "--uql_a_bit_max=4 is given without --uql_a_equivalent_bits"),
])
def test_flag_validation(parse, tmp_path, args, expected):
    with pytest.raises(UserError) as caught:
        parse(args, tmp_path)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_valid_budgets_pass(parse, tmp_path):
    parse(AUTO + ["--uql_equivalent_bits=2", "--uql_a_equivalent_bits=2.5"], tmp_path)
    parse(AUTO + ["--uql_equivalent_bits=8", "--uql_w_bit_min=8"], tmp_path)
    parse(AUTO + ["--uql_equivalent_bits=3", "--uql_a_equivalent_bits=3", "--uql_a_bit_min=3", "--uql_a_bit_max=4",
                  "--uql_sensitivity_batches=2"], tmp_path)
    parse(["--learner=uniform", "--uql_weight_bits=4"], tmp_path)  # defaults of the allocation flags are not "given"


def test_rl_agent_is_one_error_line(tmp_path):
    result = run_script("convnet_at_fmnist_run.py", ["--learner=uniform", "--uql_enbl_rl_agent"], str(tmp_path))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --uql_enbl_rl_agent")


RUN = ["--learner=uniform", "--train_subset=128", "--eval_subset=64", "--batch_size=32", "--batch_size_eval=64",
       "--nb_epochs_rat=0.02", "--uql_quant_epochs=0.5", "--summ_step=2", "--uql_activation_bits=8",
       "--uql_auto_bits", "--uql_equivalent_bits=3", "--uql_a_equivalent_bits=4", "--seed=3"]


def _settings(tmp_path):
    return types.SimpleNamespace(seed=3, uql_sensitivity_batches=1, uql_w_measured_widths=4, uql_a_measured_widths=2,
                                 uql_equivalent_bits=3.0, uql_w_bit_min=2,
                                 uql_w_bit_max=8, uql_a_equivalent_bits=4.0, uql_a_bit_min=2, uql_a_bit_max=8,
                                 uql_save_quant_model_path=str(tmp_path / "models_uql" / "model.ckpt"),
                                 log_dir=str(tmp_path / "logs"))


def test_run_stores_allocation_and_resume_and_eval_reuse_it(tmp_path):
    first = run_script("convnet_at_fmnist_run.py", RUN, str(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "measuring layer sensitivities" in first.stdout
    stored_path = tmp_path / "models_uql" / "bit_allocation.json"
    stored = json.loads(stored_path.read_text())
    report = json.loads((tmp_path / "models_uql" / "quant_report.json").read_text())
    assert report["allocation"] == stored
    checkpoint = tf.train.latest_checkpoint(str(tmp_path / "models_uql"))
    shapes = tf.train.load_checkpoint(checkpoint).get_variable_to_shape_map()
    bits_by_op = {layer["name"]: layer["bits"] for layer in report["layers"]}
    # The ConvNet's inner weights (conv2, fc3) are allocated; conv1 and fc4 stay float outside the budget.
    weights = stored["weight"]
    assert [layer["name"] for layer in weights["layers"]] == ["model/conv2/weights", "model/fc3/weights"]
    total = 0
    for layer in weights["layers"]:
        assert layer["size"] == int(np.prod(shapes[layer["name"]]))
        assert all(bits_by_op[op] == layer["bits"] for op in layer["ops"])
        total += layer["size"]
    used = sum(layer["bits"] * layer["size"] for layer in weights["layers"])
    assert used == weights["used_bits"] <= math.floor(3 * total) == weights["budget_bits"]
    assert weights["mean_bits"] == pytest.approx(used / total)
    acts = stored["activation"]
    act_used = sum(layer["bits"] * layer["size"] for layer in acts["layers"])
    assert act_used == acts["used_bits"] <= math.floor(4 * sum(layer["size"] for layer in acts["layers"]))
    assert all(bits_by_op[layer["name"]] == layer["bits"] for layer in acts["layers"])
    assert all(bits_by_op[name] == 32 for name in ("model/conv1/Conv2D", "model/fc4/MatMul"))
    assert stored["search_seconds"] > 0 and "auto bits (weight): budget 3.0" in first.stdout

    # Same seed and float checkpoint: the same sensitivities and bits, measured again in this process.
    settings = _settings(tmp_path)
    helper = ModelHelper(batch_size=32, batch_size_eval=64, nb_epochs_rat=0.02, train_subset=128, eval_subset=64,
                         seed=3)
    float_checkpoint = tf.train.latest_checkpoint(str(tmp_path / "models"))
    config = learner_flags.tfquant.QuantConfig(activation_bits=8)
    again = bit_allocation.measure_and_solve(helper, settings, config, float_checkpoint)
    for kind in ("weight", "activation"):
        assert [layer["bits"] for layer in again[kind]["layers"]] == [layer["bits"] for layer in stored[kind]["layers"]]
        for mine, theirs in zip(again[kind]["layers"], stored[kind]["layers"]):
            for bits, value in theirs["measured"].items():
                assert mine["measured"][bits] == pytest.approx(value, rel=1e-4, abs=1e-6)

    # A stored allocation over its budget is refused, naming the file.
    over = json.loads(json.dumps(stored))
    over["weight"]["layers"][1]["bits"] = 8
    stored_path.write_text(json.dumps(over))
    with pytest.raises(UserError, match=re.escape(str(stored_path)) + ".*the budget is"):
        bit_allocation.allocate(helper, settings, config, float_checkpoint, resuming=True)

    # A resumed run reads the stored allocation (here edited to another allocation within budget) instead of
    # measuring again, and evaluation replays the bits of the report.
    edited = json.loads(json.dumps(stored))
    edited["weight"]["layers"][0]["bits"] = 2 if stored["weight"]["layers"][0]["bits"] != 2 else 3
    assert sum(l["bits"] * l["size"] for l in edited["weight"]["layers"]) <= weights["budget_bits"]  # noqa: E741
    stored_path.write_text(json.dumps(edited))
    second = run_script("convnet_at_fmnist_run.py", RUN, str(tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "reusing the bit allocation" in second.stdout and "measuring" not in second.stdout
    report = json.loads((tmp_path / "models_uql" / "quant_report.json").read_text())
    conv2 = [layer for layer in report["layers"] if layer["name"] == "model/conv2/Conv2D"][0]
    assert conv2["bits"] == edited["weight"]["layers"][0]["bits"]
    # The first run had already finished, so its checkpoint was trained with the original bits: evaluation
    # refuses the rewritten report rather than evaluate that checkpoint at the edited bits.
    evaluated = run_script("convnet_at_fmnist_run.py", RUN + ["--exec_mode=eval"], str(tmp_path))
    assert evaluated.returncode == 2, evaluated.stderr[-3000:]
    assert "measuring" not in evaluated.stdout
    assert "does not match this checkpoint's model: layer 1 (model/conv2/Conv2D) has bits %d in the report" % (
        edited["weight"]["layers"][0]["bits"]) in evaluated.stderr, evaluated.stderr[-3000:]


def test_measuring_graph_reads_fed_batches_of_the_seeded_stream():
    """The sensitivity batches are the seeded training stream's first batches, read in a graph of their own;
    the measuring graph holds the model on placeholders of the same shapes and no input pipeline (closing a
    session over a running pipeline took seconds of the search)."""
    helper = ModelHelper(batch_size=16, batch_size_eval=64, train_subset=64, eval_subset=64, seed=5)
    batches = bit_allocation._training_batches(helper, 5, 2)
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(5)
        images, labels = helper.build_dataset_train()
    with tf1.Session(graph=graph) as sess:
        for image_values, label_values in batches:
            expected_images, expected_labels = sess.run([images, labels])
            np.testing.assert_array_equal(image_values, expected_images)
            np.testing.assert_array_equal(label_values, expected_labels)
    model, images, labels, _ = bit_allocation._float_model(helper, batches[0])
    assert images.shape.as_list() == list(batches[0][0].shape) and labels.shape.as_list() == [16]
    kinds = {op.type for op in model.get_operations()}
    assert not kinds & {"OneShotIterator", "IteratorV2", "IteratorGetNext", "MakeIterator"}, kinds
    # The search reads them in a thread while the model is built: the same batches, the same placeholders.
    overlapped, (model, images, labels, _) = bit_allocation._batches_and_float_model(helper, 5, 2)
    for (image_values, label_values), (expected_images, expected_labels) in zip(overlapped, batches):
        np.testing.assert_array_equal(image_values, expected_images)
        np.testing.assert_array_equal(label_values, expected_labels)
    assert len(overlapped) == 2 and images.shape.as_list() == list(batches[0][0].shape)
    assert labels.dtype == tf.int64 and labels.shape.as_list() == [16]
