"""Distillation from the frozen float teacher, learned-range flags, and a run with both through the run
script: checkpoints, resume, TensorBoard scalars, evaluation and export."""
import glob
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from absl import flags

import tfquant
from learners import flags as learner_flags
from learners import graphs
from learners.errors import UserError
from nets import layers
from tests.conftest import new_session
from tests.learners.test_end_to_end import event_tags, run_script

tf1 = tf.compat.v1


def _numpy_distillation(student, teacher, weight, temperature):
    """weight * T^2 * mean KL(softmax(teacher/T) || softmax(student/T)), in float64."""
    def log_softmax(z):
        z = z / temperature
        z = z - z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    log_t, log_s = log_softmax(teacher.astype(np.float64)), log_softmax(student.astype(np.float64))
    return weight * temperature ** 2 * np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=1))


@pytest.mark.parametrize("weight,temperature", [(4.0, 4.0), (1.0, 1.0), (0.5, 2.5)])
def test_distillation_loss_value(rng, weight, temperature):
    student = rng.normal(0, 3, size=[6, 10]).astype(np.float32)
    teacher = rng.normal(0, 3, size=[6, 10]).astype(np.float32)
    graph = tf.Graph()
    with graph.as_default():
        loss = graphs.distillation_loss(tf.constant(student), tf.constant(teacher), weight, temperature)
        same = graphs.distillation_loss(tf.constant(teacher), tf.constant(teacher), weight, temperature)
    with new_session(graph) as sess:
        value, zero = sess.run([loss, same])
    assert value == pytest.approx(_numpy_distillation(student, teacher, weight, temperature), rel=1e-5)
    assert value > 0 and abs(zero) < 1e-6


class TinyHelper:
    """A conv-bn-relu-dense classifier on fixed random data: enough of a ModelHelper for build_graph."""

    n_train, batch_size = 16, 16

    def __init__(self):
        data = np.random.default_rng(3)
        self.images = data.normal(size=[16, 8, 8, 1]).astype(np.float32)
        self.labels = data.integers(0, 4, size=16)

    def build_dataset_train(self, skip_batches=0):
        return tf.constant(self.images), tf.constant(self.labels)

    def _forward(self, images, is_training):
        with tf1.variable_scope("model", reuse=tf1.AUTO_REUSE):
            x = tf.nn.relu(layers.batch_norm(layers.conv2d(images, 4, 3, 1, "conv1"), is_training, "bn1"))
            x = tf.nn.relu(layers.conv2d(x, 6, 3, 1, "conv2"))
            return layers.dense(layers.flatten(x), 4, "fc")

    def forward_train(self, images):
        return self._forward(images, True)

    def forward_eval(self, images):
        return self._forward(images, False)

    def calc_loss(self, labels, logits, trainable_vars):
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        return loss, {"accuracy": tf.reduce_mean(tf.cast(tf.equal(tf.argmax(logits, 1), labels), tf.float32)),
                      "cross_entropy": loss}

    def setup_lrn_rate(self, global_step):
        return tf.constant(0.05), 3


@pytest.fixture
def float_checkpoint(tmp_path):
    """A float checkpoint of TinyHelper's model (random weights, non-trivial batch-norm statistics)."""
    helper = TinyHelper()
    graph = tf.Graph()
    with graph.as_default():
        helper.forward_eval(tf.constant(helper.images))
        variables = tf1.global_variables()
        with new_session(graph) as sess:
            sess.run(tf1.global_variables_initializer())
            for variable in variables:
                if "moving" in variable.op.name:
                    variable.load(np.random.default_rng(1).uniform(0.5, 1.5, variable.shape), sess)
            path = tf1.train.Saver().save(sess, str(tmp_path / "float" / "model.ckpt"))
    return path


def test_teacher_frozen_beside_quantized_student(tmp_path, float_checkpoint):
    helper = TinyHelper()
    config = tfquant.QuantConfig(weight_bits=2, activation_bits=2, quantize_all_layers=True, weight_range="lsq",
                                 act_range="pact")
    model = graphs.build_graph(helper, True, quant_config=config, distillation=(4.0, 2.0))
    teacher = model.extra["teacher_variables"]
    graph = model.graph
    with graph.as_default():
        assert sorted(teacher) == sorted(v.op.name for v in model.model_variables)
        assert all(v.op.name == graphs.TEACHER_SCOPE + "/" + name for name, v in teacher.items())
        trainable = {v.op.name for v in tf1.trainable_variables()}
        assert not trainable & {v.op.name for v in teacher.values()}
        assert "model/conv1/weights_quant/lsq_step" in trainable and "model/Relu/act_quant/pact_alpha" in trainable
        # never quantized, no batch-norm updates, not in the student's checkpoints
        teacher_ops = [op for op in graph.get_operations() if op.name.startswith(graphs.TEACHER_SCOPE + "/")]
        assert teacher_ops and not [op for op in teacher_ops if op.type == "Round" or "quant" in op.name]
        assert not [op for op in tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
                    if op.name.startswith(graphs.TEACHER_SCOPE + "/")]
        student_logits = graph.get_operation_by_name("model/fc/BiasAdd").outputs[0]
        teacher_logits = graph.get_operation_by_name(graphs.TEACHER_SCOPE + "/model/fc/BiasAdd").outputs[0]
        ce = model.loss - model.extra["distillation_loss"]
    float_values = {name: tf.train.load_checkpoint(float_checkpoint).get_tensor(name) for name in teacher}
    with new_session(graph) as sess:
        sess.run(model.init_op)
        graphs.restore_variables(sess, model.model_variables, float_checkpoint)
        graphs.restore_variables(sess, teacher, float_checkpoint)
        student, teacher_out, dst, regularized = sess.run(
            [student_logits, teacher_logits, model.extra["distillation_loss"], ce])
        for _ in range(3):
            sess.run(model.train_op)
        after = sess.run({name: v for name, v in teacher.items()})
        student_after = sess.run(model.model_variables[0])
        saved = model.saver.save(sess, str(tmp_path / "quant" / "model.ckpt"))
    saved_names = set(tf.train.load_checkpoint(saved).get_variable_to_shape_map())
    assert "model/conv1/weights_quant/lsq_step" in saved_names
    assert not [name for name in saved_names if name.startswith(graphs.TEACHER_SCOPE + "/")]
    assert dst == pytest.approx(_numpy_distillation(student, teacher_out, 4.0, 2.0), rel=1e-5)
    assert regularized > 0
    for name, value in after.items():
        assert np.array_equal(value, float_values[name]), name  # never trained, no update ops
    assert not np.array_equal(student_after, float_values[model.model_variables[0].op.name])
    # the teacher is the float model in evaluation mode
    float_graph = tf.Graph()
    with float_graph.as_default():
        logits = helper.forward_eval(tf.constant(helper.images))
        with new_session(float_graph) as sess:
            tf1.train.Saver().restore(sess, float_checkpoint)
            np.testing.assert_allclose(teacher_out, sess.run(logits), rtol=1e-5, atol=1e-5)


@pytest.fixture
def parse():
    """Parse run-script flags into the global FLAGS for one test, then restore the defaults."""
    learner_flags.define_flags()

    def apply(args):
        learner_flags.FLAGS.unparse_flags()
        learner_flags.FLAGS(["prog"] + args)
        learner_flags.validate_flags()
        return learner_flags.quant_config()
    yield apply
    learner_flags.FLAGS.unparse_flags()


@pytest.mark.parametrize("args,expected", [
    (["--uql_pact_decay=-0.1"], "--uql_pact_decay=-0.1 is not valid; expected a finite number >= 0"),
    (["--uql_pact_decay=inf"], "--uql_pact_decay=inf is not valid; expected a finite number"),
    (["--learner=uniform", "--loss_w_dst=-1"], "--loss_w_dst=-1.0 is not valid; expected a finite number >= 0"),
    (["--learner=uniform", "--tempr_dst=0"], "--tempr_dst=0.0 is not valid; expected a finite number > 0"),
    (["--learner=uniform", "--tempr_dst=nan"], "--tempr_dst=nan is not valid; expected a finite number"),
    (["--enbl_dst"], "--enbl_dst is not valid with --learner=full-prec; expected --learner=uniform"),
    (["--uql_weight_range=lsq", "--uql_weight_bits=1"],
     "--uql_weight_bits=1 is not valid with weight_range='lsq'; expected 2 to 16 bits, or 32"),
])
def test_bad_learned_range_and_distillation_flags(tmp_path, monkeypatch, parse, args, expected):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as raised:
        parse(args)
    assert str(raised.value).startswith(expected) and "\n" not in str(raised.value)


@pytest.mark.parametrize("flag", ["--uql_act_range=minmax", "--uql_weight_range=pact"])
def test_unknown_range_names_rejected(tmp_path, monkeypatch, parse, flag):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(flags.Error, match=r"value should be one of <(ema\|batch\|pact\|lsq|minmax\|lsq\|ternary\|binary)>"):
        parse([flag])


def test_good_flags_reach_the_config(tmp_path, monkeypatch, parse):
    monkeypatch.chdir(tmp_path)
    config = parse(["--learner=uniform", "--uql_act_range=lsq", "--uql_weight_range=lsq", "--enbl_dst",
                    "--loss_w_dst=0", "--tempr_dst=2"])
    assert (config.act_range, config.weight_range) == ("lsq", "lsq")
    assert learner_flags.FLAGS.enbl_dst and learner_flags.FLAGS.loss_w_dst == 0.0
    assert parse(["--learner=uniform", "--uql_act_range=pact", "--uql_pact_decay=0"]).pact_decay == 0.0


QUICK = ["--train_subset=256", "--eval_subset=128", "--batch_size=32", "--batch_size_eval=64",
         "--nb_epochs_rat=0.02", "--summ_step=1", "--learner=uniform", "--uql_weight_bits=2",
         "--uql_activation_bits=2", "--uql_use_buckets", "--uql_weight_range=lsq", "--uql_act_range=pact",
         "--enbl_dst"]


def test_run_script_learned_ranges_with_distillation(tmp_path):
    cwd = str(tmp_path)
    flags = QUICK + ["--uql_quant_epochs=0.5", "--save_step=2"]
    first = run_script("convnet_at_fmnist_run.py", flags, cwd)
    assert first.returncode == 0, first.stderr[-3000:]
    # An interrupted run: only the step-2 checkpoint survives; the same command resumes from it.
    for name in glob.glob(os.path.join(cwd, "models_uql", "model.ckpt-4.*")):
        os.remove(name)
    resumed = run_script("convnet_at_fmnist_run.py", flags, cwd)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr and "at step 2 of 4" in resumed.stdout + resumed.stderr
    results = json.load(open(os.path.join(cwd, "models_uql", "results.json")))
    reader = tf.train.load_checkpoint(os.path.join(cwd, results["quant_checkpoint"]))
    names = reader.get_variable_to_shape_map()
    assert not [name for name in names if name.startswith(graphs.TEACHER_SCOPE + "/")]
    report = tfquant.QuantReport.from_json(open(results["report"]).read())
    learned = [name for layer in report.layers for name in layer.range_variables or ()]
    assert any(name.endswith("/pact_alpha") for name in learned) and any(name.endswith("/lsq_step")
                                                                           for name in learned)
    for name in learned:
        # counted 4 steps across the resume: initialised once, on the first step of the first run
        assert reader.get_tensor(name.rpartition("/")[0] + "/init_steps") == 4, name
        assert np.all(np.isfinite(reader.get_tensor(name))) and np.all(reader.get_tensor(name) != 0), name
    tags, _ = event_tags(os.path.join(cwd, "logs", "uniform", "train"))
    # Steps 1-4 of the first run, then steps 3-4 again after resuming from the step-2 checkpoint.
    assert len(tags["distillation_loss"]) == 6 and all(v > 0 for v in tags["distillation_loss"])
    alpha_tag = "learned_range/model/Relu/act_quant/pact_alpha"
    assert len(tags[alpha_tag]) == 6
    assert tags[alpha_tag][-1] == pytest.approx(float(reader.get_tensor("model/Relu/act_quant/pact_alpha")),
                                                rel=0.05)
    assert "learned_range/model/conv2/weights_quant/lsq_step/mean" in tags

    evaluated = run_script("convnet_at_fmnist_run.py", QUICK + ["--exec_mode=eval"], cwd)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "accuracy %.4f" % results["quant_accuracy"] in evaluated.stdout
