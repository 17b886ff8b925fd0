"""NHWC building blocks made of tf.nn ops and tf.compat.v1 variables.

Weights are plain variables consumed directly by Conv2D / MatMul so that a graph
rewriter can find each weight tensor by walking back from the op to a variable read.
Every weight variable's name ends in 'weights'; weight decay is applied to exactly those.
"""

import math

import tensorflow as tf

tf1 = tf.compat.v1


def _he_init(fan_in):
    # He et al. 2015: keeps ReLU activations' variance roughly constant across layers.
    return tf1.truncated_normal_initializer(stddev=math.sqrt(2.0 / fan_in) / 0.8796)


def conv2d(x, filters, kernel, stride, name, use_bias=False):
    """2-D convolution with 'SAME' padding.

    Args:
      x: NHWC float tensor.
      filters: number of output channels.
      kernel: square kernel size.
      stride: spatial stride.
      name: variable scope; creates '<name>/weights' [k,k,in,out] and, if use_bias, '<name>/biases'.
      use_bias: whether to add a bias (leave off when batch norm follows).
    Returns:
      NHWC output tensor.
    """
    in_ch = int(x.shape[-1])
    with tf1.variable_scope(name):
        w = tf1.get_variable('weights', [kernel, kernel, in_ch, filters],
                             initializer=_he_init(kernel * kernel * in_ch))
        y = tf.nn.conv2d(x, w, strides=[1, stride, stride, 1], padding='SAME')
        if use_bias:
            b = tf1.get_variable('biases', [filters], initializer=tf1.zeros_initializer())
            y = tf.nn.bias_add(y, b)
    return y


def dense(x, units, name):
    """Fully-connected layer y = x·W + b.

    Args:
      x: [N, in] float tensor (flatten first).
      units: number of outputs.
      name: variable scope; creates '<name>/weights' [in,units] and '<name>/biases'.
    Returns:
      [N, units] tensor.
    """
    in_units = int(x.shape[-1])
    with tf1.variable_scope(name):
        # Glorot-uniform: the usual choice for linear/classifier layers.
        w = tf1.get_variable('weights', [in_units, units],
                             initializer=tf1.glorot_uniform_initializer())
        b = tf1.get_variable('biases', [units], initializer=tf1.zeros_initializer())
        return tf.nn.bias_add(tf.matmul(x, w), b)


def batch_norm(x, is_training, name, decay=0.9, eps=1e-5):
    """Fused batch normalisation over the channel axis of an NHWC tensor.

    In training the batch statistics are used and assign ops updating the
    'moving_mean' / 'moving_variance' variables are added to GraphKeys.UPDATE_OPS;
    in evaluation the moving statistics are used.
    Args:
      x: NHWC float tensor.
      is_training: Python bool.
      name: variable scope; creates 'beta', 'gamma', 'moving_mean', 'moving_variance'.
      decay: momentum of the moving statistics.
      eps: variance epsilon.
    Returns:
      normalised tensor of x's shape.
    """
    ch = int(x.shape[-1])
    with tf1.variable_scope(name):
        beta = tf1.get_variable('beta', [ch], initializer=tf1.zeros_initializer())
        gamma = tf1.get_variable('gamma', [ch], initializer=tf1.ones_initializer())
        moving_mean = tf1.get_variable(
            'moving_mean', [ch], initializer=tf1.zeros_initializer(), trainable=False,
            collections=[tf1.GraphKeys.GLOBAL_VARIABLES, tf1.GraphKeys.MOVING_AVERAGE_VARIABLES])
        moving_var = tf1.get_variable(
            'moving_variance', [ch], initializer=tf1.ones_initializer(), trainable=False,
            collections=[tf1.GraphKeys.GLOBAL_VARIABLES, tf1.GraphKeys.MOVING_AVERAGE_VARIABLES])
        if not is_training:
            y, _, _ = tf1.nn.fused_batch_norm(x, gamma, beta, mean=moving_mean, variance=moving_var,
                                              epsilon=eps, is_training=False)
            return y
        y, batch_mean, batch_var = tf1.nn.fused_batch_norm(x, gamma, beta, epsilon=eps,
                                                           is_training=True)
        # assign_sub form of m <- decay*m + (1-decay)*batch_stat; avoids reading m twice.
        rate = 1.0 - decay
        upd_mean = tf1.assign_sub(moving_mean, (moving_mean - batch_mean) * rate)
        upd_var = tf1.assign_sub(moving_var, (moving_var - batch_var) * rate)
        tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, upd_mean)
        tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, upd_var)
        return y


def global_avg_pool(x):
    """Averages an NHWC tensor over H and W, returning [N, C]."""
    return tf.reduce_mean(x, axis=[1, 2])


def max_pool(x, size=2, stride=2):
    """Max-pooling with 'SAME' padding on an NHWC tensor."""
    return tf.nn.max_pool2d(x, ksize=size, strides=stride, padding='SAME')


def flatten(x):
    """Reshapes [N, ...] to [N, prod(...)] using the static inner shape."""
    inner = 1
    for d in x.shape[1:]:
        inner *= int(d)
    return tf.reshape(x, [-1, inner])
