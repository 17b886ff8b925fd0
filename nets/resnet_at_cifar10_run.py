"""Run script: ResNet-N on CIFAR-10. Usage: ./run_local.sh nets/resnet_at_cifar10_run.py --learner uniform [flags]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from learners import launch  # noqa: E402

if __name__ == "__main__":
    launch.main("resnet_at_cifar10")
