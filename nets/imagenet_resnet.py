"""ResNet v1.5 for ILSVRC-12 (He et al. 2016; stride on the 3x3 convolution of bottleneck blocks).

ResNet-18/34 stack basic blocks (two 3x3 convolutions), ResNet-50/101 bottleneck blocks (1x1, 3x3, 1x1 with
4x expansion), over four stages of 64/128/256/512 filters after a 7x7 stride-2 convolution and a 3x3 max
pool: PocketFlow's block sizes and strides.
"""

import tensorflow as tf

from nets import layers

BLOCK_SIZES = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
ALLOWED_SIZES = tuple(sorted(BLOCK_SIZES))
STAGE_FILTERS = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4


def _conv_bn(x, filters, kernel, stride, is_training, name, relu=True):
    y = layers.conv2d(x, filters, kernel, stride, name + '_conv')
    y = layers.batch_norm(y, is_training, name + '_bn')
    return tf.nn.relu(y) if relu else y


def _shortcut(x, out_filters, stride, is_training):
    if stride == 1 and int(x.shape[-1]) == out_filters:
        return x
    return _conv_bn(x, out_filters, 1, stride, is_training, 'shortcut', relu=False)


def _basic_block(x, filters, stride, is_training, name):
    with tf.compat.v1.variable_scope(name):
        shortcut = _shortcut(x, filters, stride, is_training)
        y = _conv_bn(x, filters, 3, stride, is_training, 'a')
        y = _conv_bn(y, filters, 3, 1, is_training, 'b', relu=False)
        return tf.nn.relu(y + shortcut)


def _bottleneck_block(x, filters, stride, is_training, name):
    with tf.compat.v1.variable_scope(name):
        out_filters = filters * BOTTLENECK_EXPANSION
        shortcut = _shortcut(x, out_filters, stride, is_training)
        y = _conv_bn(x, filters, 1, 1, is_training, 'a')
        y = _conv_bn(y, filters, 3, stride, is_training, 'b')
        y = _conv_bn(y, out_filters, 1, 1, is_training, 'c', relu=False)
        return tf.nn.relu(y + shortcut)


def forward_imagenet_resnet(inputs, is_training, resnet_size, num_classes):
    """Builds the ResNet in the current variable scope.

    Args:
      inputs: NHWC float tensor [N, S, S, 3] (S = 224 for ILSVRC-12; any S >= 32 builds).
      is_training: Python bool selecting batch statistics vs. moving statistics.
      resnet_size: 18, 34, 50 or 101.
      num_classes: number of logits (1001 for PocketFlow's ILSVRC-12).
    Returns:
      [N, num_classes] logits.
    """
    if resnet_size not in BLOCK_SIZES:
        raise ValueError('resnet_size %r is not supported for ILSVRC-12; allowed values: %s'
                         % (resnet_size, ', '.join(str(s) for s in ALLOWED_SIZES)))
    block = _bottleneck_block if resnet_size >= 50 else _basic_block
    x = _conv_bn(inputs, STAGE_FILTERS[0], 7, 2, is_training, 'conv0')
    x = layers.max_pool(x, 3, 2)
    for stage, (filters, count) in enumerate(zip(STAGE_FILTERS, BLOCK_SIZES[resnet_size])):
        for index in range(count):
            stride = 2 if stage > 0 and index == 0 else 1
            x = block(x, filters, stride, is_training, 'stage%d/block%d' % (stage + 1, index))
    return layers.dense(layers.global_avg_pool(x), num_classes, 'fc')
