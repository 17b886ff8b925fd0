"""The schema of a report's `fidelity` entry (tfquant.fidelity's output), checked when a report is read.

Kept apart from tfquant.fidelity (which needs TensorFlow sessions) so the report reader stays plain Python.
"""
import math

_NUMBER_FIELDS = ("sqnr_db", "rmse_over_step", "clipped_fraction", "output_sqnr_db")
_LAYER_FIELDS = ("name", "kind", "bits", "values") + _NUMBER_FIELDS + (
    "range_used", "observed", "histogram", "levels", "levels_group")
_TOP_FIELDS = ("examples", "batches", "layers", "output")


def _number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _numbers(value, length=None):
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(v is None or _number(v) for v in value))


def check_fidelity(data, layer_names, error):
    """Raise error(message) unless `data` is a valid fidelity entry naming only layers of `layer_names`.

    Args:
      data: the parsed entry.
      layer_names: the report's layer names.
      error: the exception class to raise (the schema's).
    """
    def require(ok, field, expected):
        if not ok:
            raise error("fidelity.%s is not valid; expected %s" % (field, expected))

    require(isinstance(data, dict) and set(data) <= set(_TOP_FIELDS), "", "an object with only %s"
            % ", ".join(_TOP_FIELDS))
    for field in ("examples", "batches"):
        require(isinstance(data.get(field, 0), int) and data.get(field, 0) >= 0, field, "a count")
    output = data.get("output")
    require(output is None or (isinstance(output, dict) and all(v is None or _number(v) for v in output.values())),
            "output", "null or an object of numbers")
    layers = data.get("layers")
    require(isinstance(layers, list), "layers", "a list")
    for i, layer in enumerate(layers):
        where = "layers[%d]" % i
        require(isinstance(layer, dict) and set(layer) <= set(_LAYER_FIELDS), where,
                "an object with only %s" % ", ".join(_LAYER_FIELDS))
        require(layer.get("name") in layer_names, where + ".name", "a layer the report lists")
        require(layer.get("kind") in ("weight", "activation"), where + ".kind", "weight or activation")
        for field in _NUMBER_FIELDS + ("bits", "values", "levels_group"):
            require(layer.get(field) is None or _number(layer[field]), "%s.%s" % (where, field), "null or a number")
        for field in ("range_used", "observed"):
            require(_numbers(layer.get(field, []), 2) or field not in layer, "%s.%s" % (where, field),
                    "[low, high]")
        require(layer.get("levels") is None or _numbers(layer["levels"]), where + ".levels",
                "null or a list of numbers")
        histogram = layer.get("histogram")
        require(histogram is None or (isinstance(histogram, dict) and _numbers(histogram.get("range"), 2)
                                      and isinstance(histogram.get("counts"), list)
                                      and all(isinstance(c, int) and c >= 0 for c in histogram["counts"])),
                where + ".histogram", "{range: [low, high], counts: [counts]}")
