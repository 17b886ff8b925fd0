"""Readers and tf.data input pipelines for Fashion-MNIST and CIFAR-10."""
