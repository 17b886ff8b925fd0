"""Files from elsewhere: crafted packed models and reports must be refused quickly, in bounded memory.

Every case asserts the error class and the words of its one-line message. Cases that could hang or
exhaust memory on a broken reader (FIFOs, devices, zlib bombs, 100k duplicate names, deep JSON, a
catastrophic regular expression) run in one child process with a timeout, which reports each case's
time and the growth of its peak RSS over the baseline of the imported modules.
"""
import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest

from tfquant import config as config_module
from tfquant.export import packed_reader, packing
from tfquant.export.packed_file import FloatTensor, PackedFileError, QuantizedTensor, write_packed_model
from tfquant.export.packed_reader import read_packed_model
from tfquant.report import QuantReport, ReportError, config_from_report, read_report

MAGIC = b"TFQPACK\x00"
# CPU seconds per rejection (the 2 s): CPU time, because 2 cores are shared with other jobs.
REJECT_SECONDS = 2.0
# Wall-clock bound, generous: it only has to tell a hang (a FIFO read blocks without using CPU) apart.
HANG_SECONDS = 20.0
MEMORY_BOUND_MB = 200


# ----- building files -------------------------------------------------------------------------------

def _small_model():
    rng = np.random.default_rng(3)
    return [
        QuantizedTensor("conv/w", (2, 2, 1, 3), 1, "channel", (3,), None, rng.integers(0, 2, (2, 2, 1, 3)),
                        [0.5, 1.0, 2.0], [-1.0, 0.0, 0.5]),
        QuantizedTensor("fc/w", (5, 3), 3, "split", None, 4, rng.integers(0, 8, (5, 3)),
                        rng.uniform(0.1, 1, 4), rng.uniform(-1, 0, 4)),
        QuantizedTensor("dw/w", (3,), 8, "none", None, None, [0, 17, 255], [1.5], [-0.25]),
        FloatTensor("bn/gamma", np.arange(3, dtype=np.float32)),
        FloatTensor("step", np.array(7, dtype=np.int64)),
    ]


def _parts(data):
    """(index dict, payload bytes) of a packed file."""
    index_len = int.from_bytes(data[12:16], "little")
    payload_start = -(-(24 + index_len) // 8) * 8
    return json.loads(zlib.decompress(data[24:24 + index_len])), data[payload_start:-32]


def _craft(path, index=None, payload=b"", compressed=None, flags=0, version=1, pad_byte=0,
           payload_len=None):
    """A packed file with a valid checksum around whatever header, index and payload are given."""
    if compressed is None:
        compressed = zlib.compress(json.dumps(index).encode())
    payload_len = len(payload) if payload_len is None else payload_len
    body = struct.pack("<8sHHIQ", MAGIC, version, flags, len(compressed), payload_len) + compressed
    body += bytes([pad_byte]) * (-len(body) % 8)
    body += payload
    path.write_bytes(body + hashlib.sha256(body).digest())
    return path


@pytest.fixture
def small_file(tmp_path):
    path = tmp_path / "small.tfq"
    write_packed_model(path, _small_model(), {"model": "tiny"})
    return path


def _refused(path, *fragments, error=PackedFileError):
    with pytest.raises(error) as info:
        read_packed_model(path) if error is PackedFileError else read_report(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ----- packed file: in-process cases ----------------------------------------------------------------

def test_small_file_round_trips(small_file):
    tensors, metadata = read_packed_model(small_file)
    assert metadata == {"model": "tiny"}
    for read, written in zip(tensors, _small_model()):
        assert read.name == written.name
        if isinstance(read, QuantizedTensor):
            assert np.array_equal(read.codes, written.codes)
        else:
            assert read.array.tobytes() == written.array.tobytes()


def test_truncation_at_every_offset(small_file):
    data = small_file.read_bytes()
    for keep in range(len(data)):
        small_file.write_bytes(data[:keep])
        message = _refused(small_file)
        assert ("empty" in message) if keep == 0 else any(
            word in message for word in ("truncated", "magic", "declares")), (keep, message)


def test_every_bit_flip(small_file):
    data = small_file.read_bytes()
    for offset in range(len(data)):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << (offset % 8)
        small_file.write_bytes(bytes(flipped))
        _refused(small_file)


def _mutated(small_file, mutate):
    index, payload = _parts(small_file.read_bytes())
    payload = bytearray(payload)
    mutate(index, payload)
    return _craft(small_file, index, bytes(payload))


def _set(entry, key, value):
    return lambda index, payload: index["t"][entry].__setitem__(key, value)


@pytest.mark.parametrize("mutate,fragment", [
    (_set(1, "o", 0), "overlaps"),
    (_set(4, "o", 0), "overlaps"),
    (_set(1, "o", 2), "not a multiple of 4"),
    (_set(4, "o", 4), "not a multiple of 8"),
    (_set(4, "o", 10 ** 6), "outside"),
    (_set(0, "o", -8), "outside"),
    (_set(1, "n", "conv/w"), "duplicate tensor name 'conv/w'"),
    (_set(0, "x", 1), "unknown field(s) 'x'"),
    (_set(3, "s", [-1]), "bad shape"),
    (_set(3, "s", [2 ** 20, 2 ** 20, 2 ** 20]), "outside"),
    (_set(3, "s", [2 ** 31, 2 ** 31]), "outside"),
    (_set(0, "s", [2 ** 63, 2 ** 63, 0, 3]), "bad shape"),
    (_set(3, "s", [2 ** 64]), "bad shape"),
    (_set(3, "s", [1] * 40), "bad shape"),
    (_set(3, "s", [1.5]), "bad shape"),
    (_set(0, "q", 0), "bits"),
    (_set(0, "q", 17), "bits"),
    (_set(0, "q", True), "'q' missing or malformed"),
    (_set(0, "q", 3.0), "'q' missing or malformed"),
    (_set(0, "l", "rows"), "layout"),
    (_set(0, "a", [7]), "axis 7 out of range"),
    (_set(0, "a", [-9]), "out of range"),
    (_set(0, "a", [3, 0]), "increasing"),
    (_set(0, "a", ["3"]), "bad channel axes"),
    (_set(1, "b", 0), "bucket_size"),
    (_set(1, "b", True), "bad bucket size"),
    (_set(1, "a", [0]), "do not fit layout"),
    (_set(3, "d", "<f8"), "dtype"),
    (_set(3, "d", "|O"), "dtype"),
    (lambda index, payload: index["t"][0].pop("s"), "'s' missing"),
    (lambda index, payload: index.__setitem__("extra", 1), "exactly"),
    (lambda index, payload: index.__setitem__("m", []), "exactly"),
    (lambda index, payload: index["t"].append("x"), "not an object"),
    (lambda index, payload: payload.extend(bytes(8)), "tensors end at byte"),
])
def test_crafted_index_rejected(small_file, mutate, fragment):
    _refused(_mutated(small_file, mutate), "corrupt index", fragment)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3.0e38])
def test_non_finite_or_overflowing_ranges_rejected(small_file, value):
    index, payload = _parts(small_file.read_bytes())
    payload = bytearray(payload)
    entry = index["t"][2]  # 8-bit 'none': 3 code bytes, alpha at +4, beta at +8
    payload[entry["o"] + 4:entry["o"] + 12] = np.array([value, value], "<f4").tobytes()
    _refused(_craft(small_file, index, bytes(payload)), "alpha/beta must be finite")


def test_duplicates_found_before_any_tensor_is_built(small_file, monkeypatch):
    built = []
    monkeypatch.setattr(packed_reader, "_build_tensor", lambda plan, payload: built.append(plan))
    _refused(_mutated(small_file, _set(4, "n", "conv/w")), "duplicate tensor name")
    assert built == []


@pytest.mark.parametrize("craft,fragment", [
    (dict(flags=1), "reserved header flags are 0x0001"),
    (dict(flags=0x8000), "reserved header flags"),
    (dict(version=2), "unsupported format version 2"),
    (dict(pad_byte=1, compressed=zlib.compress(b'{"t": [], "m": {}}  ')), "non-zero padding"),
    (dict(compressed=zlib.compress(b'{"t": [], "m": {}}') + b"junk"), "trailing data after the compressed"),
    (dict(compressed=zlib.compress(b'{"t": [], "m": {}}')[:-3]), "truncated"),
    (dict(compressed=b"not zlib at all"), "cannot be decompressed"),
    (dict(compressed=zlib.compress(b"\xff\xfe{}")), "not UTF-8"),
    (dict(compressed=zlib.compress(b'{"t": [], "m": {}, "m": {"x": 1}}')), "duplicate key"),
    (dict(compressed=zlib.compress(b'{"t": [], "m": {"x": NaN}}')), "NaN"),
    (dict(compressed=zlib.compress(b'{"t": [], "m": ' + b"[" * 1000 + b"]" * 1000 + b"}")), "deeper than"),
    (dict(compressed=zlib.compress(b'{"t": []}')), "exactly"),
    (dict(compressed=zlib.compress(b'{"t": [], "m": {}}'), payload_len=8), "truncated"),
])
def test_crafted_header_rejected(tmp_path, craft, fragment):
    _refused(_craft(tmp_path / "m.tfq", **craft), fragment)


def test_index_bomb_capped_before_inflating(tmp_path):
    bomb = zlib.compress(b" " * (64 * 1024 * 1024), 9)  # ~64 KB that would inflate 1000-fold
    message = _refused(_craft(tmp_path / "bomb.tfq", compressed=bomb), "decompresses to more than")
    limit = min(packed_reader.INDEX_EXPANSION_LIMIT * len(bomb) + packed_reader.INDEX_SLACK_BYTES,
                packed_reader.INDEX_ABSOLUTE_LIMIT)
    assert "at most %d" % limit in message


def test_files_written_today_still_read(tmp_path):
    """Every layout and width the writer produces passes the strict reader and dequantizes exactly."""
    rng = np.random.default_rng(9)
    tensors = []
    for bits in range(1, 17):
        shape = (3, 2, 5)
        layout, axes, bucket = [("none", None, None), ("channel", (0, 2), None), ("split", None, 7)][bits % 3]
        groups = packing.num_groups(shape, layout, axes, bucket)
        tensors.append(QuantizedTensor("t%d" % bits, shape, bits, layout, axes, bucket,
                                       rng.integers(0, 1 << bits, shape), rng.uniform(0.01, 3, groups),
                                       rng.uniform(-2, 0, groups)))
    tensors += [FloatTensor("empty", np.zeros((0, 3), np.float32)), FloatTensor("i32", np.arange(3, dtype=np.int32))]
    path = tmp_path / "all.tfq"
    write_packed_model(path, tensors, {})
    read, _ = read_packed_model(path)
    for got, want in zip(read, tensors):
        if isinstance(want, QuantizedTensor):
            levels = np.float32(1.0 / ((1 << want.bits) - 1))
            index = packing.group_index(want.shape, want.layout, want.channel_axes, want.bucket_size)
            scale = (want.alpha * levels).astype(np.float32)
            expected = (want.codes.reshape(-1).astype(np.float32) * scale[index]).astype(np.float32)
            expected = (expected + want.beta[index]).astype(np.float32).reshape(want.shape)
            assert np.array_equal(got.dequantize().view(np.uint32), expected.view(np.uint32)), want.name
        else:
            assert got.array.tobytes() == want.array.tobytes()


# ----- reports: in-process cases --------------------------------------------------------------------

def _report_dict():
    layers = [
        {"name": "conv1/Conv2D", "op_type": "Conv2D", "kind": "weight", "status": "skipped",
         "reason": "first layer kept float", "bits": 32, "weight_variable": "conv1/w", "input_index": 1,
         "shape": [3, 3, 1, 4], "num_params": 36, "weight_storage_bits": 36 * 32},
        {"name": "conv2/Conv2D", "op_type": "Conv2D", "kind": "weight", "status": "quantized", "bits": 4,
         "weight_variable": "conv2/w", "input_index": 1, "shape": [3, 3, 4, 4], "num_params": 144,
         "bucket_type": "channel", "channel_axes": [3], "num_groups": 4, "weight_storage_bits": 144 * 4,
         "bucket_storage_bits": 4 * 64},
        {"name": "relu1", "op_type": "Relu", "kind": "activation", "status": "quantized", "bits": 8,
         "num_groups": 1, "range_variables": ["relu1/act_quant/ema_min"]},
    ]
    config = config_module.QuantConfig(use_buckets=True, activation_bits=8).to_dict()
    return {"version": 1, "config": config, "is_training": True, "layers": layers,
            "other_variables": [{"name": "bn/beta", "shape": [4]}], "notes": []}


def _write_report(tmp_path, change=None, text=None):
    data = _report_dict()
    if change is not None:
        change(data)
    path = tmp_path / "quant_report.json"
    path.write_text(json.dumps(data) if text is None else text)
    return path


def _layer(number, key, value):
    return lambda data: data["layers"][number].__setitem__(key, value)


def test_valid_report_read_and_replayed_without_patterns(tmp_path):
    path = _write_report(tmp_path, lambda d: d["config"].update(weight_overrides=[["(.*.*)*Z", 2]]))
    report = read_report(path)
    assert [layer.bits for layer in report.layers] == [32, 4, 8]
    config = config_from_report(report)
    assert config.weight_overrides == () and config.activation_overrides == () and config.layer_bits is None
    assert dict(config.explicit_bits) == {"conv1/Conv2D": 32, "conv2/Conv2D": 4, "relu1": 8}
    assert config.use_buckets and config.activation_bits == 8


@pytest.mark.parametrize("change,fragment", [
    (lambda d: d.__setitem__("version", True), "version=True"),
    (lambda d: d.__setitem__("version", 1.0), "version=1.0"),
    (lambda d: d.__setitem__("version", 3), "version=3"),
    (lambda d: d.pop("layers"), "lacks field 'layers'"),
    (lambda d: d.__setitem__("surprise", 1), "unknown field 'surprise'"),
    (lambda d: d.__setitem__("layers", {}), "layers={} is not valid"),
    (lambda d: d.__setitem__("is_training", "yes"), "is_training"),
    (lambda d: d.__setitem__("notes", [1]), "notes"),
    (_layer(1, "bits", 0), "bits=0"),
    (_layer(1, "bits", True), "bits=True"),
    (_layer(1, "bits", 4.0), "bits=4.0"),
    (_layer(1, "weight_storage_bits", 1e308), "weight_storage_bits=1e+308"),
    (_layer(1, "weight_storage_bits", -4), "weight_storage_bits=-4"),
    (_layer(1, "weight_storage_bits", 10 ** 30), "storage bits"),
    (_layer(1, "num_params", 5), "num_params 5 but shape"),
    (_layer(1, "num_groups", 3), "num_groups 3"),
    (_layer(1, "channel_axes", [9]), "channel_axes"),
    (_layer(1, "shape", [3, -3]), "shape"),
    (_layer(1, "kind", "bias"), "kind"),
    (_layer(1, "status", "done"), "status"),
    (_layer(1, "input_index", "1"), "input_index"),
    (_layer(1, "extra", 1), "unknown field 'extra'"),
    (_layer(2, "weight_storage_bits", 64), "storage bits must be 0"),
    (lambda d: d["layers"].append(dict(d["layers"][2])), "listed twice"),
    (lambda d: d["layers"].append("relu"), "an object"),
    (lambda d: d["other_variables"].append({"name": "x", "shape": [1.5]}), "other_variables[1].shape"),
    (lambda d: d["config"].__setitem__("weight_bits", 99), "weight_bits=99"),
    (lambda d: d["config"].__setitem__("mystery", 1), "unknown field 'mystery'"),
    (lambda d: d["config"].__setitem__("weight_overrides", [["x" * 1001, 4]]), "at most 1000 characters"),
    (lambda d: d["config"].__setitem__("weight_overrides", [["x", 4, 5]]), "weight_overrides[0]"),
    (lambda d: d["config"].__setitem__("activation_overrides", "x=4"), "activation_overrides"),
])
def test_malformed_report_rejected(tmp_path, change, fragment):
    message = _refused(_write_report(tmp_path, change), fragment, error=ReportError)
    assert message.startswith("quantization report %s: " % (tmp_path / "quant_report.json"))


@pytest.mark.parametrize("text,fragment", [
    ('{"version": 1, "version": 1}', "duplicate key 'version'"),
    ('{"version": NaN}', "NaN is not valid JSON"),
    ('{"version": Infinity}', "Infinity"),
    ('[' * 1000 + ']' * 1000, "nested deeper than"),
    ('{"version": 1', "not valid JSON"),
    ("", "not valid JSON"),
])
def test_report_json_strict(tmp_path, text, fragment):
    _refused(_write_report(tmp_path, text=text), fragment, error=ReportError)


def test_report_error_carries_path(tmp_path):
    path = _write_report(tmp_path, lambda d: d.__setitem__("version", True))
    with pytest.raises(ReportError) as info:
        read_report(path)
    assert info.value.path == str(path) and isinstance(info.value, ValueError)
    with pytest.raises(ReportError) as info:
        read_report(tmp_path / "none.json")
    assert info.value.path == str(tmp_path / "none.json") and "cannot be read" in str(info.value)
    with pytest.raises(ReportError, match="version=True"):
        QuantReport.from_dict(dict(_report_dict(), version=True))


def test_user_pattern_length_limited():
    config_module.QuantConfig(weight_overrides=[("a" * 1000, 4)])
    with pytest.raises(ValueError, match="1001 characters long; expected at most 1000"):
        config_module.QuantConfig(weight_overrides=[("a" * 1001, 4)])
    with pytest.raises(ValueError, match="activation_overrides"):
        config_module.QuantConfig(activation_overrides=[("b" * 5000, 8)])


# ----- hostile inputs in a child process: time and memory bounds -------------------------------------

_CHILD = textwrap.dedent(r"""
    import hashlib, json, re, sys, time
    import numpy as np
    import tensorflow as tf
    from tfquant import quantize_graph
    from tfquant.export.model_export import load_packed_weights
    from tfquant.export.packed_reader import read_packed_model
    from tfquant.report import config_from_report, read_report

    def status_mb(key):
        with open("/proc/self/status") as handle:
            return int(re.search(key + r":\s+(\d+) kB", handle.read()).group(1)) / 1024.0

    def reset_peak():
        # Writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS, so each case's own
        # peak is measured, not the interpreter's start-up peak.
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")

    def regex_case(path):
        config = config_from_report(read_report(path))
        graph = tf.Graph()
        with graph.as_default():
            x = tf.compat.v1.placeholder(tf.float32, [None, 40])
            name = "a" * 40
            w = tf.compat.v1.get_variable(name, [40, 40])
            tf.nn.relu(tf.matmul(tf.nn.relu(tf.matmul(x, w)), w), name="r" * 40)
            return [layer.bits for layer in quantize_graph(graph, config, is_training=False).layers]

    cases = json.loads(sys.argv[1])
    results = []
    for kind, path in cases:
        reset_peak()
        baseline = status_mb("VmRSS")
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            if kind == "honest":
                weights, _ = load_packed_weights(path)
                value = {name: [hashlib.sha256(a.data).hexdigest(), a.dtype.str, list(a.shape)]
                         for name, a in weights.items()}
                del weights
            elif kind == "packed":
                value = repr(read_packed_model(path))[:200]
            elif kind == "report":
                value = repr(read_report(path))[:200]
            else:
                value = regex_case(path)
            outcome = ["ok", value]
        except Exception as exc:
            outcome = [type(exc).__name__, str(exc)]
        results.append([kind, path, outcome, time.perf_counter() - start, time.process_time() - cpu_start,
                        status_mb("VmHWM") - baseline])
    print(json.dumps(results))
""")


def _run_child(cases, timeout=120):
    result = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(cases)], capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _duplicates_file(path, count, padding_bytes=0):
    """`count` entries all named 'w'; random metadata of `padding_bytes` lets the index pass the inflation cap."""
    entries = ",".join('{"n":"w","s":[1],"o":0,"d":"<f4"}' for _ in range(count))
    noise = os.urandom(padding_bytes).hex()
    index = '{"t":[%s],"m":{"noise":"%s"}}' % (entries, noise)
    return _craft(path, compressed=zlib.compress(index.encode(), 9), payload=bytes(4))


def _hostile_cases(tmp_path):
    """(kind, path, error class name, message fragment) of every hostile input."""
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    bomb = tmp_path / "bomb.tfq"
    inflater = zlib.compressobj(9)
    compressed = b"".join(inflater.compress(bytes(1 << 20)) for _ in range(256)) + inflater.flush()
    _craft(bomb, compressed=compressed)  # ~250 KB inflating to 256 MB
    huge = _craft(tmp_path / "huge.tfq", {"t": [{"n": "w", "s": [2 ** 31, 2 ** 31], "o": 0, "q": 1, "l": "none"}],
                                          "m": {}}, payload=bytes(16))
    deep = _write_report(tmp_path, text="[" * 100000 + "]" * 100000)
    (tmp_path / "deep").mkdir()
    deep = deep.rename(tmp_path / "deep" / "quant_report.json")
    (tmp_path / "regex").mkdir()

    def patterns(d):
        d["config"]["weight_overrides"] = [["(.*.*)*Z", 2]]
        d["config"]["activation_overrides"] = [["(r*r*)*Z", 2]]
        d["layers"] = [{"name": "MatMul", "op_type": "MatMul", "kind": "weight", "status": "skipped",
                        "bits": 32, "weight_variable": "a" * 40, "input_index": 1, "shape": [40, 40],
                        "num_params": 1600, "weight_storage_bits": 1600 * 32}]
    regex = _write_report(tmp_path / "regex", patterns)
    return [
        ("packed", fifo, "PackedFileError", "is a FIFO; expected a regular file"),
        ("packed", "/dev/zero", "PackedFileError", "is a device; expected a regular file"),
        ("packed", "/dev/null", "PackedFileError", "is a device"),
        ("packed", str(tmp_path), "PackedFileError", "is a directory"),
        ("packed", str(bomb), "PackedFileError", "decompresses to more than"),
        ("packed", str(_duplicates_file(tmp_path / "dup100k.tfq", 100000, 1 << 19)), "PackedFileError",
         "duplicate tensor name 'w' (index entry 1)"),
        ("packed", str(_duplicates_file(tmp_path / "dup2m.tfq", 2000000)), "PackedFileError",
         "decompresses to more than"),
        ("packed", str(huge), "PackedFileError", "outside the 16-byte payload"),
        ("report", fifo, "ReportError", "is a FIFO"),
        ("report", "/dev/zero", "ReportError", "is a device"),
        ("report", str(tmp_path), "ReportError", "is a directory"),
        ("report", str(deep), "ReportError", "nested deeper than"),
        ("regex", str(regex), "ok", None),
    ]


def test_hostile_inputs_bounded_in_time_and_memory(tmp_path):
    cases = _hostile_cases(tmp_path)
    results = _run_child([[kind, path] for kind, path, _, _ in cases])
    for (kind, path, error, fragment), (_, _, (outcome, message), seconds, cpu_seconds, growth_mb) \
            in zip(cases, results):
        assert outcome == error, (kind, path, outcome, message)
        if fragment is not None:
            assert fragment in message and "\n" not in message, (kind, path, message)
        else:
            # Both matmuls are the first/last layer (float); both activations take the default 8 bits.
            assert message == [32, 32, 8, 8]
        assert cpu_seconds < REJECT_SECONDS and seconds < HANG_SECONDS, (kind, path, cpu_seconds, seconds)
        assert growth_mb < MEMORY_BOUND_MB, (kind, path, growth_mb)


def test_honest_large_file_loads_in_memory_proportional_to_output(tmp_path):
    """A 1-bit file of 16M weights (2 MB) yields 64 MB of float32 with a peak below twice that."""
    count, bucket = 1 << 24, 4096
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 2, count, dtype=np.uint8)
    alpha = rng.uniform(0.1, 1.0, count // bucket).astype(np.float32)
    beta = rng.uniform(-1.0, 0.0, count // bucket).astype(np.float32)
    path = tmp_path / "big.tfq"
    write_packed_model(path, [QuantizedTensor("w", (count,), 1, "split", None, bucket, codes, alpha, beta)], {})
    assert path.stat().st_size < count // 8 + 65536
    (kind, _, (outcome, value), _, _, growth_mb), = _run_child([["honest", str(path)]])
    assert outcome == "ok", value
    reference = (codes.reshape(-1, bucket).astype(np.float32) * (alpha * np.float32(1.0))[:, None]
                 + beta[:, None]).astype(np.float32)
    digest, dtype, shape = value["w"]
    assert dtype == "<f4" and shape == [count]
    assert digest == hashlib.sha256(reference.tobytes()).hexdigest()
    output_mb = count * 4 / 2.0 ** 20
    assert growth_mb < 2 * output_mb, growth_mb


def test_eval_loads_report_decisions_without_patterns(tmp_path):
    """The uniform learner's eval reads the report the same strict way and replays its decisions."""
    from learners.errors import UserError
    from learners.uniform_quant import read_report_and_config
    path = _write_report(tmp_path, lambda d: d["config"].update(activation_overrides=[["(r*r*)*Z", 2]]))
    report, config = read_report_and_config(str(path))
    assert config.activation_overrides == () and dict(config.explicit_bits)["relu1"] == 8
    assert [layer.name for layer in report.layers] == ["conv1/Conv2D", "conv2/Conv2D", "relu1"]
    _write_report(tmp_path, lambda d: d.__setitem__("version", True))
    with pytest.raises(UserError) as info:
        read_report_and_config(str(path))
    assert "version=True" in str(info.value) and str(path) in str(info.value) and "\n" not in str(info.value)
