"""Shared helpers of the benchmarks: machine facts, timing statistics, BENCHMARKS.md sections, and the
ResNet training graphs they time (float, tfquant-rewritten, or TensorFlow's fused fake-quant peer)."""
import datetime
import fcntl
import hashlib
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# As the run scripts do (learners.import_tensorflow_quietly): oneDNN kernels, ~2x faster conv backprop here.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfquant  # noqa: E402
from nets import resnet  # noqa: E402

tf1 = tf.compat.v1
BENCHMARKS_MD = os.path.join(REPO_ROOT, "BENCHMARKS.md")
INTRA_OP_THREADS = 2
NUM_CLASSES = 10
WEIGHT_DECAY = 2e-4


# ----------------------------------------------------------------------------- machine and statistics

def machine_info():
    """What a reader needs to compare figures: cores, TensorFlow, Python, CPU model, load, date."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cores": os.cpu_count(), "cpu": cpu, "tensorflow": tf.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "load_average": load}


def machine_lines(info, load_before=None, busy_remark="absolute times are inflated", session_threads=None):
    """Markdown bullet lines describing the machine `info` (from machine_info()).

    busy_remark says what sharing the machine did to this benchmark's figures; session_threads, when
    given, states the intra-op threads the benchmark's sessions used.
    """
    lines = ["- Machine: %s CPU cores (os.cpu_count()), %s; %s" % (info["cores"], info["cpu"], info["platform"]),
             "- TensorFlow %s, Python %s" % (info["tensorflow"], info["python"])
             + ("; sessions with %d intra-op threads, 1 inter-op thread" % session_threads
                if session_threads else ""),
             "- Date: %s" % info["date"]]
    after = info.get("load_average")
    note = load_note(busy_remark, load_before, after)
    if load_before is not None:
        lines.append("- Load average (1/5/15 min) before: %s, after: %s%s" % (load_before, after, note))
    elif after:
        lines.append("- Load average (1/5/15 min) at the end: %s%s" % (after, note))
    return lines


def load_note(busy_remark, *loads):
    """A remark when other processes were competing for the cores."""
    cores = os.cpu_count() or 1
    busiest = max((load[0] for load in loads if load), default=0.0)
    if busiest > 0.5 * cores:
        return " — the machine was shared with other jobs while this ran: " + busy_remark
    return ""


def median(values):
    values = list(values)
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def timed(fn):
    """(seconds, result) of one call of fn(), on the monotonic high-resolution clock."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def write_json(path, payload):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with open(path, "w") as handle:
        json.dump(payload, handle, indent=2, sort_keys=True)
        handle.write("\n")


# ----------------------------------------------------------------------------- BENCHMARKS.md

def load_full_run(path):
    """The JSON a full run wrote (for --render_json); a --quick run's JSON is refused."""
    with open(path) as handle:
        payload = json.load(handle)
    if payload["quick"]:
        raise SystemExit("%s is from a --quick run; only full runs go into BENCHMARKS.md" % path)
    return payload


def write_section(name, body, path=BENCHMARKS_MD):
    """Replace the text between <!-- BEGIN name --> and <!-- END name --> in `path` with `body`.

    Other sections stay byte for byte; a missing file or section is created (sections appended).
    """
    begin, end = "<!-- BEGIN %s -->" % name, "<!-- END %s -->" % name
    block = "%s\n%s\n%s" % (begin, body.strip("\n"), end)
    # Benchmarks may finish at the same time; the lock keeps one from dropping another's section.
    # Kept outside the repository and never deleted: deleting a lock file races with its next user.
    lock_path = os.path.join(tempfile.gettempdir(), "tfquant-benchmarks-%s.lock"
                             % hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12])
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = _read_or_new(path)
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            # A function replacement, so backslashes in the body are never read as group references.
            text = pattern.sub(lambda _: block, text, count=1)
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        with open(path + ".tmp", "w") as handle:
            handle.write(text if text.endswith("\n") else text + "\n")
        os.replace(path + ".tmp", path)


def _read_or_new(path):
    if os.path.exists(path):
        with open(path) as handle:
            return handle.read()
    return ("# tfquant benchmarks\n\nEach section is written by the script it names; rerun that script to "
            "refresh it. Speed and memory figures depend on the machine and on what else was running; each "
            "section says both.\n")


def command_line(argv=None):
    """The command that reproduces this run, relative to the repository root."""
    argv = list(sys.argv if argv is None else argv)
    script = os.path.relpath(os.path.abspath(argv[0]), REPO_ROOT)
    return " ".join([".venv/bin/python", script] + argv[1:])


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- graphs

def session_config():
    return tf1.ConfigProto(intra_op_parallelism_threads=INTRA_OP_THREADS, inter_op_parallelism_threads=1)


def tfquant_config(weight_bits, activation_bits, buckets, bucket_size=256):
    """QuantConfig for a benchmark mode; buckets is 'none', 'channel' or 'split'."""
    if buckets == "none":
        return tfquant.QuantConfig(weight_bits=weight_bits, activation_bits=activation_bits)
    return tfquant.QuantConfig(weight_bits=weight_bits, activation_bits=activation_bits, use_buckets=True,
                               bucket_type=buckets, bucket_size=bucket_size)


def _weight_layers_in_order(graph):
    """(op, input index) of every Conv2D / MatMul reading a trainable variable, in creation order.

    Creation order is data-flow order for nets/resnet.py (conv0 first, fc last).
    """
    trainable = {v.op.name for v in graph.get_collection(tf1.GraphKeys.TRAINABLE_VARIABLES)}
    found = []
    for op in graph.get_operations():
        if op.type not in ("Conv2D", "MatMul"):
            continue
        source = op.inputs[1].op
        while source.type in ("Identity", "ReadVariableOp") and source.inputs:
            source = source.inputs[0].op
        if source.name in trainable:
            found.append((op, 1))
    return found


def add_fused_fake_quant(graph, weight_bits, activation_bits):
    """TensorFlow's own fused fake-quant ops on the layers tfquant quantizes by default.

    Weights of every Conv2D / MatMul except the first and last go through
    fake_quant_with_min_max_vars_per_channel with the per-output-channel min/max of the weight;
    every Relu output goes through fake_quant_with_min_max_vars with the batch's min/max. The ranges
    are batch tensors (no moving-average variables), which makes this peer as cheap as it can be.
    Returns the number of weight and activation insertions.
    """
    layers = _weight_layers_in_order(graph)[1:-1]
    relus = [op for op in graph.get_operations() if op.type == "Relu"]
    with graph.as_default():
        for op, index in layers:
            weight = op.inputs[index]
            axes = list(range(weight.shape.rank - 1))
            with tf.name_scope(op.name + "/peer_weight_quant"):
                lo = tf.stop_gradient(tf.reduce_min(weight, axis=axes))
                hi = tf.stop_gradient(tf.reduce_max(weight, axis=axes))
                quantized = tf.quantization.fake_quant_with_min_max_vars_per_channel(
                    weight, lo, hi, num_bits=weight_bits, narrow_range=False)
            tfquant.reroute_input(op, index, quantized)
        for op in relus:
            output = op.outputs[0]
            consumers = list(output.consumers())
            if not consumers:
                continue
            with tf.name_scope(op.name + "/peer_act_quant"):
                lo = tf.stop_gradient(tf.reduce_min(output))
                hi = tf.stop_gradient(tf.reduce_max(output))
                quantized = tf.quantization.fake_quant_with_min_max_vars(
                    output, lo, hi, num_bits=activation_bits, narrow_range=False)
            for consumer in consumers:
                for i, tensor in enumerate(consumer.inputs):
                    if tensor is output:
                        tfquant.reroute_input(consumer, i, quantized)
    return len(layers), len(relus)


def _loss(logits, labels):
    cross_entropy = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
    weights = [v for v in tf1.trainable_variables() if v.op.name.endswith("weights")]
    return cross_entropy + WEIGHT_DECAY * tf.add_n([tf.nn.l2_loss(v) for v in weights])


def random_batch(batch_size, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((batch_size, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
    return images, labels


class TrainGraph:
    """A ResNet training step on a fixed in-graph batch, in its own graph.

    quant is None (float), a tfquant.QuantConfig, or ('peer', weight_bits, activation_bits) for
    TensorFlow's fused fake-quant ops. The batch is a tf.constant so no input pipeline is timed.
    """

    def __init__(self, resnet_size, batch_size, quant=None, build_train_op=True, seed=0):
        self.graph = tf.Graph()
        self.report = None
        with self.graph.as_default():
            tf1.set_random_seed(seed)
            images, labels = random_batch(batch_size, seed)
            images = tf.constant(images, name="images")
            labels = tf.constant(labels, name="labels")
            logits = resnet.forward_resnet(images, True, resnet_size, NUM_CLASSES)
            self.ops_after_forward = len(self.graph.get_operations())
            if isinstance(quant, tfquant.QuantConfig):
                self.report = tfquant.quantize_graph(self.graph, quant, is_training=True)
            elif quant is not None:
                _, weight_bits, activation_bits = quant
                add_fused_fake_quant(self.graph, weight_bits, activation_bits)
            self.loss = _loss(logits, labels)
            self.train_op = None
            if build_train_op:
                global_step = tf1.train.get_or_create_global_step()
                optimizer = tf1.train.MomentumOptimizer(0.01, 0.9)
                with tf.control_dependencies(tf1.get_collection(tf1.GraphKeys.UPDATE_OPS)):
                    self.train_op = optimizer.minimize(self.loss, global_step=global_step)
            self.init_op = tf1.global_variables_initializer()
        self.graph.finalize()
        self.sess = None

    def start(self):
        self.sess = tf1.Session(graph=self.graph, config=session_config())
        self.sess.run(self.init_op)
        return self

    def step(self, options=None, run_metadata=None):
        self.sess.run(self.train_op, options=options, run_metadata=run_metadata)

    def close(self):
        if self.sess is not None:
            self.sess.close()
            self.sess = None


def build_loss_graph(resnet_size, batch_size):
    """A fresh graph with the ResNet forward pass and loss (no gradients); returns (graph, op count)."""
    graph = tf.Graph()
    with graph.as_default():
        images, labels = random_batch(batch_size)
        logits = resnet.forward_resnet(tf.constant(images), True, resnet_size, NUM_CLASSES)
        _loss(logits, tf.constant(labels))
    return graph, len(graph.get_operations())


def current_rss_kb():
    """Resident set size now, in KiB (Linux /proc), or None elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None
