"""A ModelHelper over a model file written by tf_keras (.h5, .keras or a SavedModel directory).

The file is loaded once, eagerly; each learner graph then gets its own copy of the network, cloned from the
file's configuration onto the graph's input tensor (no second, dead copy of the network on a Keras
placeholder), with the file's weights as the variables' initial values. Variables are named
'model/<layer>/<weight>' (the Keras weight name under MODEL_SCOPE), the same in every graph, so the
learners' checkpoints restore across graphs and map back to the file's weights for saving.
Batch norm runs in training mode in training graphs (its moving-average updates join UPDATE_OPS) and in
inference mode in evaluation graphs. tf_keras needs TF_USE_LEGACY_KERAS=1 before TensorFlow is imported;
the Keras run script sets it.
"""
import hashlib
import os
import warnings

import numpy as np
import tensorflow as tf

from nets import model_helper
from nets.data import cifar10, fmnist, npz, pipeline
from nets.errors import DataError
from tfquant import files

tf1 = tf.compat.v1

DATASETS = ("fmnist", "cifar10")
_FILE_SUFFIXES = (".h5", ".hdf5", ".keras")
# Keras configuration files are small; a metadata file past this is not one.
_METADATA_LIMIT = 256 << 20
_LAMBDA_MARK = b'"class_name": "Lambda"'
_DIGEST_CHUNK = 1 << 20


class KerasModelError(DataError):
    """A Keras model file that cannot be used; the message is one line naming the path."""


def _keras():
    try:
        import tf_keras  # pylint: disable=import-outside-toplevel  (only Keras users need it)
    except ImportError:
        raise KerasModelError("tf_keras is not installed; expected 'pip install tf-keras' matching TensorFlow "
                              "%s" % tf.__version__) from None
    return tf_keras


def _holds_lambda(path):
    """True when the model configuration in an .h5 file or a SavedModel names a Lambda layer (.keras: False)."""
    if os.path.isdir(path):
        metadata = os.path.join(path, "keras_metadata.pb")
        if not os.path.exists(metadata):
            return False
        return _LAMBDA_MARK in files.read_bounded(metadata, KerasModelError.for_path(path), "Keras metadata",
                                                  limit=_METADATA_LIMIT)
    if path.endswith(".keras"):
        return False  # Keras's safe mode refuses them in this format
    import h5py  # pylint: disable=import-outside-toplevel  (a tf_keras dependency)
    with h5py.File(path, "r") as handle:
        config = handle.attrs.get("model_config")
    if isinstance(config, bytes):
        config = config.decode("utf-8", "replace")
    return config is not None and _LAMBDA_MARK.decode() in config


def load_keras_model(path, unsafe=False):
    """Load a tf_keras model file eagerly, refusing Lambda layers (Python bytecode) unless unsafe.

    Keras's own safe mode covers only the .keras format; .h5 files and SavedModels deserialise a Lambda's
    bytecode whatever it is told, so their configuration is read first and a Lambda refused.
    Args:
      path: a .h5/.hdf5/.keras file or a SavedModel directory.
      unsafe: load Lambda layers (run code from the file).
    Returns:
      the tf_keras Model.
    Raises:
      KerasModelError naming the path.
    """
    path = os.fspath(path)
    fail = KerasModelError.for_path(path)
    if os.path.isdir(path):
        files.regular_file_size(os.path.join(path, "saved_model.pb"), fail, "SavedModel file")
    else:
        files.regular_file_size(path, fail, "Keras model file")
        if not path.endswith(_FILE_SUFFIXES):
            raise fail("Keras model file %s has an unknown suffix; expected .h5, .hdf5, .keras or a SavedModel "
                       "directory" % path)
    keras = _keras()
    try:
        if not unsafe and _holds_lambda(path):
            raise fail("Keras model %s holds a Lambda layer, whose Python code would run on loading; expected a "
                       "model without Lambda layers, or --keras_unsafe if you trust the file" % path)
        with tf.init_scope():
            model = keras.models.load_model(path, compile=False, safe_mode=not unsafe)
    except KerasModelError:
        raise
    except Exception as exc:  # pylint: disable=broad-except  (any failure of Keras on a user's file)
        message = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise fail("Keras model %s cannot be loaded (%s); expected a model saved by tf_keras%s (Keras 3 files, other "
                   "SavedModels and frozen graphs: nets/model_file_run.py --model)"
                   % (path, message, "" if unsafe else " (loaded in safe mode: no Lambda layers)")) from None
    if not isinstance(model, keras.Model):
        # tf_keras loads a SavedModel that Keras did not write as a plain trackable object.
        raise fail("%s is not a tf_keras model (a SavedModel of %s); expected nets/model_file_run.py --model for "
                   "SavedModels of Keras 3, tf.Module or tf.function" % (path, type(model).__name__))
    nested = [layer.name for layer in model.layers if isinstance(layer, keras.Model)]
    if nested:
        # clone_model would rebuild a nested model on Keras placeholders too: a second, dead copy of its
        # layers that the quantizer would find and calibration could not run.
        raise fail("Keras model %s nests the model %s; expected a flat model (build it on the outer input, e.g. "
                   "keras.applications.MobileNetV2(input_tensor=x))" % (path, nested[0]))
    if len(model.inputs) != 1 or len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        raise fail("Keras model %s has %d inputs and %d outputs; expected one image input and one output of "
                   "class scores [batch, classes]" % (path, len(model.inputs), len(model.outputs)))
    return model


def _hash_file(digest, path, error_cls, what, label=None):
    """Feed a regular file's bytes into `digest` in chunks (model files and data sets may be large).

    label: for a directory's member, its relative name, hashed with the file's size before its bytes so the
      boundary between one member and the next is unambiguous.
    """
    handle, size = files.open_regular(path, error_cls, what)
    with handle:
        if label is not None:
            name = label.encode("utf-8", "surrogateescape")
            digest.update(b"%d:%s:%d:" % (len(name), name, size))
        try:
            for chunk in iter(lambda: handle.read(_DIGEST_CHUNK), b""):
                digest.update(chunk)
        except OSError as exc:
            raise error_cls("%s %s cannot be read (%s)" % (what, path, exc.strerror or exc)) from None


def content_digest(path, error_cls, what="file"):
    """SHA-256 (hex) of a file's bytes, or of a directory's files (a SavedModel) in sorted order.

    A directory's digest covers each file's path relative to it as well as its bytes, so a renamed or an
    added file changes it too. Files are streamed, never loaded whole.
    Args:
      path: a regular file or a directory of regular files.
      error_cls: exception class for unreadable files, FIFOs and devices (one line naming the path).
      what: what the path is, for messages.
    Returns:
      64 hex digits.
    """
    path = os.fspath(path)
    digest = hashlib.sha256()
    if not os.path.isdir(path):
        _hash_file(digest, path, error_cls, what)
        return digest.hexdigest()
    members = []
    for directory, _, names in os.walk(path):
        members += [os.path.relpath(os.path.join(directory, name), path).split(os.sep) for name in names]
    for parts in sorted(members):
        _hash_file(digest, os.path.join(path, *parts), error_cls, "%s file" % what, label="/".join(parts))
    return digest.hexdigest()


def weight_key(name):
    """A Keras weight name without its ':0' suffix, e.g. 'conv2d/kernel'."""
    return name[:-2] if name.endswith(":0") else name


class KerasModelHelper(model_helper.ClassifierModelHelper):
    """A Keras classifier on an .npz data set or a built-in one; images reach the model as float32, unchanged."""

    base_epochs = 1
    lrn_rate_schedule = "cosine"
    train_preprocess = staticmethod(npz.as_float32)
    eval_preprocess = staticmethod(npz.as_float32)

    def __init__(self, keras_model, data_npz=None, dataset=None, data_dir=None, keras_unsafe=False,
                 batch_size=128, batch_size_eval=500, lrn_rate_init=0.01, momentum=0.9, loss_w_dcy=0.0,
                 nb_epochs_rat=1.0, train_subset=None, eval_subset=None, seed=None):
        """Loads the model file and the data, and checks that they fit each other.

        Args:
          keras_model: the model file or SavedModel directory.
          data_npz: an .npz archive (see nets.data.npz); or
          dataset: 'fmnist' or 'cifar10' (the built-in readers, from data_dir).
          keras_unsafe: allow Lambda layers.
          loss_w_dcy: L2 decay on the Keras kernels (the model's own regularisers apply too).
          Others as for ClassifierModelHelper.
        """
        if (data_npz is None) == (dataset is None):
            raise ValueError("give exactly one data source: --data_npz or --dataset (%s)" % ", ".join(DATASETS))
        if dataset is not None and dataset not in DATASETS:
            raise ValueError("--dataset=%s is not valid; expected one of %s" % (dataset, ", ".join(DATASETS)))
        self.keras_path, self.data_npz, self.dataset, self.data_dir = keras_model, data_npz, dataset, data_dir
        self._load_model(keras_model, keras_unsafe)
        # The file names alone do not say which model and data a run used: a rerun with another file at the same
        # path, or the same name elsewhere, must not resume the first one's checkpoints (see run_settings).
        self.input_digests = {self.digest_key: content_digest(keras_model, KerasModelError.for_path(keras_model),
                                                              "model")}
        if data_npz is not None:
            self.input_digests["data_npz_sha256"] = content_digest(data_npz, DataError.for_path(data_npz),
                                                                   "data archive")
        self._extra_losses = {}
        super().__init__(batch_size, batch_size_eval, lrn_rate_init, momentum, loss_w_dcy, nb_epochs_rat,
                         train_subset, eval_subset, seed)
        self._check_data_fits()

    digest_key = "keras_model_sha256"
    model_kind = "Keras model"

    def _load_model(self, keras_model, keras_unsafe):
        """Load the file: sets source, initial_values, nb_classes and input_shape ([None, H, W, C])."""
        self.source = load_keras_model(keras_model, keras_unsafe)
        self.initial_values = {}
        for weight in self.source.weights:
            key = weight_key(weight.name)
            if key in self.initial_values:
                raise KerasModelError("Keras model %s has two weights named %s; expected unique weight names"
                                      % (keras_model, key), path=keras_model)
            self.initial_values[key] = weight.numpy()
        self.nb_classes = int(self.source.outputs[0].shape[-1])
        self.input_shape = list(self.source.inputs[0].shape)

    def _load_data(self):
        if self.data_npz is not None:
            return npz.load_npz(self.data_npz)
        if self.dataset == "fmnist":
            return pipeline.ArrayData(**fmnist.load_fmnist(self.data_dir))
        if self.data_dir is None:
            raise ValueError("--data_dir_local is not set; expected the directory of CIFAR-10's binary release")
        return cifar10.scan_cifar10(self.data_dir)

    def _check_data_fits(self):
        """Image shape against the model's input, labels against its number of classes."""
        want = tuple(self.input_shape[1:])
        images = getattr(self._data, "train_images", None)
        got = None
        if images is not None:
            got = tuple(images.shape[1:]) if images.ndim == 4 else tuple(images.shape[1:]) + (1,)
        elif self.dataset == "cifar10":
            got = (32, 32, 3)
        if got is not None and (len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got))):
            raise DataError("images of %s are %s; the %s %s expects %s"
                            % (self.data_npz or self.dataset, "x".join(map(str, got)), self.model_kind,
                               self.keras_path, "x".join("?" if w is None else str(w) for w in want)),
                            path=self.data_npz)
        for labels in (getattr(self._data, "train_labels", None), getattr(self._data, "test_labels", None)):
            if labels is not None and len(labels) and int(np.max(labels)) >= self.nb_classes:
                raise DataError("%s holds the label %d; the %s %s has %d classes (labels 0..%d)"
                                % (self.data_npz or self.dataset, int(np.max(labels)), self.model_kind,
                                   self.keras_path, self.nb_classes, self.nb_classes - 1), path=self.data_npz)

    def _file_initial_value(self, next_creator, **kwargs):
        """Variable creator giving each variable the file's value of the weight with the same name."""
        scope = tf1.get_default_graph().get_name_scope()
        full_name = "%s/%s" % (scope, kwargs.get("name")) if scope else str(kwargs.get("name"))
        key = full_name.split("/", 1)[1] if "/" in full_name else full_name  # drop MODEL_SCOPE
        if key not in self.initial_values:
            raise KerasModelError("Keras model %s: the rebuilt network has a variable %s that the file has no "
                                  "weight for; expected a model whose weights are all saved" % (self.keras_path, key),
                                  path=self.keras_path)
        kwargs["initial_value"] = self.initial_values[key]
        self._created.add(key)
        return next_creator(**kwargs)

    def _forward(self, inputs, is_training):
        keras = _keras()
        self._created = set()
        # clone_model calls each layer without a `training` argument: the learning phase decides batch norm
        # and dropout, the only way to choose the mode when the network is built on our tensor.
        with tf.variable_creator_scope(self._file_initial_value), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*learning_phase_scope.*")
            with keras.backend.learning_phase_scope(1 if is_training else 0):
                network = keras.models.clone_model(self.source, input_tensors=[inputs])
        missing = sorted(set(self.initial_values) - self._created)
        if missing:
            raise KerasModelError("Keras model %s: weights %s were not rebuilt; expected a network clone_model can "
                                  "rebuild" % (self.keras_path, ", ".join(missing[:5])), path=self.keras_path)
        if is_training:
            for update in network.updates:
                tf1.add_to_collection(tf1.GraphKeys.UPDATE_OPS, update)
        self._extra_losses[tf1.get_default_graph()] = list(network.losses)
        logits = network.outputs[0]
        # A softmax head gives probabilities; the loss and the quantizer want the scores before it.
        if logits.op.type == "Softmax":
            logits = logits.op.inputs[0]
        return logits

    def calc_loss(self, labels, logits, trainable_vars):
        """Cross-entropy, plus loss_w_dcy/2 * sum of squared kernels and the model's own regularisers."""
        loss, metrics = super().calc_loss(labels, logits, [])
        extra = list(self._extra_losses.get(tf1.get_default_graph(), []))
        kernels = [v for v in trainable_vars if v.op.name.endswith("kernel")]
        if kernels and self.loss_w_dcy:
            extra.append(self.loss_w_dcy * tf.add_n([tf.nn.l2_loss(v) for v in kernels]))
        if extra:
            loss = loss + tf.add_n(extra)
            metrics["loss"] = loss
        return loss, metrics

    def save_weights_from_checkpoint(self, checkpoint, path):
        """Write the file's model with the weights of a learner checkpoint as a Keras file (or SavedModel dir).

        Args:
          checkpoint: a checkpoint prefix of this helper's graphs (float shadow weights under MODEL_SCOPE).
          path: output .h5/.keras file or SavedModel directory, replaced atomically for a file.
        """
        reader = tf.train.load_checkpoint(checkpoint)
        with tf.init_scope():
            for weight in self.source.weights:
                weight.assign(reader.get_tensor("%s/%s" % (model_helper.MODEL_SCOPE, weight_key(weight.name))))
            if path.endswith(_FILE_SUFFIXES):
                base, suffix = os.path.splitext(path)
                temporary = "%s.tmp-%d%s" % (base, os.getpid(), suffix)
                self.source.save(temporary)
                os.replace(temporary, path)
            else:
                self.source.save(path)

    @property
    def model_name(self):
        """The Keras file's name without its suffix."""
        return "keras_" + os.path.splitext(os.path.basename(os.path.normpath(self.keras_path)))[0]

    @property
    def dataset_name(self):
        """'npz_<archive name>' or the built-in data set's name."""
        if self.data_npz is not None:
            return "npz_" + os.path.splitext(os.path.basename(self.data_npz))[0]
        return self.dataset
