"""Run script: your model file (Keras 3 or tf_keras, SavedModel, frozen graph) on your data.

Usage: ./run_local.sh nets/model_file_run.py --model=model.keras --data_npz=data.npz --learner=uniform [flags]

tf_keras needs TF_USE_LEGACY_KERAS=1 before TensorFlow is imported to build tf.compat.v1 graphs; Keras 3 is
unaffected by it (`import keras` is Keras 3 either way) and is only used eagerly, to load and freeze its file,
so both live in this one process.
"""
import os
import sys

os.environ["TF_USE_LEGACY_KERAS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from learners import launch  # noqa: E402

if __name__ == "__main__":
    launch.main(make_helper="make_model_file_helper", after_train="save_model_after_training",
                script_defaults="model_file")
