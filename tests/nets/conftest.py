"""Shared fixtures for the nets tests."""

import pytest


@pytest.fixture
def session_config():
    import tensorflow as tf
    return tf.compat.v1.ConfigProto(intra_op_parallelism_threads=2,
                                    inter_op_parallelism_threads=2)
