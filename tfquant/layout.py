"""The one vocabulary of range groups: how a weight is cut into groups that each get a range (alpha, beta).

Used alike by the quantization ops, the report's storage accounting, the packed export file and the
configuration: a layout's `kind` is 'none' / 'channel' / 'split', its `bucket_type` (the report's and
QuantConfig's word) is None / 'channel' / 'split'.
"""
import dataclasses
import math
from typing import Optional, Tuple

LAYOUTS = ("none", "channel", "split")
# Storage of one range group: float32 alpha and float32 beta.
RANGE_GROUP_BITS = 2 * 32


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """How a weight is cut into range groups, each with its own alpha and beta.

    kind: 'none' (one group), 'channel' (one group per coordinate of `channel_axes`, numbered in
    row-major order over those axes) or 'split' (consecutive pieces of `bucket_size` elements of the
    row-major flattened tensor; the last piece may be shorter).
    """

    kind: str = "none"
    channel_axes: Tuple[int, ...] = ()
    bucket_size: Optional[int] = None

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError("layout kind=%r is not valid; expected one of %s" % (self.kind, ", ".join(LAYOUTS)))
        if self.kind == "channel" and not self.channel_axes:
            raise ValueError("layout 'channel' needs channel_axes; expected at least one axis")
        if self.kind == "split" and (isinstance(self.bucket_size, bool) or not isinstance(self.bucket_size, int)
                                     or self.bucket_size < 1):
            raise ValueError("layout 'split' bucket_size=%r is not valid; expected a positive integer"
                             % (self.bucket_size,))

    @classmethod
    def from_bucket_type(cls, bucket_type, channel_axes=None, bucket_size=None):
        """The layout a report layer or config names: bucket_type None, 'channel' or 'split'."""
        if bucket_type is None:
            return cls()
        if bucket_type == "channel":
            return cls("channel", channel_axes=tuple(channel_axes or ()))
        if bucket_type == "split":
            return cls("split", bucket_size=bucket_size)
        raise ValueError("bucket_type=%r is not valid; expected None, 'channel' or 'split'" % (bucket_type,))

    @property
    def bucket_type(self):
        """None for one group per tensor, else the kind ('channel' or 'split')."""
        return None if self.kind == "none" else self.kind

    def num_groups(self, shape):
        """Number of range groups of a tensor of static `shape`."""
        shape = [int(d) for d in shape]
        if self.kind == "channel":
            return math.prod(shape[a] for a in self.channel_axes)
        if self.kind == "split":
            return -(-math.prod(shape) // self.bucket_size)
        return 1

    def storage_bits(self, shape):
        """Bits the ranges of a tensor of `shape` take: RANGE_GROUP_BITS per group."""
        return self.num_groups(shape) * RANGE_GROUP_BITS

    def to_dict(self):
        """JSON-able form."""
        return {"kind": self.kind, "channel_axes": list(self.channel_axes), "bucket_size": self.bucket_size}
