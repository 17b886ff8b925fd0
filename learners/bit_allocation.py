"""Automatic per-layer bits (--uql_auto_bits): measure the float checkpoint's sensitivities, solve, store.

The allocation is stored as bit_allocation.json beside the quantized checkpoint. A resumed run reads it back
(checked against the model and the budget flags) instead of measuring again; evaluation replays the bits the
report recorded. Sensitivities come from the first --uql_sensitivity_batches batches of the seeded training
stream, so the same seed and float checkpoint give the same bits.
"""
import concurrent.futures
import os
import time

import tensorflow as tf

import tfquant
from learners import graphs, run_settings, training
from learners.errors import UserError
from tfquant import allocation, files, sensitivity

tf1 = tf.compat.v1
ALLOCATION_NAME = "bit_allocation.json"
ALLOCATION_VERSION = 1


class AllocationFileError(UserError):
    """A stored allocation cannot be read or does not fit this model and these flags."""


def allocation_path(save_path):
    """bit_allocation.json beside the quantized checkpoint prefix `save_path`."""
    return os.path.join(os.path.dirname(os.path.abspath(save_path)), ALLOCATION_NAME)


def _budgets(settings):
    """[(kind, flag prefix, equivalent bits, min, max)] of the budgets in force."""
    budgets = [(sensitivity.WEIGHT, "uql_", settings.uql_equivalent_bits, settings.uql_w_bit_min,
                settings.uql_w_bit_max)]
    if settings.uql_a_equivalent_bits is not None:
        budgets.append((sensitivity.ACTIVATION, "uql_a_", settings.uql_a_equivalent_bits, settings.uql_a_bit_min,
                        settings.uql_a_bit_max))
    return budgets


def measured_widths(settings):
    """{kind: narrowest widths measured by loss runs} (0: all; the wider ones are estimated to first order)."""
    return {sensitivity.WEIGHT: settings.uql_w_measured_widths, sensitivity.ACTIVATION: settings.uql_a_measured_widths}


def _training_batches(helper, seed, count):
    """The first `count` (images, labels) batches of the seeded training stream, as arrays.

    Read in a graph of their own: closing a session whose graph also holds the model while its input
    pipeline is running took seconds, more than the measuring itself.
    """
    graph, images, labels = _training_stream(helper, seed)
    return _read_batches(graph, images, labels, count)


def _training_stream(helper, seed):
    """(graph, images, labels) of the seeded training stream, in a graph of its own."""
    graph = tf.Graph()
    with graph.as_default():
        tf1.set_random_seed(seed)
        images, labels = helper.build_dataset_train()
    return graph, images, labels


def _read_batches(graph, images, labels, count):
    with graphs.new_session(graph) as sess:
        return [tuple(sess.run([images, labels])) for _ in range(count)]


def _batches_and_float_model(helper, seed, count):
    """(_training_batches, _float_model on their shapes): the batches are read in a thread while the model is
    built when the stream's shapes are static (the reading is TensorFlow's own threads, the building Python's:
    the two took a fifth of ResNet-20's search one after the other)."""
    graph, images, labels = _training_stream(helper, seed)
    if not (images.shape.is_fully_defined() and labels.shape.is_fully_defined()):
        batches = _read_batches(graph, images, labels, count)
        return batches, _float_model(helper, batches[0])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reading = pool.submit(_read_batches, graph, images, labels, count)
        model = _float_model_of(helper, [(images.dtype, images.shape), (labels.dtype, labels.shape)])
        return reading.result(), model


def _float_model(helper, batch):
    """The float model's evaluation forward pass on placeholders shaped like `batch` (an (images, labels)
    pair of arrays): (graph, images, labels, loss)."""
    return _float_model_of(helper, [(tf.as_dtype(value.dtype), value.shape) for value in batch])


def _float_model_of(helper, specs):
    """_float_model on placeholders of the (dtype, shape) pairs `specs` of images and labels."""
    graph = tf.Graph()
    with graph.as_default():
        images, labels = (tf1.placeholder(dtype, shape, name=name)
                          for (dtype, shape), name in zip(specs, ("images", "labels")))
        logits = helper.forward_eval(images)
        # Cross-entropy alone: weight decay does not see the quantized values fed in.
        _, metrics = helper.calc_loss(labels, logits, [])
    return graph, images, labels, metrics["cross_entropy"]


def _targets(graph, config, settings):
    weights, activations = sensitivity.find_targets(graph, config)
    if not weights:
        raise UserError("--uql_auto_bits has no weight layer to allocate (the first and last layers stay float); "
                        "expected a model with inner layers or --uql_quantize_all_layers")
    by_kind = {sensitivity.WEIGHT: weights, sensitivity.ACTIVATION: activations}
    if settings.uql_a_equivalent_bits is not None and not activations:
        raise UserError("--uql_a_equivalent_bits=%s: the model has no activation to allocate; expected a model with "
                        "activation ops" % settings.uql_a_equivalent_bits)
    return {kind: by_kind[kind] for kind, *_ in _budgets(settings)}


def measure_and_solve(helper, settings, config, float_checkpoint):
    """Measure sensitivities of `float_checkpoint` and solve every budget; returns the allocation record."""
    start = time.perf_counter()
    batches, (graph, images, labels, loss) = _batches_and_float_model(helper, settings.seed,
                                                                      settings.uql_sensitivity_batches)
    targets = _targets(graph, config, settings)
    widths = {kind: sensitivity.checked_widths(low, high) for kind, _, _, low, high in _budgets(settings)}
    with graph.as_default():
        model_variables = list(tf1.global_variables())
    # About 50 feed signatures (one per target), each run a few times: grappler's first-run optimization of
    # each took a third of the search (measured on ResNet-20) and the runs are no faster for it.
    with graphs.new_session(graph, optimize_graph=False) as sess:
        graphs.restore_variables(sess, model_variables, float_checkpoint)
        feeds = [{images: image_values, labels: label_values} for image_values, label_values in batches]
        measured = sensitivity.measure(sess, loss, feeds, [t for kind in targets for t in targets[kind]], widths,
                                       measured_widths(settings))
    record = {"version": ALLOCATION_VERSION, "seed": settings.seed,
              "sensitivity_batches": settings.uql_sensitivity_batches,
              "measured_widths": measured_widths(settings),
              "float_checkpoint": os.path.relpath(os.path.abspath(float_checkpoint),
                                                  os.path.dirname(allocation_path(settings.uql_save_quant_model_path)))}
    for kind, prefix, equivalent, low, high in _budgets(settings):
        items = [allocation.AllocationItem(t.name, t.size, sensitivity.non_increasing(measured[t.name]))
                 for t in targets[kind]]
        try:
            solved = allocation.solve(items, equivalent)
        except allocation.AllocationError as exc:
            raise UserError("--%sequivalent_bits=%s: %s" % (prefix, equivalent, exc))
        record[kind] = {
            "equivalent_bits": equivalent, "bit_min": low, "bit_max": high, "budget_bits": solved.budget_bits,
            "used_bits": solved.used_bits, "mean_bits": solved.mean_bits, "total_sensitivity": solved.objective,
            "layers": [{"name": t.name, "ops": list(t.op_names), "size": t.size, "bits": solved.bits[t.name],
                        "sensitivity": {str(b): v for b, v in sorted(item.sensitivities.items())},
                        "measured": {str(b): v for b, v in sorted(measured[t.name].items())}}
                       for t, item in zip(targets[kind], items)]}
    record["search_seconds"] = time.perf_counter() - start
    return record


def _check_stored(record, path, targets, settings):
    """Refuse a stored allocation that is malformed, of another model, or outside the current budgets."""
    def fail(what):
        raise AllocationFileError("bit allocation %s %s; expected the file a --uql_auto_bits run wrote for this "
                                  "model and budget (delete it to measure again)" % (path, what))

    if not isinstance(record, dict) or record.get("version") != ALLOCATION_VERSION:
        fail("is not an allocation record of version %d" % ALLOCATION_VERSION)
    for kind, prefix, equivalent, low, high in _budgets(settings):
        entry = record.get(kind)
        if not isinstance(entry, dict) or not isinstance(entry.get("layers"), list):
            fail("has no %s allocation" % kind)
        if entry.get("equivalent_bits") != equivalent:
            fail("was made for --%sequivalent_bits=%s, not %s" % (prefix, entry.get("equivalent_bits"), equivalent))
        want = [(t.name, list(t.op_names), t.size) for t in targets[kind]]
        layers = entry["layers"]
        got = [(layer.get("name"), layer.get("ops"), layer.get("size")) if isinstance(layer, dict) else None
               for layer in layers]
        if got != want:
            fail("lists other %s layers than this model's" % kind)
        used = 0
        for layer in layers:
            bits = layer.get("bits")
            if isinstance(bits, bool) or not isinstance(bits, int) or not low <= bits <= high:
                fail("gives %s %r bits; expected %d to %d" % (layer["name"], bits, low, high))
            used += bits * layer["size"]
        budget = allocation.budget_bits(sum(t.size for t in targets[kind]), equivalent)
        if used > budget:
            fail("uses %d %s storage bits; the budget is %d" % (used, kind, budget))


def _write_summaries(record, log_dir):
    """Each layer's sensitivity against bits (the step axis) and its chosen bits, for TensorBoard."""
    with tf.Graph().as_default():  # FileWriter refuses eager mode; the run scripts are otherwise graph-only
        writer = tf1.summary.FileWriter(log_dir)
    try:
        for kind in (sensitivity.WEIGHT, sensitivity.ACTIVATION):
            for layer in (record.get(kind) or {}).get("layers", []):
                for bits, value in layer["sensitivity"].items():
                    summary = tf1.Summary(value=[tf1.Summary.Value(tag="sensitivity/" + layer["name"],
                                                                   simple_value=value)])
                    writer.add_summary(summary, int(bits))
                writer.add_summary(tf1.Summary(value=[tf1.Summary.Value(tag="auto_bits/" + layer["name"],
                                                                        simple_value=layer["bits"])]), 0)
    finally:
        writer.close()


def allocate(helper, settings, config, float_checkpoint, resuming):
    """The QuantConfig with the allocated bits as explicit_bits, and the allocation record.

    Args:
      helper: the ModelHelper.
      settings: the parsed flags (uql_auto_bits set).
      config: the QuantConfig the other flags describe.
      float_checkpoint: the float checkpoint the sensitivities are measured on.
      resuming: a quantized checkpoint exists; its stored allocation is reused when present.
    Returns:
      (QuantConfig, record dict as stored in bit_allocation.json).
    """
    path = allocation_path(settings.uql_save_quant_model_path)
    if resuming and os.path.lexists(path):
        record = files.load_json_file(path, AllocationFileError, "bit allocation")
        graph = _float_model(helper, _training_batches(helper, settings.seed, 1)[0])[0]
        _check_stored(record, path, _targets(graph, config, settings), settings)
        training.log("uniform: reusing the bit allocation in %s" % path)
    else:
        training.log("uniform: measuring layer sensitivities on %d training batches of %s"
                     % (settings.uql_sensitivity_batches, float_checkpoint))
        record = measure_and_solve(helper, settings, config, float_checkpoint)
        run_settings.write_json(path, record, "bit allocation")
        _write_summaries(record, os.path.join(settings.log_dir, "uniform", "allocation"))
        training.log(summary_line(record))
    explicit = {}
    for kind, *_ in _budgets(settings):
        for layer in record[kind]["layers"]:
            explicit.update({op: layer["bits"] for op in layer["ops"]})
    # Through to_dict: the frozen config's fields hold compiled patterns its constructor does not take back.
    return tfquant.QuantConfig(**dict(config.to_dict(), explicit_bits=explicit)), record


def summary_line(record):
    """One line: the achieved mean bits against each budget, and the search time."""
    parts = []
    for kind in (sensitivity.WEIGHT, sensitivity.ACTIVATION):
        entry = record.get(kind)
        if entry:
            parts.append("%s mean %.3f bits (budget %s)" % (kind, entry["mean_bits"], entry["equivalent_bits"]))
    return "uniform: bit allocation: %s; search %.1f s" % ("; ".join(parts), record["search_seconds"])
