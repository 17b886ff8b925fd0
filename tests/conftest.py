"""Test-wide settings: quiet TensorFlow, fixed seeds, graph mode only."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as the run scripts do: much faster conv backprop

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402


@pytest.fixture
def graph():
    """A fresh tf.Graph, entered as default for the test."""
    g = tf.Graph()
    with g.as_default():
        tf.compat.v1.set_random_seed(1234)
        yield g


@pytest.fixture
def rng():
    return np.random.default_rng(20261122)


def new_session(graph):
    """A 2-thread session on `graph`."""
    config = tf.compat.v1.ConfigProto(intra_op_parallelism_threads=2, inter_op_parallelism_threads=1)
    return tf.compat.v1.Session(graph=graph, config=config)
