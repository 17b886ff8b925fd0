"""The body of every run script in nets/: the run directory's lock before TensorFlow's import, then the run.

A run script only puts the repository on the path and calls `main` under `if __name__ == "__main__"`; everything
that must happen in order (quiet TensorFlow start-up, the early lock, script defaults, the learner) happens here,
once, for every script.
"""
import os

from learners import early_lock


def main(model_name=None, make_helper=None, after_train=None, script_defaults=False):
    """Run one job from the command line.

    Args:
      model_name: a model of learners.helper_factory.make_helper_for (e.g. "resnet_at_fmnist"), or None with
        make_helper.
      make_helper: the name of a helper_factory function taking the parsed flags (the model-file scripts).
      after_train: the name of a helper_factory function run after training (helper, FLAGS, train's result).
      script_defaults: apply the script's defaults (learners.flags.use_script_defaults): True for model_name's
        (its PocketFlow schedule), or the name of a script's entry (e.g. "model_file").
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    early_lock.hold_run_directories()  # before TensorFlow's import: a second run on a directory stops at once
    from learners import flags as learner_flags, helper_factory, runner  # TensorFlow is imported here
    script = (model_name if script_defaults is True else script_defaults) if script_defaults else None
    if script:
        learner_flags.use_script_defaults(script)
    build = helper_factory.make_helper_for(model_name) if model_name else getattr(helper_factory, make_helper)
    runner.run(build, after_train=getattr(helper_factory, after_train) if after_train else None,
               deployment_defaults=script in learner_flags.DEPLOYMENT_SCRIPTS)
