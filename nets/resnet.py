"""CIFAR-style ResNet v1 (He et al. 2016, section 4.2): depth 6n+2, stages of 16/32/64 filters."""

import tensorflow as tf

from nets import layers

ALLOWED_SIZES = (20, 32, 44, 56, 110)
STAGE_FILTERS = (16, 32, 64)


def _basic_block(x, filters, stride, is_training, name):
    with tf.compat.v1.variable_scope(name):
        if stride != 1 or int(x.shape[-1]) != filters:
            shortcut = layers.conv2d(x, filters, 1, stride, 'shortcut_conv')
            shortcut = layers.batch_norm(shortcut, is_training, 'shortcut_bn')
        else:
            shortcut = x
        y = layers.conv2d(x, filters, 3, stride, 'conv1')
        y = tf.nn.relu(layers.batch_norm(y, is_training, 'bn1'))
        y = layers.conv2d(y, filters, 3, 1, 'conv2')
        y = layers.batch_norm(y, is_training, 'bn2')
        return tf.nn.relu(y + shortcut)


def forward_resnet(inputs, is_training, resnet_size, num_classes):
    """Builds the ResNet in the current variable scope.

    Args:
      inputs: NHWC float tensor (e.g. [N,32,32,3] or [N,28,28,1]).
      is_training: Python bool selecting batch statistics vs. moving statistics.
      resnet_size: depth, one of ALLOWED_SIZES.
      num_classes: number of logits.
    Returns:
      [N, num_classes] logits.
    Raises:
      ValueError: if resnet_size is not 6n+2 with an allowed value.
    """
    if resnet_size not in ALLOWED_SIZES:
        raise ValueError('resnet_size %r is not supported; allowed values: %s'
                         % (resnet_size, ', '.join(str(s) for s in ALLOWED_SIZES)))
    nb_blocks = (resnet_size - 2) // 6
    x = layers.conv2d(inputs, STAGE_FILTERS[0], 3, 1, 'conv0')
    x = tf.nn.relu(layers.batch_norm(x, is_training, 'bn0'))
    for stage, filters in enumerate(STAGE_FILTERS):
        for block in range(nb_blocks):
            stride = 2 if stage > 0 and block == 0 else 1
            name = 'stage%d/block%d' % (stage + 1, block)
            x = _basic_block(x, filters, stride, is_training, name)
    x = layers.global_avg_pool(x)
    return layers.dense(x, num_classes, 'fc')
