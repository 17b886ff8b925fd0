"""Run script: MobileNet v1/v2 (v2 by default) on Fashion-MNIST. Usage: ./run_local.sh nets/mobilenet_at_fmnist_run.py --learner uniform [flags]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from learners import launch  # noqa: E402

if __name__ == "__main__":
    launch.main("mobilenet_at_fmnist", script_defaults=True)
