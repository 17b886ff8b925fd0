"""MobileNet v1 (Howard et al. 2017) and v2 (Sandler et al. 2018) for ILSVRC-12, with a depth multiplier.

Depthwise convolutions are DepthwiseConv2dNative ops reading a [k, k, in, 1] variable named
'depthwise_kernel': the name keeps them out of weight decay (which takes variables ending in 'weights'), as
slim's MobileNets leave depthwise filters unregularised.
"""

import math

import tensorflow as tf

from nets import layers

tf1 = tf.compat.v1

ALLOWED_VERSIONS = (1, 2)
# v1: (output channels, stride) of the 13 depthwise-separable blocks after the 32-filter stem.
V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
             (512, 1), (1024, 2), (1024, 1))
# v2: (expansion t, output channels c, repeats n, first stride s) of the inverted residual stages.
V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
             (6, 320, 1, 1))
V2_LAST_CHANNELS = 1280
# Stems: 'imagenet' (stride 2 in the first convolution, total stride 32) and 'small' for 28-32 pixel images, which
# keeps the first convolution and the first stride-2 stage (v2: the 24-channel one; v1: the first 128-channel
# block) at stride 1, as the CIFAR ports of MobileNetV2 do: total stride 8, so a 28x28 image ends at 4x4 instead
# of vanishing to 1x1 (28 -> 14 -> 7 -> 4 -> 2 -> 1 at stride 32).
STEMS = ('imagenet', 'small')


def make_divisible(channels, divisor=8):
    """Channels scaled by a depth multiplier, rounded to a multiple of divisor, never below 90% of the value."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def depthwise_conv2d(x, kernel, stride, name):
    """Depthwise 3x3 (or kxk) convolution with 'SAME' padding; creates '<name>/depthwise_kernel' [k,k,in,1]."""
    channels = int(x.shape[-1])
    with tf1.variable_scope(name):
        stddev = math.sqrt(2.0 / (kernel * kernel)) / 0.8796
        w = tf1.get_variable('depthwise_kernel', [kernel, kernel, channels, 1],
                             initializer=tf1.truncated_normal_initializer(stddev=stddev))
        return tf.nn.depthwise_conv2d(x, w, strides=[1, stride, stride, 1], padding='SAME')


def _conv_bn_relu6(x, filters, kernel, stride, is_training, name, relu=True):
    y = layers.conv2d(x, filters, kernel, stride, name)
    y = layers.batch_norm(y, is_training, name + '_bn')
    return tf.nn.relu6(y) if relu else y


def _depthwise_bn_relu6(x, stride, is_training, name):
    y = depthwise_conv2d(x, 3, stride, name)
    return tf.nn.relu6(layers.batch_norm(y, is_training, name + '_bn'))


def _forward_v1(x, is_training, depth_mult, small):
    def depth(channels):
        return max(8, int(channels * depth_mult))
    x = _conv_bn_relu6(x, depth(32), 3, 1 if small else 2, is_training, 'conv0')
    first_stride_two = [stride for _, stride in V1_BLOCKS].index(2)
    for index, (channels, stride) in enumerate(V1_BLOCKS):
        stride = 1 if small and index == first_stride_two else stride
        with tf1.variable_scope('block%d' % index):
            x = _depthwise_bn_relu6(x, stride, is_training, 'depthwise')
            x = _conv_bn_relu6(x, depth(channels), 1, 1, is_training, 'pointwise')
    return x


def _forward_v2(x, is_training, depth_mult, small):
    x = _conv_bn_relu6(x, make_divisible(32 * depth_mult), 3, 1 if small else 2, is_training, 'conv0')
    block = 0
    first_stride_two = [stage[3] for stage in V2_STAGES].index(2)
    for stage, (expansion, channels, repeats, first_stride) in enumerate(V2_STAGES):
        first_stride = 1 if small and stage == first_stride_two else first_stride
        out = make_divisible(channels * depth_mult)
        for index in range(repeats):
            stride = first_stride if index == 0 else 1
            with tf1.variable_scope('block%d' % block):
                y = x
                if expansion != 1:
                    y = _conv_bn_relu6(y, int(x.shape[-1]) * expansion, 1, 1, is_training, 'expand')
                y = _depthwise_bn_relu6(y, stride, is_training, 'depthwise')
                y = _conv_bn_relu6(y, out, 1, 1, is_training, 'project', relu=False)
                x = x + y if stride == 1 and int(x.shape[-1]) == out else y
            block += 1
    last = make_divisible(V2_LAST_CHANNELS * max(1.0, depth_mult))
    return _conv_bn_relu6(x, last, 1, 1, is_training, 'conv_last')


def forward_mobilenet(inputs, is_training, version, depth_mult, num_classes, stem='imagenet'):
    """Builds MobileNet v1 or v2 in the current variable scope.

    Args:
      inputs: NHWC float tensor [N, S, S, 3].
      is_training: Python bool selecting batch statistics vs. moving statistics.
      version: 1 or 2.
      depth_mult: width multiplier of every layer (PocketFlow's mobilenet_depth_mult), > 0.
      num_classes: number of logits.
      stem: 'imagenet' (total stride 32) or 'small' (total stride 8, for 28-32 pixel images; see STEMS).
    Returns:
      [N, num_classes] logits.
    """
    if version not in ALLOWED_VERSIONS:
        raise ValueError('mobilenet_version %r is not supported; allowed values: 1, 2' % (version,))
    if not depth_mult > 0:
        raise ValueError('mobilenet_depth_mult %r is not valid; expected a positive number' % (depth_mult,))
    if stem not in STEMS:
        raise ValueError('stem %r is not supported; allowed values: %s' % (stem, ', '.join(STEMS)))
    x = (_forward_v1 if version == 1 else _forward_v2)(inputs, is_training, depth_mult, stem == 'small')
    return layers.dense(layers.global_avg_pool(x), num_classes, 'fc')
