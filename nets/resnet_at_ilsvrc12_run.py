"""Run script: ResNet-18/34/50/101 on ILSVRC-12 TFRecords. Usage: ./run_local.sh nets/resnet_at_ilsvrc12_run.py --data_dir_local DIR [flags]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from learners import launch  # noqa: E402

if __name__ == "__main__":
    launch.main("resnet_at_ilsvrc12", script_defaults=True)
