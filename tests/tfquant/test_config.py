"""QuantConfig validates every field on construction, with messages naming field, value and what is allowed."""
import pytest

import tfquant
from tfquant.config import LayerSetting, match_override, parse_overrides

BITS = "expected an integer from 1 to 16, or 32 for float"


@pytest.mark.parametrize("kwargs,message", [
    ({"weight_bits": 0}, "weight_bits=0 is not a valid bit width; " + BITS),
    ({"weight_bits": 17}, "weight_bits=17 is not a valid bit width; " + BITS),
    ({"weight_bits": "4"}, "weight_bits='4' is not a valid bit width; " + BITS),
    ({"weight_bits": True}, "weight_bits=True is not a valid bit width; " + BITS),
    ({"activation_bits": 33}, "activation_bits=33 is not a valid bit width; " + BITS),
    ({"activation_bits": 4.0}, "activation_bits=4.0 is not a valid bit width; " + BITS),
    ({"use_buckets": "yes"}, "use_buckets='yes' is not valid; expected True or False"),
    ({"quantize_all_layers": 1}, "quantize_all_layers=1 is not valid; expected True or False"),
    ({"bucket_type": "row"}, "bucket_type='row' is not valid; expected one of 'channel', 'split'"),
    ({"bucket_size": 0}, "bucket_size=0 is not valid; expected a positive integer"),
    ({"bucket_size": 2.5}, "bucket_size=2.5 is not valid; expected a positive integer"),
    ({"act_range": "median"}, "act_range='median' is not valid; expected one of 'ema', 'batch'"),
    ({"act_ema_decay": 1.0}, "act_ema_decay=1.0 is not valid; expected a number strictly between 0 and 1"),
    ({"act_ema_decay": 0}, "act_ema_decay=0 is not valid; expected a number strictly between 0 and 1"),
    ({"layer_bits": [4, 40]}, "layer_bits[1]=40 is not a valid bit width; " + BITS),
    ({"layer_bits": 4}, "layer_bits=4 is not valid; expected a list of bit widths, one per layer"),
    ({"weight_overrides": [("conv(", 4)]}, "weight_overrides regex 'conv(' is not valid"),
    ({"weight_overrides": [("conv.*", 5, 6)]}, "weight_overrides entry ('conv.*', 5, 6) is not valid; "
                                              "expected a (regex, bits) pair"),
    ({"weight_overrides": [(3, 4)]}, "weight_overrides entry (3, 4) is not valid; expected the regex to be a string"),
    ({"activation_overrides": {"relu.*": 0}}, "activation_overrides['relu.*']=0 is not a valid bit width; " + BITS),
])
def test_invalid_value_names_field_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError) as info:
        tfquant.QuantConfig(**kwargs)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_defaults_and_valid_values():
    config = tfquant.QuantConfig()
    assert (config.weight_bits, config.activation_bits, config.use_buckets, config.bucket_type,
            config.bucket_size, config.quantize_all_layers, config.act_range) == (4, 32, False, "channel", 256,
                                                                                 False, "ema")
    assert config.weight_bucket_type is None
    config = tfquant.QuantConfig(weight_bits=1, activation_bits=16, use_buckets=True, bucket_type="split",
                                 layer_bits=(2, 32), weight_overrides={"a.*": 3})
    assert config.weight_bucket_type == "split" and config.layer_bits == (2, 32)
    assert config.to_dict()["weight_overrides"] == [["a.*", 3]]


def test_override_parsing_and_full_matching():
    pairs = parse_overrides("weight_overrides", ["model/conv1/.*=8", "a=b=3"])
    assert pairs == [("model/conv1/.*", 8), ("a=b", 3)]  # the last '=' separates
    config = tfquant.QuantConfig(weight_overrides=pairs + [("model/.*", 2)])
    assert match_override(config.weight_overrides, "model/conv1/weights") == (LayerSetting(bits=8), "model/conv1/.*")
    assert match_override(config.weight_overrides, "model/fc/weights") == (LayerSetting(bits=2), "model/.*")
    assert match_override(config.weight_overrides, "xmodel/fc/weights") == (None, None)
    with pytest.raises(ValueError, match="weight_overrides entry 'conv1' is not valid; expected 'regex=bits'"):
        parse_overrides("weight_overrides", ["conv1"])
    with pytest.raises(ValueError, match="entry 'conv1=four' is not valid; expected the bits after '='"):
        parse_overrides("weight_overrides", ["conv1=four"])
