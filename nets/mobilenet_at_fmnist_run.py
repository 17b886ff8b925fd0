"""Run script: MobileNet v1/v2 (v2 by default) on Fashion-MNIST. Usage: ./run_local.sh nets/mobilenet_at_fmnist_run.py --learner uniform [flags]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from learners import flags as learner_flags  # noqa: E402
from learners import early_lock  # noqa: E402

if __name__ == "__main__":
    early_lock.hold_run_directories()  # before TensorFlow's import: a second run on a directory stops at once

from learners import runner  # noqa: E402
from learners.helper_factory import make_helper_for  # noqa: E402

if __name__ == "__main__":
    learner_flags.use_script_defaults("mobilenet_at_fmnist")
    runner.run(make_helper_for("mobilenet_at_fmnist"))
