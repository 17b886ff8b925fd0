"""The one vocabulary of range groups: how a weight is cut into groups that each get a range (alpha, beta).

Used alike by the quantization ops, the report's storage accounting, the packed export file and the
configuration: a layout's `kind` is 'none' / 'channel' / 'split' / 'block', its `bucket_type` (the report's
and QuantConfig's word) is None / 'channel' / 'split' / 'block'.

'block' is the layout of runtime k-bit matrix kernels (onnxruntime's MatMulNBits): the weight seen as a
matrix [R, N] whose columns are its output channels (the `channel_axes`, row-major) and whose rows are every
other axis in C order (the reduction: a Dense kernel's input features, a convolution's kernel positions x
input channels), cut along the rows into blocks of `bucket_size`; one range per (block, column). Groups are
numbered row-major over [ceil(R / bucket_size), N] (the block index varies slowest), the shape of a
DequantizeLinear's blocked scale on a [K, N] MatMul weight. The last block of a column is shorter when
bucket_size does not divide R.
"""
import dataclasses
import math
from typing import Optional, Tuple

LAYOUTS = ("none", "channel", "split", "block")
# Storage of one range group: float32 alpha and float32 beta.
RANGE_GROUP_BITS = 2 * 32
# Block sizes the runtimes' k-bit kernels take (onnxruntime's MatMulNBits): powers of 2 from 16.
MIN_BLOCK_SIZE = 16


def valid_block_size(size):
    """Whether `size` is a block size the runtimes take: a power of 2 >= MIN_BLOCK_SIZE."""
    return (not isinstance(size, bool) and isinstance(size, int) and size >= MIN_BLOCK_SIZE
            and size & (size - 1) == 0)


@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """How a weight is cut into range groups, each with its own alpha and beta.

    kind: 'none' (one group), 'channel' (one group per coordinate of `channel_axes`, numbered in
    row-major order over those axes), 'split' (consecutive pieces of `bucket_size` elements of the
    row-major flattened tensor; the last piece may be shorter) or 'block' (per output channel on
    `channel_axes`, blocks of `bucket_size` consecutive elements of the other axes; see the module
    docstring).
    """

    kind: str = "none"
    channel_axes: Tuple[int, ...] = ()
    bucket_size: Optional[int] = None

    def __post_init__(self):
        if self.kind not in LAYOUTS:
            raise ValueError("layout kind=%r is not valid; expected one of %s" % (self.kind, ", ".join(LAYOUTS)))
        if self.kind in ("channel", "block") and not self.channel_axes:
            raise ValueError("layout %r needs channel_axes; expected at least one axis" % self.kind)
        if self.kind in ("split", "block") and (isinstance(self.bucket_size, bool)
                                                or not isinstance(self.bucket_size, int) or self.bucket_size < 1):
            raise ValueError("layout %r bucket_size=%r is not valid; expected a positive integer"
                             % (self.kind, self.bucket_size))

    @classmethod
    def from_bucket_type(cls, bucket_type, channel_axes=None, bucket_size=None):
        """The layout a report layer or config names: bucket_type None, 'channel', 'split' or 'block'."""
        if bucket_type is None:
            return cls()
        if bucket_type == "channel":
            return cls("channel", channel_axes=tuple(channel_axes or ()))
        if bucket_type == "split":
            return cls("split", bucket_size=bucket_size)
        if bucket_type == "block":
            return cls("block", channel_axes=tuple(channel_axes or ()), bucket_size=bucket_size)
        raise ValueError("bucket_type=%r is not valid; expected None, 'channel', 'split' or 'block'"
                         % (bucket_type,))

    @property
    def bucket_type(self):
        """None for one group per tensor, else the kind ('channel', 'split' or 'block')."""
        return None if self.kind == "none" else self.kind

    def block_matrix(self, shape):
        """(permutation putting the reduction axes first and the channel axes last, R, N) of a 'block'
        layout over a tensor of `shape`: the tensor transposed by the permutation is the matrix [R, N]."""
        rank = len(shape)
        channels = [a % rank for a in self.channel_axes]
        rows = [a for a in range(rank) if a not in channels]
        return (tuple(rows + channels), math.prod(int(shape[a]) for a in rows),
                math.prod(int(shape[a]) for a in channels))

    def num_groups(self, shape):
        """Number of range groups of a tensor of static `shape`."""
        shape = [int(d) for d in shape]
        if self.kind == "channel":
            return math.prod(shape[a] for a in self.channel_axes)
        if self.kind == "split":
            return -(-math.prod(shape) // self.bucket_size)
        if self.kind == "block":
            _, rows, columns = self.block_matrix(shape)
            return -(-rows // self.bucket_size) * columns
        return 1

    def group_elements(self, shape):
        """Elements of a full range group of a tensor of `shape` (the first one: the last may be shorter)."""
        if self.kind == "split":
            return self.bucket_size
        if self.kind == "block":
            return min(self.bucket_size, self.block_matrix(shape)[1])
        return math.prod(int(d) for d in shape) // self.num_groups(shape)

    def storage_bits(self, shape):
        """Bits the ranges of a tensor of `shape` take: RANGE_GROUP_BITS per group."""
        return self.num_groups(shape) * RANGE_GROUP_BITS

    def to_dict(self):
        """JSON-able form."""
        return {"kind": self.kind, "channel_axes": list(self.channel_axes), "bucket_size": self.bucket_size}
