"""Build a ModelHelper from parsed flags; the run scripts name which one."""
import importlib

from learners.errors import UserError
from nets.errors import DataError

MODELS = ("resnet_at_cifar10", "resnet_at_fmnist", "convnet_at_fmnist")


def helper_kwargs(settings, with_resnet_size):
    """The ModelHelper constructor arguments the flags give."""
    kwargs = dict(data_dir=settings.data_dir_local, batch_size=settings.batch_size,
                  batch_size_eval=settings.batch_size_eval, lrn_rate_init=settings.lrn_rate_init,
                  momentum=settings.momentum, loss_w_dcy=settings.loss_w_dcy, nb_epochs_rat=settings.nb_epochs_rat,
                  train_subset=settings.train_subset, eval_subset=settings.eval_subset, seed=settings.seed)
    if with_resnet_size:
        kwargs["resnet_size"] = settings.resnet_size
    # Unset flags leave the model's own defaults (the ConvNet and ResNets differ in rate and decay).
    return {name: value for name, value in kwargs.items() if value is not None or name == "data_dir"}


def make_helper_for(model):
    """A function settings -> ModelHelper of nets.<model>; data problems become one-line errors."""
    if model not in MODELS:
        raise ValueError("model %r is not known; expected one of %s" % (model, ", ".join(MODELS)))

    def make(settings):
        if model == "resnet_at_cifar10" and settings.data_dir_local is None:
            raise UserError("--data_dir_local is not set; expected the directory of CIFAR-10's binary release "
                            "(data_batch_1.bin ... data_batch_5.bin, test_batch.bin)")
        module = importlib.import_module("nets." + model)
        try:
            return module.ModelHelper(**helper_kwargs(settings, model.startswith("resnet")))
        except DataError:
            raise
        except ValueError as exc:
            raise UserError(str(exc))
    return make
