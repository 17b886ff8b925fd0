"""--uql_bn_reestimate_batches: after quantized fine-tuning only the moving statistics change, they become the
NumPy moments of each batch norm's input in the quantized inference network, and a model whose moving statistics
are wrong evaluates better after re-estimation."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from learners import bn_reestimation, full_precision
from learners.uniform_quant import UniformQuantLearner
from nets import model_template
from tests.learners.test_ptq import settings_in

tf1 = tf.compat.v1
BATCHES = 3
STATISTICS = ("moving_mean", "moving_variance")
CONFIG = tfquant.QuantConfig(weight_bits=4, activation_bits=4, use_buckets=True, bucket_type="channel")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quantized run with re-estimation; the checkpoint re-estimation started from is captured as it was."""
    helper = model_template.ModelHelper(batch_size=32, batch_size_eval=200, train_subset=1024, eval_subset=400,
                                        nb_epochs_rat=1.0, seed=0)
    directory = str(tmp_path_factory.mktemp("bn"))
    settings = settings_in(directory, uql_bn_reestimate_batches=BATCHES, uql_quant_epochs=0.5, save_step=10000)
    before = {}
    original = bn_reestimation.reestimate

    def capturing(helper_, config_, checkpoint, nb_batches):
        reader = tf.train.load_checkpoint(checkpoint)
        before.update({name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()})
        return original(helper_, config_, checkpoint, nb_batches)

    bn_reestimation.reestimate = capturing
    try:
        results = UniformQuantLearner(helper, settings, CONFIG).train()
    finally:
        bn_reestimation.reestimate = original
    return helper, results, before, directory


def read_all(checkpoint):
    reader = tf.train.load_checkpoint(checkpoint)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()}


def write_checkpoint(values, path):
    """A checkpoint holding exactly `values` (name -> array), written by a Saver of plain variables."""
    with tf.Graph().as_default():
        variables = [tf1.Variable(value, name=name) for name, value in values.items()]
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            return tf1.train.Saver(variables).save(sess, path, write_meta_graph=False, write_state=False)


def inference_inputs(helper, checkpoint, nb_batches):
    """{batch norm scope: its input over the first training batches} in the quantized inference network."""
    graph = tf.Graph()
    with graph.as_default():
        images, _ = helper.build_dataset_train()
        helper.forward_eval(images)
        tfquant.quantize_graph(graph, CONFIG, is_training=False)
        norms = {op.name.rsplit("/", 1)[0]: op.inputs[0] for op in graph.get_operations()
                 if op.type == "FusedBatchNormV3"}
        with tf1.Session() as sess:
            tf1.train.Saver().restore(sess, checkpoint)
            batches = [sess.run(norms) for _ in range(nb_batches)]
    return {scope: np.concatenate([b[scope] for b in batches]) for scope in norms}


def test_only_the_moving_statistics_change_and_they_are_the_inference_moments(trained):
    helper, results, before, _ = trained
    after = read_all(results["quant_checkpoint"])
    assert sorted(after) == sorted(before) and results["bn_reestimation"]["batch_norms"] == 2
    assert results["bn_reestimation"]["not_reestimated"] == []
    changed = sorted(name for name in after if not np.array_equal(np.asarray(after[name]),
                                                                     np.asarray(before[name])))
    assert changed == sorted("model/%s/%s" % (bn, s) for bn in ("bn1", "bn2") for s in STATISTICS)
    inputs = inference_inputs(helper, results["quant_checkpoint"], BATCHES)
    for scope, values in inputs.items():
        flat = values.reshape(-1, values.shape[-1]).astype(np.float64)
        np.testing.assert_allclose(after[_variable(scope, "moving_mean")], flat.mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(after[_variable(scope, "moving_variance")], flat.var(0, ddof=1), rtol=1e-4)


def _variable(scope, statistic):
    # The batch norm op lives at model/bnK/FusedBatchNormV3 (scope model/bnK).
    return scope + "/" + statistic


def test_wrong_moving_statistics_are_repaired(trained, tmp_path):
    helper, results, _, directory = trained
    good = read_all(results["quant_checkpoint"])
    wrong = dict(good)
    for name in good:
        if name.endswith("moving_mean"):
            wrong[name] = np.zeros_like(good[name])  # the initial statistics: as if the averages never moved
        elif name.endswith("moving_variance"):
            wrong[name] = np.ones_like(good[name])
    wrong_path = write_checkpoint(wrong, str(tmp_path / "wrong.ckpt"))
    log_dir = str(tmp_path / "logs")
    wrong_accuracy = full_precision.evaluate_checkpoint(helper, wrong_path, log_dir, CONFIG)[0]
    new_values, _ = bn_reestimation.reestimate(helper, CONFIG, wrong_path, BATCHES)
    repaired_path = write_checkpoint(dict(wrong, **new_values), str(tmp_path / "repaired.ckpt"))
    repaired_accuracy = full_precision.evaluate_checkpoint(helper, repaired_path, log_dir, CONFIG)[0]
    assert repaired_accuracy > wrong_accuracy + 0.1, (wrong_accuracy, repaired_accuracy)
    print("accuracy with wrong statistics %.4f, re-estimated %.4f, the run's %.4f"
          % (wrong_accuracy, repaired_accuracy, results["quant_accuracy"]))
    # Re-estimation does not depend on the statistics it starts from: the same values as the run's own.
    for name, value in new_values.items():
        np.testing.assert_allclose(value, good[name], rtol=1e-5, atol=1e-6)
    assert results["quant_accuracy"] > 0.2  # a model that learned something (10 classes)
