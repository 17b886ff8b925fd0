"""PocketFlow's small ConvNet for Fashion-MNIST / MNIST (two 5x5 convs, fc1024, fc10)."""

import tensorflow as tf

from nets import layers


def forward_convnet(inputs, is_training, num_classes=10):
    """Builds the ConvNet in the current variable scope.

    Args:
      inputs: NHWC float tensor, e.g. [N,28,28,1].
      is_training: unused (no batch norm or dropout); kept for a uniform signature.
      num_classes: number of logits.
    Returns:
      [N, num_classes] logits.
    """
    del is_training
    x = tf.nn.relu(layers.conv2d(inputs, 32, 5, 1, 'conv1', use_bias=True))
    x = layers.max_pool(x)
    x = tf.nn.relu(layers.conv2d(x, 64, 5, 1, 'conv2', use_bias=True))
    x = layers.max_pool(x)
    x = tf.nn.relu(layers.dense(layers.flatten(x), 1024, 'fc3'))
    return layers.dense(x, num_classes, 'fc4')
