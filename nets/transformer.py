"""A small Transformer encoder (ViT-style, pre-layer-norm) over image patches or rows.

Every weight a quantizer should see is a variable read directly by a matmul: the token embedding and the
query/key/value projections multiply [N, T, d] activations by a [d, d'] weight (BatchMatMulV2 with a
broadcast weight), the attention output projection, the MLP and the classifier multiply [N*T, d] or [N, d]
rows (MatMul). The attention scores and the weighted sum of values (BatchMatMulV2 of two activations) have no
weight. Layer norm, softmax and GELU are float ops tfquant does not quantize (its activation ops are the
ReLU family, sigmoid and tanh), so their inputs and outputs stay float32, as the report's absence of them says.
"""

import math

import tensorflow as tf

tf1 = tf.compat.v1

PATCH_SIZE = 4
DEFAULTS = dict(dim=64, depth=2, heads=4, mlp_dim=128)


def _weight(name, shape, fan_in):
    # Scaled so each projection keeps the variance of its input (Glorot-like for the square ones).
    return tf1.get_variable(name, shape, initializer=tf1.truncated_normal_initializer(
        stddev=1.0 / math.sqrt(fan_in)))


def _zeros(name, shape):
    return tf1.get_variable(name, shape, initializer=tf1.zeros_initializer())


def layer_norm(x, name, eps=1e-6):
    """Layer normalisation over the last axis with 'gamma' and 'beta' (not weight-decayed)."""
    dim = int(x.shape[-1])
    with tf1.variable_scope(name):
        gamma = tf1.get_variable('gamma', [dim], initializer=tf1.ones_initializer())
        beta = _zeros('beta', [dim])
        mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
        return (x - mean) * tf.math.rsqrt(variance + eps) * gamma + beta


def tokens_from_images(images, tokens):
    """[N, 28, 28, 1] images as [N, T, P] tokens: 4x4 patches (T=49, P=16) or rows (T=28, P=28)."""
    height, width, channels = (int(d) for d in images.shape[1:])
    if tokens == 'rows':
        return tf.reshape(images, [-1, height, width * channels])
    if tokens != 'patches':
        raise ValueError("transformer_tokens %r is not supported; allowed: 'patches', 'rows'" % (tokens,))
    rows, cols = height // PATCH_SIZE, width // PATCH_SIZE
    x = tf.reshape(images, [-1, rows, PATCH_SIZE, cols, PATCH_SIZE, channels])
    x = tf.transpose(x, [0, 1, 3, 2, 4, 5])
    return tf.reshape(x, [-1, rows * cols, PATCH_SIZE * PATCH_SIZE * channels])


def _project(x, out_dim, name):
    """x [N, T, d] times a [d, out_dim] weight (BatchMatMulV2) plus a bias."""
    in_dim = int(x.shape[-1])
    with tf1.variable_scope(name):
        w = _weight('weights', [in_dim, out_dim], in_dim)
        return tf.matmul(x, w) + _zeros('biases', [out_dim])


def _dense_rows(x, out_dim, name):
    """x [M, d] times a [d, out_dim] weight (MatMul) plus a bias."""
    in_dim = int(x.shape[-1])
    with tf1.variable_scope(name):
        w = _weight('weights', [in_dim, out_dim], in_dim)
        return tf.nn.bias_add(tf.matmul(x, w), _zeros('biases', [out_dim]))


def _attention(x, heads, name):
    _, length, dim = (int(d) if d is not None else None for d in x.shape)
    head_dim = dim // heads
    with tf1.variable_scope(name):
        def split_heads(t):
            return tf.transpose(tf.reshape(t, [-1, length, heads, head_dim]), [0, 2, 1, 3])
        q = split_heads(_project(x, dim, 'query'))
        k = split_heads(_project(x, dim, 'key'))
        v = split_heads(_project(x, dim, 'value'))
        scores = tf.matmul(q, k, transpose_b=True) * (1.0 / math.sqrt(head_dim))
        context = tf.matmul(tf.nn.softmax(scores), v)
        context = tf.reshape(tf.transpose(context, [0, 2, 1, 3]), [-1, dim])
        return tf.reshape(_dense_rows(context, dim, 'output'), [-1, length, dim])


def _mlp(x, mlp_dim, name):
    _, length, dim = (int(d) if d is not None else None for d in x.shape)
    with tf1.variable_scope(name):
        h = tf.nn.gelu(_dense_rows(tf.reshape(x, [-1, dim]), mlp_dim, 'fc1'), approximate=False)
        return tf.reshape(_dense_rows(h, dim, 'fc2'), [-1, length, dim])


def forward_transformer(images, num_classes, tokens='patches', dim=64, depth=2, heads=4, mlp_dim=128):
    """Builds the encoder in the current variable scope.

    Args:
      images: [N, H, W, C] float tensor (H, W multiples of 4 for patches).
      num_classes: number of logits.
      tokens: 'patches' (4x4) or 'rows'.
      dim, depth, heads, mlp_dim: width, number of blocks, attention heads (dividing dim), MLP width.
    Returns:
      [N, num_classes] logits.
    """
    if dim % heads:
        raise ValueError('transformer width %d does not split into %d heads' % (dim, heads))
    x = tokens_from_images(images, tokens)
    length = int(x.shape[1])
    x = _project(x, dim, 'embed')
    x = x + tf1.get_variable('position', [1, length, dim], initializer=tf1.truncated_normal_initializer(stddev=0.02))
    for index in range(depth):
        with tf1.variable_scope('block%d' % index):
            x = x + _attention(layer_norm(x, 'ln1'), heads, 'attention')
            x = x + _mlp(layer_norm(x, 'ln2'), mlp_dim, 'mlp')
    x = tf.reduce_mean(layer_norm(x, 'ln_final'), axis=1)
    return _dense_rows(x, num_classes, 'head')
