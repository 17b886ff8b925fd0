"""Run script: your tf_keras model on your data.

Usage: ./run_local.sh nets/keras_model_run.py --keras_model=model.h5 --data_npz=data.npz --learner=uniform [flags]
"""
import os
import sys

# tf_keras builds tf.compat.v1 graphs only as the legacy Keras, chosen before TensorFlow is imported.
os.environ["TF_USE_LEGACY_KERAS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from learners import launch  # noqa: E402

if __name__ == "__main__":
    launch.main(make_helper="make_keras_helper", after_train="save_keras_after_training")
