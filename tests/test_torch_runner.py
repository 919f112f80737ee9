"""The PyTorch runner: optimised vs baseline network, tiles vs whole levels."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from cv2r2d2.extractor import extract
from cv2r2d2.params import ExtractionParams
from cv2r2d2.image import normalize_image
from cv2r2d2.nets import fold_batchnorm
from cv2r2d2.torch_runner import TorchRunner, receptive_halo
from cv2r2d2.weights import load_model
from conftest import weights_file

MODELS = ["r2d2_WASF_N16", "faster2d2_WASF_N16"]


@pytest.fixture(scope="module", params=MODELS)
def net(request):
    return load_model(weights_file(request.param), device="cpu")


@pytest.fixture(scope="module")
def crop(peppers):
    # Odd sizes on purpose: the Fast network's map is one pixel smaller there.
    return normalize_image(peppers[100:401, 50:307])


def test_halo_covers_the_receptive_field(net):
    halo, alignment = receptive_halo(net)
    if type(net).__name__ == "Quad_L2Net_ConfCFS":
        assert (halo, alignment) == (27, 1)  # 25 px of receptive radius, plus 2
    else:
        assert alignment == 2 and halo % 2 == 0 and halo >= 28


def test_tiles_equal_the_whole_map(net, crop):
    runner = TorchRunner(net)
    handle = runner.prepare(crop)
    whole = runner.run(handle)
    map_h, map_w = runner.output_size(*crop.shape[1:])
    assert whole.reliability.shape == (map_h, map_w)
    for box in [(0, 90, 0, 80), (100, 200, 50, 150), (200, map_h, 150, map_w)]:
        y0, y1, x0, x1 = box
        part = runner.run(handle, box)
        np.testing.assert_allclose(part.repeatability, whole.repeatability[y0:y1, x0:x1], atol=1e-6)
        np.testing.assert_allclose(part.reliability, whole.reliability[y0:y1, x0:x1], atol=1e-6)
        np.testing.assert_allclose(part.dense_descriptors(),
                                   whole.dense_descriptors()[:, y0:y1, x0:x1], atol=1e-5)


@pytest.mark.slow  # full-size extractions, tiled and whole
def test_tiled_extraction_gives_the_same_keypoints(net, crop):
    runner = TorchRunner(net)
    params = ExtractionParams(min_size=0, max_size=9999, min_scale=0.6, nfeatures=1000)
    whole = extract(runner, crop, params, tile_size=0)
    tiled = extract(runner, crop, params, tile_size=96)
    ours = np.c_[whole.xy, whole.sizes]
    distance, index = cKDTree(ours).query(np.c_[tiled.xy, tiled.sizes])
    assert len(tiled) == len(whole) and np.all(distance == 0)
    np.testing.assert_allclose(tiled.descriptors, whole.descriptors[index], atol=1e-5)
    np.testing.assert_allclose(tiled.scores, whole.scores[index], atol=1e-6)


@pytest.mark.slow  # full-size maps by two runners
def test_optimised_runner_matches_the_baseline(net, crop):
    fast = TorchRunner(net).run(TorchRunner(net).prepare(crop))
    baseline_runner = TorchRunner(net, optimize=False)
    baseline = baseline_runner.run(baseline_runner.prepare(crop))
    np.testing.assert_allclose(fast.repeatability, baseline.repeatability, atol=1e-5)
    np.testing.assert_allclose(fast.dense_descriptors(), baseline.dense_descriptors(), atol=1e-5)


def test_bf16_runner_returns_float32_maps_close_to_fp32(net, crop):
    exact = TorchRunner(net)
    bf16 = TorchRunner(net, precision="bf16")
    assert bf16.precision == "bf16" and next(bf16.net.parameters()).dtype == torch.bfloat16
    small = np.ascontiguousarray(crop[:, :160, :200])
    ours, theirs = exact.run(exact.prepare(small)), bf16.run(bf16.prepare(small))
    assert theirs.reliability.dtype == theirs.repeatability.dtype == np.float32
    # bf16 keeps 8 bits of mantissa: a few maps' values move by up to ~0.07.
    error = np.abs(theirs.repeatability - ours.repeatability)
    assert np.quantile(error, 0.999) < 0.05 and error.max() < 0.15
    dense = theirs.dense_descriptors()
    assert dense.dtype == np.float32
    assert np.median(np.sum(dense * ours.dense_descriptors(), axis=0)) > 0.99
    x, y = np.array([3.25, 40.5, 101.0], np.float32), np.array([7.75, 20.0, 60.5], np.float32)
    sampled = theirs.descriptors_at(x, y)
    assert sampled.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(sampled, axis=1), 1, atol=1e-5)
    assert np.all(np.sum(sampled * ours.descriptors_at(x, y), axis=1) > 0.98)
    # On the CPU, convolutions and their ReLUs run fused, with the unfused modules' values.
    unfused = fold_batchnorm(net).to(dtype=torch.bfloat16, memory_format=torch.channels_last)
    assert len(bf16.net.trunk) < len(unfused.trunk)
    with torch.inference_mode():
        handle = bf16.prepare(small).to(torch.bfloat16)
        assert torch.equal(bf16.net.forward_raw(handle)[0], unfused.forward_raw(handle)[0])


def test_runner_precision_is_checked(net):
    with pytest.raises(ValueError, match="fp32 or bf16, got precision='int8'"):
        TorchRunner(net, precision="int8")
    with pytest.raises(ValueError, match="optimize=True"):
        TorchRunner(net, optimize=False, precision="bf16")
