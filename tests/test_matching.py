"""The batched mutual nearest-neighbour matcher against cv2.BFMatcher(crossCheck=True)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from conftest import read_image
from cv2r2d2.matching import (
    exhaustive_pairs, match_batch, match_collection, mutual_nearest_neighbours, parse_pairs,
    sequential_pairs,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _small(name: str, side: int = 256) -> np.ndarray:
    image = read_image(name)
    scale = side / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


@pytest.fixture(scope="module")
def r2d2_descriptors(r2d2):
    """R2D2 descriptors of two photos and a blurred copy of one (many close matches);
    256 px: one pyramid level at the paper's settings."""
    boat = _small("boat.png")
    images = [boat, cv2.GaussianBlur(boat, (5, 5), 1.5), _small("peppers.png")]
    return [r2d2.detectAndCompute(image, None)[1] for image in images]


@pytest.fixture(scope="module")
def sift_descriptors():
    """SIFT's float descriptors: not unit-norm, values up to ~200."""
    sift = cv2.SIFT_create(2000)
    images = [_small("brooklyn.png", 640), _small("brooklyn.png", 560), _small("test.png", 640)]
    return [sift.detectAndCompute(image, None)[1] for image in images]


@pytest.fixture(scope="module")
def orb_descriptors():
    orb = cv2.ORB_create(2000)
    images = [_small("brooklyn.png", 640), _small("brooklyn.png", 560), _small("test.png", 640)]
    return [orb.detectAndCompute(image, None)[1] for image in images]


def _bfmatcher(a: np.ndarray, b: np.ndarray, norm: int):
    matches = sorted(cv2.BFMatcher(norm, crossCheck=True).match(a, b), key=lambda m: m.queryIdx)
    return (np.array([[m.queryIdx, m.trainIdx] for m in matches], np.int64).reshape(-1, 2),
            np.array([m.distance for m in matches], np.float32))


def _all_pairs(descriptors):
    return [(a, b) for i, a in enumerate(descriptors) for b in descriptors[i + 1:]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["r2d2", "sift", "orb"])
def test_same_pairs_as_bfmatcher_cross_check(request, kind, device):
    descriptors = request.getfixturevalue(f"{kind}_descriptors")
    norm = cv2.NORM_HAMMING if kind == "orb" else cv2.NORM_L2
    pairs = _all_pairs(descriptors)
    results = match_batch(pairs, norm, device=device)
    for (a, b), (indices, distances) in zip(pairs, results):
        expected, expected_distances = _bfmatcher(a, b, norm)
        assert len(expected) >= 10
        np.testing.assert_array_equal(indices, expected)
        np.testing.assert_allclose(distances, expected_distances, rtol=1e-5, atol=1e-5)


def test_ties_go_to_the_lower_index_as_in_opencv(r2d2_descriptors):
    a = r2d2_descriptors[0][:300]
    # Every descriptor of a twice in b, plus a third copy of the first 50: exact ties.
    b = np.concatenate([a[:150], a, a[:50], r2d2_descriptors[2][:100]])
    indices, distances = mutual_nearest_neighbours(a, b, device="cpu")
    np.testing.assert_array_equal(indices, _bfmatcher(a, b, cv2.NORM_L2)[0])
    assert np.all(distances == 0)


def test_batching_does_not_change_the_result(r2d2_descriptors):
    pairs = _all_pairs(r2d2_descriptors)
    together = match_batch(pairs, device="cpu")
    one_by_one = match_batch(pairs, device="cpu", max_elements=1)
    for (i1, d1), (i2, d2) in zip(together, one_by_one):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(d1, d2)


def test_distance_and_ratio_thresholds(r2d2_descriptors):
    a, b = r2d2_descriptors[0], r2d2_descriptors[1]
    indices, distances = mutual_nearest_neighbours(a, b, device="cpu")
    close, close_distances = mutual_nearest_neighbours(a, b, max_distance=0.5, device="cpu")
    np.testing.assert_array_equal(close, indices[distances <= 0.5])
    assert 0 < len(close) < len(indices) and close_distances.max() <= 0.5
    # Lowe's ratio test both ways, against a direct computation.
    full = np.sqrt(((a[:, None, :].astype(np.float64) - b[None]) ** 2).sum(-1))
    rows, columns = np.sort(full, axis=1), np.sort(full, axis=0)
    keep = [(i, j) for i, j in indices
            if rows[i, 0] <= 0.8 * rows[i, 1] and columns[0, j] <= 0.8 * columns[1, j]]
    ratio, _ = mutual_nearest_neighbours(a, b, ratio=0.8, device="cpu")
    np.testing.assert_array_equal(ratio, np.array(keep).reshape(-1, 2))
    assert 0 < len(ratio) < len(indices)


def test_edge_cases_and_bad_input(r2d2_descriptors):
    a = r2d2_descriptors[0]
    indices, distances = mutual_nearest_neighbours(a, a[:0], device="cpu")
    assert indices.shape == (0, 2) and distances.shape == (0,)
    indices, _ = mutual_nearest_neighbours(a[:1], a, device="cpu")
    np.testing.assert_array_equal(indices, [[0, 0]])
    with pytest.raises(ValueError, match="descriptor sizes differ"):
        mutual_nearest_neighbours(a, a[:, :64], device="cpu")
    with pytest.raises(TypeError, match="uint8 for NORM_HAMMING"):
        mutual_nearest_neighbours(a, a, norm=cv2.NORM_HAMMING, device="cpu")
    with pytest.raises(TypeError, match="float32 for NORM_L2"):
        mutual_nearest_neighbours(a.astype(np.uint8), a.astype(np.uint8), device="cpu")
    with pytest.raises(ValueError, match="NaN"):
        mutual_nearest_neighbours(np.full((2, 128), np.nan, np.float32), a, device="cpu")
    with pytest.raises(ValueError, match="ratio"):
        mutual_nearest_neighbours(a, a, ratio=1.5, device="cpu")
    with pytest.raises(ValueError, match="norm"):
        mutual_nearest_neighbours(a, a, norm=cv2.NORM_L1, device="cpu")


def test_pairs():
    names = ["a", "b", "c", "d"]
    assert exhaustive_pairs(names) == [("a", "b"), ("a", "c"), ("a", "d"), ("b", "c"),
                                       ("b", "d"), ("c", "d")]
    assert sequential_pairs(names, 2) == [("a", "b"), ("a", "c"), ("b", "c"), ("b", "d"),
                                          ("c", "d")]
    assert parse_pairs("sequential:1", names) == [("a", "b"), ("b", "c"), ("c", "d")]
    assert parse_pairs("sequential", names) == exhaustive_pairs(names)
    for bad in ("sequential:x", "sequential:0", "no_such_file.txt"):
        with pytest.raises(ValueError):
            parse_pairs(bad, names)


def test_pairs_file(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("a b\nb a\nc c\n# comment\nc d\n")
    assert parse_pairs(str(path), ["a", "b", "c", "d"]) == [("a", "b"), ("c", "d")]
    path.write_text("a e\n")
    with pytest.raises(ValueError, match="without features: e"):
        parse_pairs(str(path), ["a", "b"])


def test_match_collection_writes_and_resumes(r2d2_descriptors, tmp_path):
    pytest.importorskip("h5py")
    from cv2r2d2.io import H5Features, H5Matches, ImageFeatures

    names = ["a.png", "b.png", "c.png"]
    with H5Features(tmp_path / "features.h5", writable=True) as features:
        for name, descriptors in zip(names, r2d2_descriptors):
            n = len(descriptors)
            features.write(name, ImageFeatures(np.zeros((n, 2), np.float32), descriptors,
                                               np.ones(n, np.float32), (320, 320)))
        pairs = parse_pairs("exhaustive", features.names())
        with H5Matches(tmp_path / "matches.h5", writable=True) as matches:
            report = match_collection(features, pairs[:2], matches, device="cpu")
            assert report.matched == pairs[:2] and report.skipped == []
            report = match_collection(features, pairs, matches, device="cpu")
            assert report.matched == pairs[2:] and report.skipped == pairs[:2]
            indices, scores = matches.read("b.png", "a.png")
    expected, distances = _bfmatcher(r2d2_descriptors[1], r2d2_descriptors[0], cv2.NORM_L2)
    order = np.argsort(expected[:, 1])
    np.testing.assert_array_equal(indices, expected[order])
    np.testing.assert_allclose(scores, 1 - distances[order] ** 2 / 2, atol=1e-5)
