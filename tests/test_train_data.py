"""Training pairs: the flow they carry must be the true correspondence of their pixels."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from cv2r2d2.image import IMAGENET_MEAN, IMAGENET_STD
from cv2r2d2.train.data import (
    FlowPairs,
    HomographyPairs,
    PairDataset,
    SyntheticPairs,
    collate,
    color_jitter,
    epoch_batches,
    homography_flow,
    make_loader,
    read_image,
)

from conftest import image_path


def reprojection_error(pair, shift: tuple = (0.0, 0.0)) -> float:
    """Mean absolute grey-level difference between image 1 and image 2 sampled at aflow
    (moved by ``shift`` pixels), over the pixels with a target."""
    valid = np.isfinite(pair.aflow).all(axis=0)
    assert valid.mean() > 0.3
    flow = np.nan_to_num(pair.aflow) + np.float32(shift).reshape(2, 1, 1)
    back = cv2.remap(pair.image2, flow[0], flow[1], cv2.INTER_LINEAR)
    return float(np.abs(back.astype(np.float32) - pair.image1.astype(np.float32))[valid].mean())


def assert_flow_is_exact(pair, max_error: float) -> None:
    """Image 2 sampled at aflow reproduces image 1, better than a quarter pixel away."""
    error = reprojection_error(pair)
    assert error < max_error
    for shift in ((0.25, 0), (-0.25, 0), (0, 0.25), (0, -0.25)):
        assert reprojection_error(pair, shift) > error, shift
    assert reprojection_error(pair, (1.0, 1.0)) > 2 * error


@pytest.fixture(scope="module")
def smooth_images(tmp_path_factory):
    """Blurred copies of three sample images: bilinear resampling is then nearly exact,
    so that what remains of the reprojection error is the flow's."""
    folder = tmp_path_factory.mktemp("smooth")
    for name in ("peppers.png", "test.png", "boat.png"):
        image = read_image(image_path(name))
        cv2.imwrite(str(folder / name), cv2.GaussianBlur(image, (0, 0), 3))
    return folder


@pytest.fixture(scope="module")
def synthetic(smooth_images):
    """Noise-free synthetic pairs at small scales."""
    return SyntheticPairs(smooth_images, scale=(128, 256), noise=0)


def test_homography_flow():
    torch_free = homography_flow(np.eye(3), 4, 5)
    y, x = np.mgrid[0:4, 0:5]
    np.testing.assert_array_equal(torch_free, np.stack([x, y]).astype(np.float32))
    h = np.array([[2.0, 0, 3], [0, 0.5, -1], [0, 0, 1]])
    np.testing.assert_allclose(homography_flow(h, 4, 5), np.stack([2 * x + 3, 0.5 * y - 1]))


def test_synthetic_pairs_image2_at_aflow_reproduces_image1(synthetic):
    for index in range(len(synthetic)):
        pair = synthetic.pair(index, np.random.default_rng(index))
        assert pair.image1.dtype == np.uint8 and pair.image1.shape[2] == 3
        assert 128 <= min(pair.image1.shape[:2]) <= 256
        assert pair.aflow.shape == (2,) + pair.image1.shape[:2]
        assert_flow_is_exact(pair, max_error=3.0)


def test_synthetic_pairs_are_seeded_and_noisy():
    source = SyntheticPairs([image_path("peppers.png")], scale=(128, 128), noise=25)
    first = source.pair(0, np.random.default_rng(5))
    again = source.pair(0, np.random.default_rng(5))
    other = source.pair(0, np.random.default_rng(6))
    assert np.array_equal(first.image2, again.image2)
    assert np.array_equal(first.aflow, again.aflow, equal_nan=True)
    assert not np.array_equal(first.aflow, other.aflow, equal_nan=True)
    clean_source = SyntheticPairs([image_path("peppers.png")], scale=(128, 128), noise=0)
    clean = clean_source.pair(0, np.random.default_rng(5))
    difference = first.image2.astype(int) - clean.image2.astype(int)
    assert np.abs(difference).max() <= 13 and difference.std() > 5


def test_training_crops_keep_the_flow_exact(synthetic):
    dataset = PairDataset([synthetic], crop=96, scale=(128, 256), jitter=None)
    for position in range(6):
        pair = dataset.sample(position % len(synthetic), dataset.rng(0, position))
        assert pair.image1.shape == pair.image2.shape == (96, 96, 3)
        assert pair.aflow.shape == (2, 96, 96)
        finite = pair.aflow[:, np.isfinite(pair.aflow).all(axis=0)]
        assert finite.min() >= -0.5 and finite.max() < 95.5  # NaN once it leaves crop 2
        assert_flow_is_exact(pair, max_error=3.0)


def test_items_are_normalised_tensors_and_batch(synthetic):
    dataset = PairDataset([synthetic], crop=64, scale=(128, 256), seed=3)
    batches = epoch_batches(len(dataset), 2, epoch=0, seed=3)
    batch = next(iter(make_loader(dataset, batches)))
    assert batch["image1"].shape == batch["image2"].shape == (2, 3, 64, 64)
    assert batch["aflow"].shape == (2, 2, 64, 64) and batch["aflow"].dtype == torch.float32
    key = batches[0][0]
    pair = dataset.sample(key[2], dataset.rng(key[0], key[1]))
    rgb = (pair.image1[:, :, ::-1] / np.float32(255) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_allclose(batch["image1"][0].numpy(), rgb.transpose(2, 0, 1), atol=1e-5)
    np.testing.assert_array_equal(batch["aflow"][0].numpy(), pair.aflow)


def test_loading_processes_give_the_same_batches(synthetic):
    dataset = PairDataset([synthetic], crop=48, scale=(128, 160), seed=4)
    batches = epoch_batches(len(dataset), 2, epoch=2, seed=4)
    alone = list(make_loader(dataset, batches, workers=0))
    parallel = list(make_loader(dataset, batches, workers=2))
    assert len(alone) == len(parallel) == 2
    for a, b in zip(alone, parallel):
        for key in a:
            assert torch.equal(a[key].nan_to_num(), b[key].nan_to_num()), key


def test_epoch_batches_are_seeded_shuffles():
    first = epoch_batches(5, 2, epoch=0, seed=1)
    assert first == epoch_batches(5, 2, epoch=0, seed=1)
    assert len(first) == 3 and all(len(b) == 2 for b in first)  # 5 rounded up to 6
    assert {k[2] for b in first for k in b} == {0, 1, 2, 3, 4}
    longer = epoch_batches(5, 4, epoch=1, seed=1, epoch_size=13)
    assert len(longer) == 3  # 13 pairs -> 3 whole batches
    positions = [k[1] for b in longer for k in b]
    assert positions == list(range(12)) and all(k[0] == 1 for b in longer for k in b)
    assert epoch_batches(5, 2, epoch=1, seed=1) != first
    with pytest.raises(ValueError):
        epoch_batches(5, 4, epoch=0, seed=0, epoch_size=2)


def test_color_jitter():
    image = read_image(image_path("peppers.png"))[:64, :64]
    rng = np.random.default_rng(0)
    same = color_jitter(image, rng, 0, 0, 0, 0)
    assert np.abs(same.astype(int) - image).max() <= 1
    jittered = color_jitter(image, rng)
    assert jittered.shape == image.shape and jittered.dtype == np.uint8
    assert np.abs(jittered.astype(int) - image).mean() > 1


@pytest.fixture
def sequence(tmp_path, smooth_images):
    """An HPatches-style folder: 1.ppm, 2.ppm = 1.ppm under a known homography, H_1_2."""
    image = cv2.resize(read_image(smooth_images / "peppers.png"), (128, 128),
                       interpolation=cv2.INTER_AREA)
    h = np.array([[0.9, 0.1, 10.0], [-0.05, 1.1, 5.0], [1e-4, 2e-4, 1.0]])
    folder = tmp_path / "v_peppers"
    folder.mkdir()
    cv2.imwrite(str(folder / "1.ppm"), image)
    cv2.imwrite(str(folder / "2.ppm"), cv2.warpPerspective(image, h, (160, 160)))
    np.savetxt(folder / "H_1_2", h)
    return tmp_path, h, image


def test_homography_pairs(sequence):
    root, h, image = sequence
    source = HomographyPairs(root)
    assert len(source) == 1
    pair = source.pair(0, np.random.default_rng(0))
    np.testing.assert_array_equal(pair.image1, image)
    np.testing.assert_allclose(pair.aflow, homography_flow(h, *image.shape[:2]))
    pair.aflow[:, ~((pair.aflow >= 0) & (pair.aflow <= 159)).all(axis=0)] = np.nan
    assert_flow_is_exact(pair, max_error=3.0)


def test_flow_pairs(sequence):
    root, h, image = sequence
    folder = root / "v_peppers"
    (folder / "H_1_2").unlink()
    np.save(folder / "flow_1_2.npy", homography_flow(h, *image.shape[:2]).transpose(1, 2, 0))
    pair = FlowPairs(root).pair(0, np.random.default_rng(0))
    np.testing.assert_allclose(pair.aflow, homography_flow(h, *image.shape[:2]))
    with pytest.raises(ValueError, match="no pair"):
        HomographyPairs(root)


def test_sources_reject_bad_input(tmp_path):
    with pytest.raises(ValueError):
        SyntheticPairs(tmp_path)  # empty folder
    with pytest.raises(ValueError):
        SyntheticPairs([image_path("boat.png")], scale=(512, 256))
    with pytest.raises(TypeError):
        PairDataset([object()])


def test_collate_stacks():
    items = [{"a": torch.zeros(2, 3)}, {"a": torch.ones(2, 3)}]
    assert collate(items)["a"].shape == (2, 2, 3)
