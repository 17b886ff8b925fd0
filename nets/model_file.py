"""A ModelHelper over a model file of any format nets.model_formats reads (Keras 3, SavedModel, frozen graph).

A Keras 3 file is rebuilt from tf.compat.v1 ops in each learner graph (nets.model_formats.keras3_graph): batch
norms train with batch statistics and update their moving averages (UPDATE_OPS) in training graphs, use the
moving statistics in evaluation graphs, and dropout is on in training only; a layer it does not map runs frozen
alone (said in one printed note). Any other file (and a Keras 3 file that cannot be rebuilt: a shared layer, a
masked call; also said in a note) is loaded once and
frozen into an inference GraphDef (nets.model_formats); each learner graph imports it on its input tensor. Its
network is the file's inference pass: batch norms use the file's moving statistics, whose scale and offset
train (a frozen affine layer), and dropout is off. Either way the weights are variables named
'model/<weight>' (the same in every graph, so checkpoints restore across graphs and map back to the file).
"""
import hashlib
import os
import sys

import tensorflow as tf

from nets import keras_model
from nets.model_formats import ModelFileError, graph_import, keras3, keras3_graph, load_file_graph
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
        self.rebuild_plan = None
        if self.kind == "keras3":
            model = keras3.load_keras3_model(keras_model_path)
            self.rebuild_plan, reasons = keras3_graph.plan(model, keras_model_path)
            if self.rebuild_plan is not None:
                if reasons:
                    sys.stdout.write("note: Keras 3 model %s: layers %s run as their frozen inference graphs (batch "
                                     "norms inside fixed, dropout off); every other layer trains as in Keras\n"
                                     % (keras_model_path, "; ".join(reasons[:5])))
                    sys.stdout.flush()
                self._use_rebuilt(model)
                return
            sys.stdout.write("note: Keras 3 model %s runs as its frozen inference graph (batch norms fixed at their "
                             "moving statistics, trained as affine layers; dropout off): %s cannot be rebuilt\n"
                             % (keras_model_path, "; ".join(reasons[:5])))
            sys.stdout.flush()
            self.file_graph = keras3.freeze_model(model, keras_model_path)
        else:
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

    def _use_rebuilt(self, model):
        """Keep a mapped Keras 3 model; a scratch build checks it gives [batch, classes] scores from weights."""
        path = self.keras_path
        self.keras3_model = model
        self.input_shape = [None] + list(model.inputs[0].shape[1:])
        graph = tf.Graph()
        with graph.as_default(), tf1.variable_scope("model"):
            logits = self._forward(tf1.placeholder(tf.float32, self.input_shape), is_training=False)
            has_weights = bool(match.find_weight_candidates(graph))
        if logits.shape.rank != 2 or logits.shape[-1] is None:
            raise ModelFileError("%s %s gives an output of shape %s; expected class scores [batch, classes]"
                                 % (self.model_kind, path, logits.shape), path=path)
        if not has_weights:
            raise ModelFileError("%s %s holds no Conv2D, depthwise or Dense weights tfquant can quantize; expected "
                                 "a model with weights" % (self.model_kind, path), path=path)
        self.nb_classes = int(logits.shape[-1])
        self.initial_values = self.rebuild_plan.initial_values()

    @property
    def batch_norms_train(self):
        """True when the network's batch norms use batch statistics in training (a rebuilt Keras 3 model)."""
        return self.rebuild_plan is not None

    def _forward(self, inputs, is_training):
        if self.rebuild_plan is not None:
            logits = keras3_graph.build(self.rebuild_plan, inputs, is_training)
            # A softmax head gives probabilities; the loss and the quantizer want the scores before it.
            return logits.op.inputs[0] if logits.op.type == "Softmax" else logits
        # The file's inference pass in both modes: its batch norms were frozen by the file.
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
