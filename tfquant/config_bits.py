"""Bit widths and the widths each weight grid takes: what a setting of bits may be (config and overrides)."""
import numbers

FLOAT_BITS = 32
MAX_CODE_BITS = 16
VALID_BITS_TEXT = "an integer from 1 to 16, or 32 for float"
VALID_CODE_BITS_TEXT = "an integer from 1 to 16"
# The weight grids (tfquant.weight_grids) by name, with the code widths each takes (fewest, most): minmax is
# PocketFlow's; lsq learns a step on a signed grid; ternary codes -1, 0, +1 and binary the sign, times a
# per-group scale; symmetric (weight_scheme) is zero point 0 on the narrow grid +-(2^(k-1)-1), the grid int8
# convolution kernels (TFLite, ONNX) store, so a trained k <= 8 bit weight deploys unchanged.
WEIGHT_GRID_BITS = {"minmax": (1, MAX_CODE_BITS), "lsq": (2, MAX_CODE_BITS), "ternary": (2, 2), "binary": (1, 1),
                    "symmetric": (2, MAX_CODE_BITS)}


def check_bits(field, value, allow_float=True):
    """Raise ValueError unless `value` is a valid bit width: 1..16, or 32 for float when allow_float.

    Args:
      field: the name of the setting, used in the message.
      value: the bit width given (a Python or NumPy integer).
      allow_float: accept FLOAT_BITS (a setting); False for the width of integer codes.
    Returns:
      the bit width as an int.
    """
    # bool is an int subclass; `True` bits is a typo, never a bit width.
    valid = (not isinstance(value, bool) and type(value).__name__ != "bool_" and isinstance(value, numbers.Integral)
             and (1 <= value <= MAX_CODE_BITS or (allow_float and value == FLOAT_BITS)))
    if not valid:
        raise ValueError("%s=%r is not a valid bit width; expected %s"
                         % (field, value, VALID_BITS_TEXT if allow_float else VALID_CODE_BITS_TEXT))
    return int(value)
