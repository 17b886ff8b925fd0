"""The one layout type: its group counting agrees with the packed format's group numbering and the report."""
import numpy as np
import pytest

import tfquant
from tfquant import config, layout, ops
from tfquant.export import packing
from tfquant.report import LayerReport, layer_layout

CASES = [((3, 3, 4, 5), "none", None, None), ((3, 3, 4, 5), "channel", (3,), None),
         ((3, 3, 4, 2), "channel", (2, 3), None), ((7, 5), "split", None, 4), ((2, 8), "split", None, 16)]


@pytest.mark.parametrize("shape,kind,axes,bucket", CASES)
def test_group_count_matches_brute_force_numbering(shape, kind, axes, bucket):
    group_layout = layout.GroupLayout(kind, channel_axes=axes or (), bucket_size=bucket)
    distinct = len(np.unique(packing.group_index(shape, kind, axes, bucket)))  # the packed file's numbering
    assert group_layout.num_groups(shape) == packing.num_groups(shape, kind, axes, bucket) == distinct
    assert group_layout.storage_bits(shape) == 64 * distinct
    record = LayerReport(name="w", op_type="Conv2D", kind="weight", status="quantized",
                         bucket_type=group_layout.bucket_type, channel_axes=list(axes) if axes else None,
                         bucket_size=bucket)
    assert layer_layout(record) == group_layout


def test_one_name_for_each_idea():
    assert tfquant.GroupLayout is ops.GroupLayout is layout.GroupLayout
    assert ops.LAYOUTS is packing.LAYOUTS is layout.LAYOUTS
    assert tfquant.report.FLOAT_BITS is config.FLOAT_BITS
    assert config.QuantConfig(use_buckets=True, bucket_type="split", bucket_size=8).weight_layout((3,)) == \
        layout.GroupLayout("split", bucket_size=8)
    assert config.QuantConfig().weight_layout((3,)) == layout.GroupLayout()


@pytest.mark.parametrize("bits", [0, 17, 32, True, 2.0])
def test_code_widths_use_the_one_check_bits(bits):
    with pytest.raises(ValueError, match=r"bits=.* is not a valid bit width; expected an integer from 1 to 16$"):
        packing.check_bits(bits)
    assert packing.check_bits(np.int64(3)) == 3
