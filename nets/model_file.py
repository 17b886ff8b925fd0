"""A ModelHelper over a model file of any format nets.model_formats reads (Keras 3, SavedModel, frozen graph).

The file is loaded once and frozen into an inference GraphDef (nets.model_formats); each learner graph imports
it on its input tensor with the file's weights, biases and batch-norm parameters as variables named
'model/<weight>' (the same in every graph, so checkpoints restore across graphs and map back to the file).
The network is the file's inference pass: batch norms use the file's moving statistics, whose scale and
offset train (a frozen affine layer; --uql_fold_batch_norms folds them into the weights where tfquant's
folding pass matches them), and dropout is off.
"""
import hashlib
import os

import tensorflow as tf

from nets import keras_model
from nets.model_formats import ModelFileError, graph_import, load_file_graph
from tfquant import match

tf1 = tf.compat.v1


class ModelFileHelper(keras_model.KerasModelHelper):
    """A classifier given as a model file, on an .npz data set or a built-in one (images reach it as float32)."""

    digest_key = "model_sha256"

    def __init__(self, model, kind, signature="serving_default", input_name=None, output_name=None, **kwargs):
        """Loads the model file and the data, and checks that they fit each other.

        Args:
          model: the model file or SavedModel directory.
          kind: its format (nets.model_formats.detect_format), not 'tf_keras'.
          signature, input_name, output_name: which function of a SavedModel, which tensors of a graph.
          kwargs: as for KerasModelHelper (data_npz or dataset, batch sizes, ...), without keras_unsafe.
        """
        self.kind, self.signature, self.input_name, self.output_name = kind, signature, input_name, output_name
        super().__init__(keras_model=model, **kwargs)
        # Another signature or tensor of the same file is another model: a rerun must not resume this one's runs.
        chosen = "%s|%s|%s|%s" % (self.input_digests[self.digest_key], signature, input_name, output_name)
        self.input_digests[self.digest_key] = hashlib.sha256(chosen.encode("utf-8")).hexdigest()

    @property
    def model_kind(self):
        """The format's name, for messages."""
        return {"keras3": "Keras 3 model", "saved_model": "SavedModel", "frozen_graph": "frozen graph"}[self.kind]

    def _load_model(self, keras_model_path, keras_unsafe):
        if keras_unsafe:
            raise ModelFileError("--keras_unsafe is not valid for the %s %s; Lambda layers load only from tf_keras "
                                 "files" % (self.model_kind, keras_model_path), path=keras_model_path)
        self.file_graph = load_file_graph(keras_model_path, self.kind, self.signature, self.input_name,
                                          self.output_name)
        self.prepared = graph_import.prepare(self.file_graph)
        self.input_shape = list(self.file_graph.input_shape)
        self._check_import()

    def _check_import(self):
        """Import once into a scratch graph: the graph must import, give [batch, classes] scores and hold weights."""
        path = self.keras_path
        graph = tf.Graph()
        with graph.as_default():
            images = tf1.placeholder(tf.float32, self.input_shape)
            with tf1.variable_scope("model"):
                logits = graph_import.import_graph(self.prepared, images)
        if logits.shape.rank != 2 or logits.shape[-1] is None:
            raise ModelFileError("%s %s gives an output of shape %s; expected class scores [batch, classes] (name "
                                 "the output with --output_name)" % (self.model_kind, path, logits.shape), path=path)
        if not self.prepared.parameters:
            raise ModelFileError("%s %s holds no weights tfquant can train (no Const read by a Conv2D, MatMul, "
                                 "depthwise or BatchMatMul op); expected a model with weights"
                                 % (self.model_kind, path), path=path)
        self.nb_classes = int(logits.shape[-1])
        self.initial_values = {p.name: p.value for p in self.prepared.parameters.values()}

    def _forward(self, inputs, is_training):
        # The file's inference pass in both modes: its batch norms were frozen by the file.
        del is_training
        return graph_import.import_graph(self.prepared, inputs)

    def calc_loss(self, labels, logits, trainable_vars):
        """Cross-entropy plus loss_w_dcy/2 * sum of squared weights of the matmul-like ops."""
        loss, metrics = keras_model.model_helper.ClassifierModelHelper.calc_loss(self, labels, logits, [])
        weights = {c.variable_name for c in match.find_weight_candidates(logits.graph) if c.variable_name}
        decayed = [v for v in trainable_vars if v.op.name in weights]
        if decayed and self.loss_w_dcy:
            loss = loss + self.loss_w_dcy * tf.add_n([tf.nn.l2_loss(v) for v in decayed])
            metrics["loss"] = loss
        return loss, metrics

    def save_weights_from_checkpoint(self, checkpoint, path):
        """Not used: model files are saved back by nets.model_formats.saving (--save_model)."""
        raise ModelFileError("--uql_save_keras is for tf_keras files; expected --save_model for the %s %s"
                             % (self.model_kind, self.keras_path), path=self.keras_path)

    @property
    def model_name(self):
        """'file_' and the model file's name without its suffix."""
        return "file_" + os.path.splitext(os.path.basename(os.path.normpath(self.keras_path)))[0]
