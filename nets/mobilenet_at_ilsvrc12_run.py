"""Run script: MobileNet v1/v2 on ILSVRC-12 TFRecords. Usage: ./run_local.sh nets/mobilenet_at_ilsvrc12_run.py --data_dir_local DIR [flags]"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from learners import launch  # noqa: E402

if __name__ == "__main__":
    launch.main("mobilenet_at_ilsvrc12", script_defaults=True)
