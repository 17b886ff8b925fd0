"""One base for the errors a user can cause: the edges catch tfquant.TfquantError and nothing else."""
import importlib
import inspect
import pkgutil

import tfquant
import learners
import nets
from tfquant.errors import TfquantError


def _error_classes(package):
    found = []
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.endswith("__main__") or info.name.endswith("_run"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == module.__name__
                    and not name.startswith("_")):
                found.append(obj)
    return found


def test_every_public_error_class_derives_from_the_one_base():
    classes = _error_classes(tfquant) + _error_classes(learners) + _error_classes(nets)
    # Errors that are not a user's to fix (a stop request is a signal, not an error) are named here.
    not_user_errors = {"Stopped"}
    outside = sorted("%s.%s" % (c.__module__, c.__name__) for c in classes
                     if not issubclass(c, TfquantError) and c.__name__ not in not_user_errors)
    assert len(classes) > 15
    assert outside == []


def test_the_base_is_the_public_face():
    assert tfquant.TfquantError is TfquantError and "TfquantError" in tfquant.__all__
