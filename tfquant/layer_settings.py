"""Per-layer settings an override carries (Distiller style): bits, weight grid and bucket layout.

An override is (regex, LayerSetting); the first override whose regex matches a name in full gives every setting
it sets, and the config's own settings fill the rest. On a command line an entry is `regex=SPEC`, split at the
last '=', where SPEC is one or more ':'-separated tokens, each recognised by its value and each kind at most once:

  bits     an integer 1..16, or 'float' (32: the layer stays float)
  grid     a weight grid name: minmax, symmetric, lsq, ternary, binary
  buckets  none | channel | split | block, optionally with a size: split/128, block/64 (else bucket_size)

`model/conv1/.*=4` is the old form and means what it did; `model/conv1/.*=4:channel:symmetric` also puts that
layer on the symmetric grid with one range per output channel; `model/fc/.*=lsq:none` keeps the bits the other
rules give. Activation overrides take bits only.
"""
import dataclasses
from typing import Optional

from tfquant.config_bits import FLOAT_BITS, VALID_BITS_TEXT, WEIGHT_GRID_BITS, check_bits
from tfquant.errors import TfquantError
from tfquant.layout import MIN_BLOCK_SIZE, valid_block_size

BUCKET_CHOICES = ("none", "channel", "split", "block")
SPEC_TEXT = ("':'-separated tokens: bits (1..16 or 'float'), a grid (%s) and buckets (none, channel, split[/N], "
             "block[/N]), each at most once" % ", ".join(WEIGHT_GRID_BITS))


class OverrideError(TfquantError, ValueError):
    """An override entry is malformed, names an unknown setting, combines settings the grid refuses, or matches
    no layer; the message names the entry."""


@dataclasses.dataclass(frozen=True)
class LayerSetting:
    """What one override sets; None leaves a setting to the config (and, for bits, to the later rules).

    Attributes:
      bits: 1..16, FLOAT_BITS, or None.
      grid: a weight grid name (WEIGHT_GRID_BITS), or None.
      buckets: 'none', 'channel', 'split', 'block', or None.
      bucket_size: elements per bucket for 'split' / 'block' (None: the config's bucket_size).
    """

    bits: Optional[int] = None
    grid: Optional[str] = None
    buckets: Optional[str] = None
    bucket_size: Optional[int] = None

    @property
    def bits_only(self):
        """Whether the setting is the old `regex=bits` kind."""
        return self.grid is None and self.buckets is None

    def to_json(self):
        """bits alone as an int (the old report form), else a dict of the settings it sets."""
        if self.bits_only and self.bits is not None:
            return self.bits
        return {key: value for key, value in dataclasses.asdict(self).items() if value is not None}

    def text(self):
        """The SPEC text of this setting (as parse_spec reads it)."""
        tokens = []
        if self.bits is not None:
            tokens.append("float" if self.bits == FLOAT_BITS else str(self.bits))
        if self.grid is not None:
            tokens.append(self.grid)
        if self.buckets is not None:
            tokens.append(self.buckets + ("/%d" % self.bucket_size if self.bucket_size is not None else ""))
        return ":".join(tokens)


def _entry_name(field, pattern, setting):
    return "%s entry %r" % (field, "%s=%s" % (pattern, setting.text() if isinstance(setting, LayerSetting)
                                               else setting))


def _parse_token(token, found, field, item):
    """Add one SPEC token to `found` {kind: value}; OverrideError when it is unknown or repeats a kind."""
    kind, value = None, None
    if token == "float":
        kind, value = "bits", FLOAT_BITS
    elif token.lstrip("-").isdigit():
        kind, value = "bits", int(token)
    elif token in WEIGHT_GRID_BITS:
        kind, value = "grid", token
    else:
        name, slash, size = token.partition("/")
        if name in BUCKET_CHOICES and (not slash or name in ("split", "block")):
            kind, value = "buckets", name
            if slash:
                if not size.isdigit():
                    raise OverrideError("%s entry %r is not valid: %r has no valid bucket size; expected a positive "
                                        "integer after '/'" % (field, item, token))
                found["bucket_size"] = int(size)
    if kind is None:
        raise OverrideError("%s entry %r is not valid; expected the bits after '=' to be %s, or %s (%r is none of "
                            "them)" % (field, item, VALID_BITS_TEXT, SPEC_TEXT, token))
    if kind in found:
        raise OverrideError("%s entry %r is not valid: it sets %s twice; expected each at most once"
                            % (field, item, kind))
    found[kind] = value


def parse_spec(field, item, spec):
    """The LayerSetting of the SPEC text `spec` of the entry `item` (see the module docstring)."""
    found = {}
    for token in spec.split(":"):
        _parse_token(token.strip(), found, field, item)
    return LayerSetting(**found)


def checked_setting(field, pattern, setting, weights=True):
    """`setting` (a LayerSetting, bits, or a dict of LayerSetting fields) as a checked LayerSetting.

    Args:
      field: 'weight_overrides' or 'activation_overrides' (or the flag), used in messages.
      pattern: the entry's regex text.
      setting: what the entry sets.
      weights: False for activation overrides, which take bits only.
    Raises:
      OverrideError naming the entry.
    """
    if isinstance(setting, dict):
        unknown = sorted(set(setting) - {f.name for f in dataclasses.fields(LayerSetting)})
        if unknown:
            raise OverrideError("%s entry %r sets unknown %s; expected bits, grid, buckets, bucket_size"
                                % (field, pattern, ", ".join(unknown)))
        setting = LayerSetting(**setting)
    elif not isinstance(setting, LayerSetting):
        try:
            setting = LayerSetting(bits=check_bits("%s[%r]" % (field, pattern), setting))
        except ValueError as exc:
            raise OverrideError(str(exc)) from None
    entry = _entry_name(field, pattern, setting)
    if setting == LayerSetting():
        raise OverrideError("%s sets nothing; expected bits, a grid or buckets" % entry)
    if setting.bits is not None:
        try:
            check_bits("%s[%r]" % (field, pattern), setting.bits)
        except ValueError as exc:
            raise OverrideError(str(exc)) from None
    if not weights and not setting.bits_only:
        raise OverrideError("%s is not valid: activation overrides set bits only; expected 'regex=bits'" % entry)
    if setting.grid is not None and setting.grid not in WEIGHT_GRID_BITS:
        raise OverrideError("%s is not valid: unknown grid %r; expected one of %s"
                            % (entry, setting.grid, ", ".join(WEIGHT_GRID_BITS)))
    if setting.buckets is not None and setting.buckets not in BUCKET_CHOICES:
        raise OverrideError("%s is not valid: unknown buckets %r; expected one of %s"
                            % (entry, setting.buckets, ", ".join(BUCKET_CHOICES)))
    size = setting.bucket_size
    if size is not None:
        if setting.buckets not in ("split", "block"):
            raise OverrideError("%s is not valid: a bucket size needs split or block buckets" % entry)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise OverrideError("%s is not valid: bucket size %r; expected a positive integer" % (entry, size))
    if setting.buckets == "block" and size is not None and not valid_block_size(size):
        raise OverrideError("%s is not valid: block size %d; expected a power of 2 >= %d"
                            % (entry, size, MIN_BLOCK_SIZE))
    return setting


def check_grid_bits(entry, grid, bits):
    """OverrideError naming `entry` unless the grid `grid` takes `bits` (FLOAT_BITS fits every grid)."""
    fewest, most = WEIGHT_GRID_BITS[grid]
    if bits != FLOAT_BITS and not fewest <= bits <= most:
        raise OverrideError("%s is not valid: the %s grid takes %s bits, this layer gets %d"
                            % (entry, grid, fewest if fewest == most else "%d to %d" % (fewest, most), bits))


def entry_text(field, pattern, setting):
    """How messages name an override entry: "weight_overrides entry 'regex=SPEC'"."""
    return _entry_name(field, pattern, setting)
