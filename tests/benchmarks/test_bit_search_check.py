"""The bit search's measurement (shared quantizers, cut tensors, parallel runs) against brute force: the same
sensitivities and allocations on a residual ConvNet whose weights share shapes, and the --quick check per seed."""
import numpy as np
import pytest
import tensorflow as tf

import tfquant
from benchmarks import bit_search_check, publish
from tfquant import allocation, sensitivity
from tests.conftest import new_session

tf1 = tf.compat.v1
WIDTHS = {sensitivity.WEIGHT: [1, 2, 3, 4, 6, 8], sensitivity.ACTIVATION: [2, 3, 4, 8]}


def _residual_convnet(rng):
    """conv 4->8, then three 8->8 convs (one shape, so one shared quantizer) with a skip, pooled, dense to 4."""
    graph = tf.Graph()
    with graph.as_default():
        images = tf1.placeholder(tf.float32, [16, 8, 8, 4])
        labels = tf1.placeholder(tf.int64, [16])
        shapes = [(3, 3, 4, 8), (3, 3, 8, 8), (3, 3, 8, 8), (3, 3, 8, 8)]
        kernels = [tf1.get_variable("conv%d" % i, initializer=rng.normal(0, 0.3, s).astype(np.float32))
                   for i, s in enumerate(shapes)]
        h = tf.nn.relu(tf.nn.conv2d(images, kernels[0], 1, "SAME"), name="relu0")
        skip = h
        for i in (1, 2, 3):
            h = tf.nn.relu(tf.nn.conv2d(h, kernels[i], 1, "SAME"), name="relu%d" % i)
        h = tf.reduce_mean(h + skip, axis=[1, 2])
        dense = tf1.get_variable("dense", initializer=rng.normal(0, 1.0, (8, 4)).astype(np.float32))
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=h @ dense))
        init = tf1.global_variables_initializer()
    feeds = [{images: rng.uniform(0, 1, (16, 8, 8, 4)).astype(np.float32), labels: rng.integers(0, 4, 16)}
             for _ in range(2)]
    return graph, loss, init, feeds


@pytest.mark.parametrize("settings", [dict(), dict(bucket_type="channel")])
def test_measurement_matches_brute_force_and_weights_of_one_shape_share_a_quantizer(rng, settings):
    graph, loss, init, feeds = _residual_convnet(rng)
    config = tfquant.QuantConfig(quantize_all_layers=True, **settings)
    weights, activations = sensitivity.find_targets(graph, config)
    widths = WIDTHS  # the run's own grid for LSQ and the others: tests/tfquant/test_weight_grids.py
    assert len(weights) == 5 and len(activations) == 4
    with new_session(graph) as sess:
        sess.run(init)
        measured = sensitivity.measure(sess, loss, feeds, weights + activations, widths)
        reference = bit_search_check.reference_sensitivities(sess, loss, feeds, weights + activations, widths)
    for name in reference:
        for bits in reference[name]:
            assert measured[name][bits] == pytest.approx(reference[name][bits], rel=1e-4, abs=1e-6), (name, bits)
    # Every weight and width really perturbs the loss differently (a mix-up of targets would show).
    assert len({round(reference[t.name][2], 6) for t in weights}) == len(weights)
    # One quantizer per weight shape (conv 4->8, conv 8->8 three times, dense) and one for the activations.
    placeholders = [op for op in graph.get_operations()
                    if op.type == "Placeholder" and op.name.startswith(sensitivity.SCOPE + "/")]
    assert len(placeholders) == 3 + 1, [op.name for op in placeholders]
    for kind, budget in ((weights, 2.5), (activations, 3.0)):
        solved = [allocation.solve([allocation.AllocationItem(t.name, t.size, sensitivity.non_increasing(s[t.name]))
                                    for t in kind], budget).bits for s in (measured, reference)]
        assert solved[0] == solved[1]


def test_loss_run_macs_count_what_each_target_reaches_below_it(rng):
    """MACs by hand for the residual ConvNet (16 examples of 8x8, SAME convs): conv0 4->8 is 16*8*8*8 outputs times
    3*3*4, each 8->8 conv the same outputs times 3*3*8, the dense 16*8*4; a target's run computes the convs after
    it (the skip joins after conv3, so relu0 reaches conv1-3 once) and the dense, once per width."""
    graph, loss, _, _ = _residual_convnet(rng)
    weights, activations = sensitivity.find_targets(graph, tfquant.QuantConfig(quantize_all_layers=True))
    conv0, conv, dense = 8192 * 36, 8192 * 72, 16 * 8 * 4
    widths = {sensitivity.WEIGHT: [2, 3], sensitivity.ACTIVATION: [4]}
    forward, runs = bit_search_check.loss_run_macs(loss, weights + activations, widths)
    assert forward == conv0 + 3 * conv + dense
    below = {"conv0": forward, "conv1": 3 * conv + dense, "conv2": 2 * conv + dense, "conv3": conv + dense,
             "dense": dense, "relu0": 3 * conv + dense, "relu1": 2 * conv + dense, "relu2": conv + dense,
             "relu3": dense}
    assert sorted(t.name for t in weights + activations) == sorted(below)
    assert runs == 2 * sum(below[t.name] for t in weights) + sum(below[t.name] for t in activations)


def test_quick_check_gives_the_same_allocations_as_brute_force_per_seed(tmp_path):
    payload = bit_search_check.main(["--quick", "--seeds", "1", "--output", str(tmp_path / "check.json")])
    assert [entry["seed"] for entry in payload["seeds"]] == [1]
    for entry in payload["seeds"]:
        assert entry["measured_bits"] == entry["reference_bits"]
        assert set(entry["measured_bits"]) == {"weight", "activation"} and entry["worst_tolerance_ratio"] <= 1
        assert entry["measure_cpu_seconds"] > 0 and entry["reference_cpu_seconds"] > 0
        # The float pass plus the loss runs, each at most a whole forward pass and some below the first target.
        assert 1 < entry["search_forward_passes"] < 1 + entry["loss_runs_per_batch"]
        assert entry["search_epoch_mac_ratio"] == pytest.approx(
            entry["search_forward_passes"] / entry["epoch_forward_passes"])
    assert publish.load_json(str(tmp_path / "check.json"))["seeds"][0]["measured_bits"] == entry["measured_bits"]


def test_check_refuses_a_missing_checkpoint(tmp_path):
    with pytest.raises(publish.BenchmarkError, match="--float_checkpoint is required without --quick"):
        bit_search_check.main(["--seeds", "0"])
    with pytest.raises(publish.BenchmarkError, match="has no checkpoint for seed 0"):
        bit_search_check.main(["--seeds", "0", "--float_checkpoint", str(tmp_path)])
