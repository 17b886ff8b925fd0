"""AdaRound's optimisation as a quadratic problem: each layer's output error through the Gram matrix of its inputs.

A weight layer is linear in its weight, so its output error with weights W~ against W on inputs x is
    (1/M) sum over the M input rows r of |D^T x_r|^2 = (1/M) trace(D^T G D),  D = W~ - W,  G = sum_r x_r x_r^T
once the weight is seen as a [K, C] matrix (or B of them: a depthwise conv is one per input channel) and the inputs
as rows of K values (a conv's patches). G is computed once per layer (one matmul over the calibration inputs); the
optimisation then costs a [K, K] x [K, C] product per iteration, whatever the number of examples, and uses the exact
gradient over every calibration input rather than a sampled batch. The iterations (Adam, as TF's AdamOptimizer)
run inside one session call (two tf.while_loops: the warm start, then the annealed regulariser) of one graph of
any shape, built once and reused for every layer. When a layer has more input rows than it needs, G is over a
fixed-seed random subset of them, and a conv gathers just those patches from its input (view_gram).
"""
import dataclasses
import math

import numpy as np
import tensorflow as tf

tf1 = tf.compat.v1
ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (Louizos et al.), as in the paper
ADAM_BETA1, ADAM_BETA2, ADAM_EPSILON = 0.9, 0.999, 1e-8  # TF's AdamOptimizer defaults


@dataclasses.dataclass
class LinearView:
    """How one weight layer is a batch of matrix products: input rows [B, M, K] times weight matrices [B, K, C].

    rows: a function of the layer's data input (a tensor) giving its rows [B, M, K] (ops in the input's graph).
    order: [B, K, C] int64, the flat index in the weight tensor of each matrix element.
    sampled_rows: None, or a function (data input, max_rows, seed) giving the rows [B, M', K] that
      gram(rows(input), max_rows, seed) keeps, computed without the others, or None when it cannot (a conv's
      whose input sizes are not static): view_gram uses it.
    """

    rows: object
    order: np.ndarray
    sampled_rows: object = None

    def to_matrix(self, weight):
        """The weight (NumPy, the layer's shape) as its [B, K, C] matrices."""
        return np.asarray(weight).ravel()[self.order]

    def from_matrix(self, matrix, shape):
        """The weight tensor of `shape` whose matrices are `matrix` [B, K, C]."""
        matrix = np.asarray(matrix)
        flat = np.empty(self.order.size, matrix.dtype)
        flat[self.order.ravel()] = matrix.ravel()
        return flat.reshape(shape)


def _attr(op, name, default=None):
    try:
        return op.get_attr(name)
    except ValueError:
        return default


def _nhwc(op, inputs):
    """(inputs NHWC with any explicit padding applied, strides, dilations, "SAME" or "VALID") of a conv op."""
    data_format = (_attr(op, "data_format", b"NHWC") or b"NHWC").decode()
    strides, dilations = list(op.get_attr("strides")), list(_attr(op, "dilations", [1, 1, 1, 1]))
    padding = op.get_attr("padding").decode()
    explicit = list(_attr(op, "explicit_paddings", []) or [])
    if data_format == "NCHW":
        inputs = tf.transpose(inputs, [0, 2, 3, 1])
        strides, dilations = [strides[i] for i in (0, 2, 3, 1)], [dilations[i] for i in (0, 2, 3, 1)]
        if explicit:
            explicit = sum(([explicit[2 * i], explicit[2 * i + 1]] for i in (0, 2, 3, 1)), [])
    if padding == "EXPLICIT":
        inputs = tf.pad(inputs, np.reshape(explicit, [4, 2]))
        padding = "VALID"
    return inputs, strides, dilations, padding


def _patches(op, inputs, kernel_height, kernel_width):
    """The conv's input patches [N, H', W', kh * kw * C_in] (NHWC), ordered as its filter's [kh, kw, C_in] axes."""
    inputs, strides, dilations, padding = _nhwc(op, inputs)
    return tf.image.extract_patches(inputs, sizes=[1, kernel_height, kernel_width, 1], strides=strides,
                                    rates=dilations, padding=padding)


def _kept(count, max_rows, seed):
    """Which of `count` rows a Gram matrix over about max_rows of them keeps: a fixed-seed random mask [count]."""
    share = tf.minimum(1.0, tf.cast(max_rows, tf.float32) / tf.cast(count, tf.float32))
    return tf.random.stateless_uniform([count], seed=[seed, 0]) < share


def _sampled_patches(op, inputs, kernel_height, kernel_width, max_rows, seed):
    """The patches [M', kh, kw, C_in] that gram(rows of all the patches, max_rows, seed) keeps, in the same order,
    gathered from the input without extracting the others (a conv's early layers have hundreds of positions per
    example, of which a few dozen per weight are kept); None when the input's height, width or channels are not
    static. Sizes are computed in Python, so the graph has a few ops per layer."""
    inputs, strides, dilations, padding = _nhwc(op, inputs)
    sizes = inputs.shape.as_list()[1:]
    if len(sizes) != 3 or None in sizes:
        return None
    outputs, pads = [], []
    for axis, kernel in enumerate((kernel_height, kernel_width)):
        span, stride = (kernel - 1) * dilations[axis + 1] + 1, strides[axis + 1]
        if padding == "SAME":  # TensorFlow's: ceil(size / stride) positions, padded before by half the padding
            out = -(-sizes[axis] // stride)
            total = max((out - 1) * stride + span - sizes[axis], 0)
            pads.append([total // 2, total - total // 2])
        else:
            out = (sizes[axis] - span) // stride + 1
            pads.append([0, 0])
        outputs.append(out)
    if any(pad for pair in pads for pad in pair):
        inputs = tf.pad(inputs, [[0, 0]] + pads + [[0, 0]])
    height, width = sizes[0] + sum(pads[0]), sizes[1] + sum(pads[1])
    per_example = outputs[0] * outputs[1]
    kept = _kept(tf.shape(inputs)[0] * per_example, max_rows, seed)
    positions = tf.cast(tf.where(kept)[:, 0], tf.int32)
    rest = positions % per_example
    # Each kept position's first input pixel, in the padded input seen as [N * height * width, C_in] ...
    corner = ((positions // per_example) * (height * width) + (rest // outputs[1]) * (strides[1] * width)
              + (rest % outputs[1]) * strides[2])
    # ... and its patch's pixels, offsets from it.
    offsets = (np.arange(kernel_height)[:, None] * (dilations[1] * width)
               + np.arange(kernel_width)[None, :] * dilations[2]).astype(np.int32)
    return tf.gather(tf.reshape(inputs, [-1, sizes[2]]), tf.reshape(corner, [-1, 1, 1]) + offsets)


def _orders(shape):
    return np.arange(math.prod(shape), dtype=np.int64).reshape(shape)


def linear_view(op, weight_index):
    """The LinearView of a weight layer (its weight input `weight_index`), or None for a layer it cannot express
    (a BatchMatMulV2 whose weight has batch dimensions)."""
    weight_shape = [int(d) for d in op.inputs[weight_index].shape]
    index = _orders(weight_shape)
    if op.type == "Conv2D":
        kh, kw, c_in, c_out = weight_shape

        def conv_rows(inputs):
            return tf.reshape(_patches(op, inputs, kh, kw), [1, -1, kh * kw * c_in])

        def conv_sampled(inputs, max_rows, seed):
            patches = _sampled_patches(op, inputs, kh, kw, max_rows, seed)
            return None if patches is None else tf.reshape(patches, [1, -1, kh * kw * c_in])
        return LinearView(conv_rows, index.reshape(1, kh * kw * c_in, c_out), conv_sampled)
    if op.type == "DepthwiseConv2dNative":
        kh, kw, channels, multiplier = weight_shape

        def depthwise_rows(inputs):
            patches = tf.reshape(_patches(op, inputs, kh, kw), [-1, kh * kw, channels])
            return tf.transpose(patches, [2, 0, 1])

        def depthwise_sampled(inputs, max_rows, seed):
            patches = _sampled_patches(op, inputs, kh, kw, max_rows, seed)
            return None if patches is None else tf.transpose(tf.reshape(patches, [-1, kh * kw, channels]), [2, 0, 1])
        return LinearView(depthwise_rows, index.reshape(kh * kw, channels, multiplier).transpose(1, 0, 2),
                          depthwise_sampled)
    if op.type == "MatMul":
        transpose = {"a": op.get_attr("transpose_a"), "b": op.get_attr("transpose_b")}
    elif op.type == "BatchMatMulV2" and len(weight_shape) == 2:
        transpose = {"a": op.get_attr("adj_x"), "b": op.get_attr("adj_y")}
    else:
        return None
    if weight_index == 1:
        # y = x' W' with x' = x (or x^T) [..., M, K] and W' = W (or W^T) [K, C].
        matrix = index.T if transpose["b"] else index

        def right_rows(inputs):
            rows = tf.linalg.matrix_transpose(inputs) if transpose["a"] else inputs
            return tf.reshape(rows, [1, -1, matrix.shape[0]])
        return LinearView(right_rows, matrix[None])
    # y = W' x' with W' = W (or W^T) [C, K] and x' [..., K, M]: y^T = x'^T W'^T, rows x'^T.
    matrix = index if transpose["a"] else index.T

    def left_rows(inputs):
        rows = inputs if transpose["b"] else tf.linalg.matrix_transpose(inputs)
        return tf.reshape(rows, [1, -1, matrix.shape[0]])
    return LinearView(left_rows, matrix[None])


def gram(rows, max_rows=None, seed=0):
    """(G [B, K, K] = sum of x x^T over the rows, number of rows) of rows [B, M, K]; with max_rows, over a random
    subset of about max_rows of them (the same for every b), drawn with a fixed seed."""
    rows = tf.convert_to_tensor(rows)
    if max_rows is not None:
        rows = tf.boolean_mask(rows, _kept(tf.shape(rows)[1], max_rows, seed), axis=1)
    return tf.matmul(rows, rows, transpose_a=True), tf.shape(rows)[1]


def view_gram(view, inputs, max_rows=None, seed=0):
    """gram(view.rows(inputs), max_rows, seed), the kept rows computed alone when the view can (a conv's)."""
    rows = None if max_rows is None or view.sampled_rows is None else view.sampled_rows(inputs, max_rows, seed)
    if rows is None:
        return gram(view.rows(inputs), max_rows, seed)
    return tf.matmul(rows, rows, transpose_a=True), tf.shape(rows)[1]


@dataclasses.dataclass
class Solver:
    """One optimisation graph for problems of any shape (built by build_solver, in its own graph)."""

    gram: tf.Tensor
    start: tf.Tensor
    step: tf.Tensor
    movable: tf.Tensor
    logits: tf.Tensor
    iterations: tf.Tensor
    final_logits: tf.Tensor
    schedule: tf.Tensor  # [SCHEDULE_ROWS, iterations] from `iterations` alone
    schedule_input: tf.Tensor  # where final_logits reads it
    schedules: dict = dataclasses.field(default_factory=dict)  # computed ones, by number of iterations

    def run(self, sess, gram_matrix, start, step, movable, logits, iterations):
        """The logits V after `iterations` Adam steps from `logits` (all NumPy, [B, K, C] but gram_matrix [B, K, K]).

        The error is trace(D^T G D) with D = start + step * h(V) (G already divided by the number of rows).
        """
        if iterations not in self.schedules:
            self.schedules[iterations] = sess.run(self.schedule, feed_dict={self.iterations: iterations})
        return sess.run(self.final_logits, feed_dict={
            self.gram: gram_matrix, self.start: start, self.step: step, self.movable: movable, self.logits: logits,
            self.iterations: iterations, self.schedule_input: self.schedules[iterations]})


def annealing(iteration, iterations, options):
    """(beta, 1.0 with the regulariser on else 0.0) at an iteration (tensors or numbers): off during the warm
    start, then beta decays by a cosine from beta_start to beta_end."""
    start = options.warm_start * iterations
    progress = (iteration - start) / tf.maximum(iterations - start, 1.0)
    beta = options.beta_end + 0.5 * (options.beta_start - options.beta_end) * (1.0 + tf.cos(math.pi * progress))
    on = tf.cast(iteration >= start, tf.float32)
    return on * beta + (1.0 - on) * options.beta_start, on


def _schedule(iterations, options):
    """[SCHEDULE_ROWS, iterations]: per iteration the regulariser's weight, -2 beta, beta - 1 and Adam's step size,
    each computed on its own (as scalars: TensorFlow's vectorised cos and pow differ from its scalar ones in the last
    bit, and the iterations computed them as scalars)."""
    total = tf.cast(iterations, tf.float32)

    def one(t, arrays):
        beta, on = annealing(tf.cast(t, tf.float32), total, options)
        count = tf.cast(t + 1, tf.float32)
        rate = options.learning_rate * tf.sqrt(1.0 - ADAM_BETA2 ** count) / (1.0 - ADAM_BETA1 ** count)
        values = (on * options.reg_weight, -2.0 * beta, beta - 1.0, rate)
        return t + 1, tuple(array.write(t, value) for array, value in zip(arrays, values))

    arrays = tuple(tf.TensorArray(tf.float32, size=iterations) for _ in range(SCHEDULE_ROWS))
    _, arrays = tf1.while_loop(lambda t, arrays: t < iterations, one, [tf.constant(0), arrays], back_prop=False,
                               parallel_iterations=1)
    return tf.stack([array.stack() for array in arrays])


SCHEDULE_ROWS = 4


def build_solver(options):
    """The Solver of `options` (AdaRoundOptions: learning rate, regulariser weight, annealing), in the current graph.

    Per iteration t (from 0): h = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1); D = start + step * h; the loss
    trace(D^T G D) + on(t) * reg_weight * sum(movable * (1 - |2h - 1|^beta(t))); V takes an Adam step on it.

    The iterations' scalars (beta, the regulariser's weight, Adam's step size) depend on the number of iterations
    alone: they are computed once (Solver.run keeps them) and read by the loop, rather than by a dozen scalar ops
    in every iteration of every layer; and the warm start runs as its own loop without the regulariser's terms
    (zero there). Both leave every result bit for bit as computing them in each iteration would.
    """
    placeholder = lambda name: tf1.placeholder(tf.float32, [None, None, None], name=name)  # noqa: E731
    gram_matrix, start, step = placeholder("gram"), placeholder("start"), placeholder("step")
    movable, logits = placeholder("movable"), placeholder("logits")
    iterations = tf1.placeholder(tf.int32, [], name="iterations")
    schedule = _schedule(iterations, options)
    schedule_input = tf1.placeholder(tf.float32, [SCHEDULE_ROWS, None], name="schedule")
    weight, slope, exponent, rate = tf.unstack(schedule_input)

    def body(regularised):
        def iteration(t, v, m, s):
            sig = tf.sigmoid(v)
            stretched = sig * (ZETA - GAMMA) + GAMMA
            h = tf.clip_by_value(stretched, 0.0, 1.0)
            difference = start + step * h
            grad = 2.0 * tf.matmul(gram_matrix, difference) * step
            if regularised:
                signed = 2.0 * h - 1.0
                distance = tf.maximum(tf.abs(signed), 1e-12)
                # d/dh of -|2h - 1|^beta = -2 beta |2h - 1|^(beta - 1) sign(2h - 1).
                grad = grad + weight[t] * movable * (
                    slope[t] * tf.exp(exponent[t] * tf.math.log(distance)) * tf.sign(signed))
            inside = tf.cast((stretched > 0.0) & (stretched < 1.0), tf.float32)
            # (1 - sig) * (zeta - gamma) grouped as grappler's arithmetic optimizer groups the constant: written
            # out, the iterations compute the same float32 values with grappler on or off.
            grad = grad * sig * ((1.0 - sig) * (ZETA - GAMMA)) * inside
            m = ADAM_BETA1 * m + (1.0 - ADAM_BETA1) * grad
            s = ADAM_BETA2 * s + (1.0 - ADAM_BETA2) * tf.square(grad)
            return t + 1, v - rate[t] * m / (tf.sqrt(s) + ADAM_EPSILON), m, s
        return iteration

    # The regulariser is on from the first iteration t >= warm_start * iterations (annealing's rule).
    warm = tf.minimum(tf.cast(tf.math.ceil(options.warm_start * tf.cast(iterations, tf.float32)), tf.int32),
                      iterations)
    zeros = tf.zeros_like(logits)
    state = tf1.while_loop(lambda t, v, m, s: t < warm, body(False), [tf.constant(0), logits, zeros, zeros],
                           back_prop=False, parallel_iterations=1)
    _, final_logits, _, _ = tf1.while_loop(lambda t, v, m, s: t < iterations, body(True), list(state),
                                           back_prop=False, parallel_iterations=1)
    return Solver(gram=gram_matrix, start=start, step=step, movable=movable, logits=logits, iterations=iterations,
                  final_logits=final_logits, schedule=schedule, schedule_input=schedule_input)
