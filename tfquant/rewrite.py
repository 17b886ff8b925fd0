"""Inserting quantization into a graph. `reroute_input` is the ONE place that changes an op's input.

Consumers are never rebuilt: their attributes (strides, padding, dilations, data_format, ...) and names
stay exactly as the model built them; only the tensor they read changes.
"""

from tfquant import match


def reroute_input(op, index, new_tensor):
    """Make input `index` of `op` read `new_tensor` instead of its current tensor.

    Args:
      op: an existing tf.Operation.
      index: which input to replace.
      new_tensor: a tensor of the same graph, dtype and a compatible shape.
    """
    old = op.inputs[index]
    if new_tensor.graph is not op.graph:
        raise ValueError("cannot reroute %s: the new tensor %s is in another graph" % (op.name, new_tensor.name))
    if new_tensor.dtype != old.dtype:
        raise ValueError("cannot reroute input %d of %s: dtype %s differs from %s"
                         % (index, op.name, new_tensor.dtype.name, old.dtype.name))
    if not new_tensor.shape.is_compatible_with(old.shape):
        raise ValueError("cannot reroute input %d of %s: shape %s is not compatible with %s"
                         % (index, op.name, new_tensor.shape, old.shape))
    # The private API is confined to this line; everything else goes through this helper.
    op._update_input(index, new_tensor)  # pylint: disable=protected-access


def reroute_consumers(tensor, new_tensor, consumers):
    """Make each op of `consumers` that reads `tensor` read `new_tensor`; untouchable ops are skipped.

    Args:
      tensor: the tensor whose readers move.
      new_tensor: the replacement.
      consumers: the ops to move (normally tensor.consumers() taken before new_tensor was built).
    Returns:
      the number of inputs rerouted.
    """
    count = 0
    for consumer in consumers:
        if match.is_untouchable(consumer):
            continue
        for index, current in enumerate(consumer.inputs):
            if current is tensor:
                reroute_input(consumer, index, new_tensor)
                count += 1
    return count


def insert_after(tensor, build_fn, scope):
    """Build `build_fn(tensor)` under name scope `scope` and move tensor's readers onto its result.

    Args:
      tensor: the tensor to intercept.
      build_fn: tensor -> (new tensor, extra) computing the replacement.
      scope: absolute name scope for the new ops (made unique by TensorFlow if taken).
    Returns:
      (new tensor, extra, number of inputs rerouted).
    """
    # Taken before building, so the new ops (which read `tensor`) are never rerouted onto themselves.
    consumers = list(tensor.consumers())
    with tensor.graph.as_default(), tensor.graph.name_scope(None), tensor.graph.name_scope(scope):
        new_tensor, extra = build_fn(tensor)
    return new_tensor, extra, reroute_consumers(tensor, new_tensor, consumers)
