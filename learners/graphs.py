"""One function builds a model graph for a mode (train or eval), float or quantized."""
import dataclasses
import functools
import math
from typing import Any, Dict, List, Optional

import numpy as np
import tensorflow as tf

import tfquant
from learners import distributed, recipes, stopping
from learners.errors import UserError
from tfquant import files

tf1 = tf.compat.v1
TEACHER_SCOPE = "teacher"


@dataclasses.dataclass
class ModelGraph:
    """Everything a learner runs in one tf.Graph."""

    graph: tf.Graph
    is_train: bool
    loss: tf.Tensor
    accuracy: tf.Tensor
    batch_count: tf.Tensor  # examples in the current batch (the last eval batch may be short)
    model_variables: List[tf.Variable]  # what a float checkpoint holds: weights, biases, batch norm
    saver: Any
    init_op: tf.Operation
    report: Optional[tfquant.QuantReport] = None
    train_op: Optional[tf.Operation] = None
    global_step: Optional[tf.Tensor] = None
    lrn_rate: Optional[tf.Tensor] = None
    nb_iters: int = 0
    summary_op: Optional[tf.Tensor] = None
    eval_init_op: Optional[tf.Operation] = None  # starts a pass over the evaluation set
    finite_flags: Optional[tf.Tensor] = None  # bool [n]: variable i of checked_variable_names is all finite
    checked_variable_names: List[str] = dataclasses.field(default_factory=list)
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)


def cosine_lrn_rate(lrn_rate_init, nb_iters):
    """A function global_step -> (cosine-decayed learning rate, nb_iters), for fine-tuning."""
    def setup(global_step):
        progress = tf.minimum(tf.cast(global_step, tf.float32) / float(max(nb_iters, 1)), 1.0)
        return lrn_rate_init * 0.5 * (1.0 + tf.cos(math.pi * progress)), nb_iters
    return setup


def _quant_summaries(graph, report):
    """Per-layer bits and relative L2 error ||Q(w) - w|| / ||w|| of each quantized weight."""
    summaries = []
    for layer in report.weight_layers:
        if layer.input_index is None:
            continue
        tag = layer.weight_variable.replace(":", "_")
        summaries.append(tf1.summary.scalar("quant_bits/" + tag, tf.constant(float(layer.bits))))
        if not layer.quantized:
            continue
        op = graph.get_operation_by_name(layer.name)
        quantized = op.inputs[layer.input_index]
        variable = [v for v in tf1.global_variables() if v.op.name == layer.weight_variable][0]
        error = tf.norm(quantized - variable.read_value()) / (tf.norm(variable.read_value()) + 1e-12)
        summaries.append(tf1.summary.scalar("quant_error/" + tag, error))
    for layer in report.activation_layers:
        summaries.append(tf1.summary.scalar("quant_bits/" + layer.name.replace(":", "_"),
                                            tf.constant(float(layer.bits))))
    # Learned ranges over training: scalars as they are; per-group step sizes as mean and histogram.
    for variable in graph.get_collection(tfquant.ranges.LEARNED_COLLECTION):
        tag = "learned_range/" + variable.op.name
        value = variable.read_value()
        if variable.shape.rank == 0:
            summaries.append(tf1.summary.scalar(tag, value))
        else:
            summaries.append(tf1.summary.scalar(tag + "/mean", tf.reduce_mean(value)))
            summaries.append(tf1.summary.histogram(tag, value))
    return summaries


def distillation_loss(student_logits, teacher_logits, weight, temperature):
    """PocketFlow's distillation loss: weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    Args:
      student_logits, teacher_logits: float [N, classes].
      weight: loss_w_dst.
      temperature: tempr_dst (T > 0); T^2 keeps the gradient scale independent of T.
    Returns:
      the scalar loss, the KL averaged over the batch.
    """
    teacher_log_probs = tf.nn.log_softmax(teacher_logits / temperature)
    student_log_probs = tf.nn.log_softmax(student_logits / temperature)
    kl = tf.reduce_sum(tf.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    return weight * temperature ** 2 * tf.reduce_mean(kl)


def build_teacher(helper, images):
    """The float model's evaluation forward pass under TEACHER_SCOPE, frozen: never trained, no updates.

    Built after quantize_graph, so its ops are not quantized. Returns (logits without gradient,
    {float checkpoint variable name: teacher variable}) for restoring it from the float checkpoint.
    """
    def frozen_getter(getter, *args, **kwargs):
        kwargs["trainable"] = False
        return getter(*args, **kwargs)

    before = {v.op.name for v in tf1.global_variables()}
    with tf1.variable_scope(TEACHER_SCOPE, custom_getter=frozen_getter):
        logits = helper.forward_eval(images)
    prefix = TEACHER_SCOPE + "/"
    variables = {v.op.name[len(prefix):]: v for v in tf1.global_variables() if v.op.name not in before}
    return tf.stop_gradient(logits), variables


def finite_check(graph):
    """(bool vector, variable names sorted): is each float global variable free of NaN and Inf."""
    variables = sorted((v for v in graph.get_collection(tf1.GraphKeys.GLOBAL_VARIABLES)
                        if v.dtype.base_dtype.is_floating), key=lambda v: v.op.name)
    with tf1.name_scope("finite_check"):
        flags = tf.stack([tf.reduce_all(tf.math.is_finite(v.read_value())) for v in variables])
    return flags, [v.op.name for v in variables]


def _build_model(graph, helper, is_train, quant_config, lrn_rate_fn, momentum, skip_batches, distillation,
                 lrn_rate_scale, training_recipes=None):
    """build_graph's model, loss and training step in the current graph (without saver and initializer)."""
    if is_train:
        if skip_batches:
            images, labels = helper.build_dataset_train(skip_batches=skip_batches)
        else:
            images, labels = helper.build_dataset_train()
        logits = helper.forward_train(images)
    else:
        images, labels = helper.build_dataset_eval()
        eval_init_op = helper.eval_init_op
        logits = helper.forward_eval(images)
    model_variables = list(tf1.global_variables())
    report = None
    if quant_config is not None:
        # After the forward pass, before loss gradients: training differentiates the quantized pass.
        report = tfquant.quantize_graph(graph, quant_config, is_training=is_train)
        logits = report.output(logits)
    loss, metrics = recipes.model_loss(helper, labels, logits, tf1.trainable_variables(), report,
                                       training_recipes if is_train else None)
    regularization = tf1.get_collection(tf1.GraphKeys.REGULARIZATION_LOSSES)
    if regularization:
        # PACT's decay on its clip levels (tfquant puts it here).
        loss = loss + tf.add_n(regularization)
    extra = {}
    if "top5_accuracy" in metrics:
        # Models with many classes (ILSVRC-12) also report top-5; evaluate() averages it over the test set.
        extra["top5_accuracy"] = metrics["top5_accuracy"]
    if is_train and distillation is not None:
        teacher_logits, extra["teacher_variables"] = build_teacher(helper, images)
        extra["distillation_loss"] = distillation_loss(logits, teacher_logits, *distillation)
        loss = loss + extra["distillation_loss"]
    if not is_train:
        # Images whose logits hold a NaN or Inf: their argmax is meaningless, so evaluation refuses to score them.
        flat = tf.reshape(logits, [tf.shape(logits)[0], -1])
        extra["nonfinite_images"] = tf.reduce_sum(tf.cast(tf.reduce_any(tf.logical_not(tf.math.is_finite(flat)),
                                                                        axis=1), tf.int32))
    model = ModelGraph(graph=graph, is_train=is_train, loss=loss, accuracy=metrics["accuracy"],
                       batch_count=tf.shape(labels)[0], model_variables=model_variables, saver=None,
                       init_op=None, report=report, eval_init_op=None if is_train else eval_init_op,
                       extra=extra)
    if is_train:
        model.global_step = tf1.train.get_or_create_global_step()
        setup = lrn_rate_fn or helper.setup_lrn_rate
        model.lrn_rate, model.nb_iters = setup(model.global_step)
        if lrn_rate_scale != 1.0:
            model.lrn_rate = model.lrn_rate * lrn_rate_scale
        optimizer = tf1.train.MomentumOptimizer(model.lrn_rate, momentum)
        # Under a distribution strategy the optimizer sums the replicas' gradients (the v1 optimizer divides
        # the loss by the replica count only for Estimator): dividing each replica's loss makes that sum the
        # gradient of the mean loss over the global batch, as one process with the whole batch computes it.
        replicas = tf.distribute.get_replica_context().num_replicas_in_sync
        with tf.control_dependencies(_updates_before_step()):
            model.train_op, recipe_tensors = recipes.minimize(optimizer, loss / replicas if replicas > 1 else loss,
                                                              model.global_step, graph, training_recipes)
        model.train_op, tracker = recipes.track_oscillations(model.train_op, graph, report, training_recipes)
        extra.update(recipe_tensors)
        if tracker is not None:
            extra["oscillation"] = tracker
        summaries = [tf1.summary.scalar("loss", loss), tf1.summary.scalar("accuracy", metrics["accuracy"]),
                     tf1.summary.scalar("lrn_rate", model.lrn_rate)]
        if report is not None:
            summaries.extend(_quant_summaries(graph, report))
        if "distillation_loss" in extra:
            summaries.append(tf1.summary.scalar("distillation_loss", extra["distillation_loss"]))
        summaries.extend(recipes.summaries(extra))
        model.summary_op = tf1.summary.merge(summaries)
        model.finite_flags, model.checked_variable_names = finite_check(graph)
    return model


def _updates_before_step():
    """The ops the training step waits for (GraphKeys.UPDATE_OPS), joined in one NoOp; [] when there are none.

    Every op created under tf.control_dependencies(list) whose inputs come from outside the block (each
    gradient's constants, zeros_like and variable reads: thousands) gets one control input per op of the list.
    With a model's ~100 batch-norm and range updates that was 626,000 control edges on MobileNetV2 x0.35 with
    LSQ (59,000 at W4A4, 9,000 on float ResNet-20), copied by every session.run with new fetches and walked
    by grappler. Waiting on one NoOp that waits on them all orders the same ops the same way with one edge each.
    """
    updates = tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)
    if not updates:
        return []
    return [tf.group(*updates, name="update_ops")]


def _build_replicated(cluster, build):
    """build() as the one replica of this worker under the cluster's strategy; returns its ModelGraph.

    The optimizer all-reduces the gradients (collective ops); variables assigned in the step are
    synchronised (distributed.synchronised_variables); the tensors kept are this worker's.
    """
    logger, level = tf.get_logger(), tf.get_logger().level
    # The strategy warns once per graph that gradients of differently placed variables are reduced one
    # group at a time; with one device per worker that is expected and says nothing to the user.
    logger.setLevel("ERROR")
    try:
        return _build_in_strategy(cluster, build)
    finally:
        logger.setLevel(level)


def _build_in_strategy(cluster, build):
    built = []
    with cluster.strategy.scope(), tf.variable_creator_scope(distributed.synchronised_variables):
        def replica_step():
            built.append(build())
            model = built[0]
            return model.train_op, model.loss, model.accuracy, model.lrn_rate, model.summary_op
        outputs = cluster.strategy.extended.call_for_each_replica(replica_step)
        model = built[0]
        (model.train_op, model.loss, model.accuracy, model.lrn_rate, model.summary_op) = [
            distributed.local_value(cluster, value) for value in outputs]
        model.extra["sync_check"] = distributed.SyncCheck(cluster)
    return model


def build_graph(helper, is_train, quant_config=None, lrn_rate_fn=None, momentum=0.9, seed=0, skip_batches=0,
                distillation=None, cluster=None, lrn_rate_scale=1.0, training_recipes=None):
    """Build the train or eval graph of `helper`'s model, rewritten by tfquant when quant_config is set.

    Args:
      helper: a ModelHelper.
      is_train: training graph (dataset_train, optimizer, summaries) or evaluation graph.
      quant_config: a tfquant.QuantConfig, or None for the float model.
      lrn_rate_fn: global_step -> (learning rate, nb_iters); the helper's schedule when None.
      momentum: optimizer momentum.
      seed: graph-level random seed.
      skip_batches: training graphs start this many batches into the data stream (the step a resumed
        run restarts from), so it sees the batches an uninterrupted run would.
      distillation: None, or (loss_w_dst, tempr_dst) to add the distillation loss of a frozen float
        teacher to a training graph (its variables in model.extra['teacher_variables']).
      cluster: a distributed.Cluster: a training graph is built as this worker's replica (gradients and
        updated statistics all-reduced) with model.extra['sync_check']; None for a single process.
      lrn_rate_scale: factor on the learning-rate schedule (PocketFlow scales it by the number of workers).
      training_recipes: a learners.recipes.Recipes for a quantized training graph (None: none of them).
    Returns:
      a ModelGraph.
    """
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(seed)
        build = functools.partial(_build_model, graph, helper, is_train, quant_config, lrn_rate_fn, momentum,
                                  skip_batches, distillation, lrn_rate_scale, training_recipes)
        if cluster is None or not is_train:
            model = build()
        else:
            model = _build_replicated(cluster, build)
        extra = model.extra
        if model.report is not None:
            # Saved with every quantized checkpoint: eval and export check a report against it. Made outside any
            # distribution strategy (a string cannot be mirrored) and never restored on resume: it records the
            # decisions of the graph that last trained the checkpoint.
            tf1.Variable(tfquant.report.decisions_json(model.report), trainable=False,
                         name=tfquant.report.DECISIONS_VARIABLE)
        # Pruning is training.save_checkpoint's (per prefix, across resumed runs): a Saver only knows the
        # checkpoints it wrote itself. Relative paths keep the state file valid in a copied run directory.
        # The teacher is always restored from the float checkpoint, so checkpoints do not repeat it.
        teacher = {v.op.name for v in extra.get("teacher_variables", {}).values()}
        model.saver = tf1.train.Saver([v for v in tf1.global_variables() if v.op.name not in teacher],
                                      max_to_keep=0, save_relative_paths=True)
        model.init_op = tf1.global_variables_initializer()
    return model


def new_session(graph, cluster=None, optimize_graph=True):
    """A session using both cores; on a cluster, one on this worker's server with the collectives set up.

    optimize_graph=False turns grappler off: for a session that runs many different small subgraphs once or
    a few times each, optimizing each on its first run costs more than it saves.
    """
    config = tf1.ConfigProto(intra_op_parallelism_threads=0, inter_op_parallelism_threads=2)
    config.graph_options.rewrite_options.disable_meta_optimizer = not optimize_graph
    if cluster is None:
        return tf1.Session(graph=graph, config=config)
    return tf1.Session(target=cluster.server.target, graph=graph, config=distributed.session_config(cluster, config))


def restore_variables(sess, variables, checkpoint_path):
    """Restore `variables` from a checkpoint, refusing one from another model with a clear line.

    Args:
      sess: session of the variables' graph.
      variables: the variables to restore (by name), or a dict {name in the checkpoint: variable}.
      checkpoint_path: a checkpoint prefix.
    """
    try:
        reader = tf.train.load_checkpoint(checkpoint_path)
    except (tf.errors.NotFoundError, tf.errors.DataLossError, ValueError) as exc:
        raise UserError("checkpoint %s cannot be read (%s); expected a TensorFlow checkpoint"
                        % (checkpoint_path, files.describe_error(exc)))
    shapes = reader.get_variable_to_shape_map()
    if not isinstance(variables, dict):
        variables = {variable.op.name: variable for variable in variables}
    for name, variable in variables.items():
        if name not in shapes:
            raise UserError("checkpoint %s has no variable %s; expected a checkpoint of this model"
                            % (checkpoint_path, name))
        want = variable.shape.as_list()
        if list(shapes[name]) != want:
            raise UserError("checkpoint %s: variable %s has shape %s, the model expects %s"
                            % (checkpoint_path, name, list(shapes[name]), want))
    tf1.train.Saver(var_list=variables).restore(sess, checkpoint_path)


class NonFiniteLogits(UserError):
    """Some test images gave NaN or Inf logits: no accuracy can be scored from them."""


def evaluate(sess, model, what="the model"):
    """Run the evaluation dataset once; returns (accuracy, loss, number of examples).

    Raises NonFiniteLogits (naming how many test images) when any logit is NaN or Inf: an argmax over them
    would still give a class, and an accuracy scored from it would look like a result. A model whose metrics
    include top-5 accuracy gets its test-set value in model.extra['eval_top5_accuracy'].
    """
    correct = total_loss = correct_top5 = 0.0
    count = nonfinite = 0
    fetches = {"metrics": [model.accuracy, model.loss, model.batch_count]}
    if "nonfinite_images" in model.extra:
        fetches["nonfinite"] = model.extra["nonfinite_images"]
    if "top5_accuracy" in model.extra:
        fetches["top5"] = model.extra["top5_accuracy"]
    sess.run(model.eval_init_op)
    while True:
        # Evaluation writes nothing before it ends, so it can stop between any two batches.
        stopping.check("during evaluation", "saved checkpoints are kept")
        try:
            values = sess.run(fetches)
        except tf.errors.OutOfRangeError:
            break
        accuracy, loss, n = values["metrics"]
        stopping.pause_point("evaluation")
        correct_top5 += float(values["top5"]) * n if "top5" in values else 0.0
        correct += float(accuracy) * n
        total_loss += float(loss) * n
        count += int(n)
        nonfinite += int(values.get("nonfinite", 0))
    if count == 0:
        raise UserError("the evaluation dataset is empty; expected at least one test example")
    if nonfinite:
        raise NonFiniteLogits("%s gives NaN or infinite logits for %d of %d test images, so no accuracy is "
                              "reported; expected finite outputs (check the test data and the checkpoint)"
                              % (what, nonfinite, count))
    if "top5" in fetches:
        model.extra["eval_top5_accuracy"] = correct_top5 / count
    return correct / count, total_loss / count, count


def dataset_arrays(helper, evaluation, limit=None):
    """A ModelHelper's preprocessed images and labels as NumPy arrays, at most `limit` examples.

    Args:
      helper: a ModelHelper.
      evaluation: the evaluation set (one pass) or the training stream.
      limit: stop after this many examples (None: the whole evaluation set).
    Returns:
      (images float32 [N, ...], labels [N]).
    """
    graph = tf.Graph()
    with graph.as_default():
        images, labels = helper.build_dataset_eval() if evaluation else helper.build_dataset_train()
        init = helper.eval_init_op if evaluation else None
    chunks_x, chunks_y, count = [], [], 0
    with tf.compat.v1.Session(graph=graph) as sess:
        if init is not None:
            sess.run(init)
        while limit is None or count < limit:
            try:
                x, y = sess.run([images, labels])
            except tf.errors.OutOfRangeError:
                break
            chunks_x.append(x)
            chunks_y.append(y)
            count += len(y)
    if not chunks_x:
        raise UserError("the data set yielded no images; expected at least one")
    x, y = np.concatenate(chunks_x), np.concatenate(chunks_y)
    return (x[:limit], y[:limit]) if limit else (x, y)
