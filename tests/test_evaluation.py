"""The HPatches protocol on small HPatches-format folders made from the sample photos."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import read_image
from cv2r2d2.evaluation import (
    METRICS, PairData, evaluate_hpatches, format_table, list_sequences, matching_score,
    mean_matching_accuracy, plot_metrics, repeatability, write_json,
)

SIDE = 256  # one pyramid level at the paper's settings


def _photo(name: str) -> np.ndarray:
    """The photo's middle, SIDE x 3/4 SIDE pixels."""
    image = read_image(name)
    scale = SIDE / max(image.shape[:2])
    image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    top = (image.shape[0] - SIDE * 3 // 4) // 2
    return image[top:top + SIDE * 3 // 4]


def _write_sequence(root: Path, name: str, image: np.ndarray, seed: int) -> None:
    """1.ppm and five transformed copies with H_1_k: viewpoint (v_) warps of growing
    strength, or illumination (i_) changes under the identity; noise on both."""
    rng = np.random.default_rng(seed)
    folder = root / name
    folder.mkdir(parents=True)
    height, width = image.shape[:2]
    cv2.imwrite(str(folder / "1.ppm"), image)
    for k in range(2, 7):
        if name.startswith("v_"):
            corners = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
            moved = corners + rng.uniform(-0.06, 0.06, (4, 2)) * (k - 1) * [width, height]
            H = cv2.getPerspectiveTransform(corners, np.float32(moved))
            out = cv2.warpPerspective(image, H, (width, height), borderMode=cv2.BORDER_REFLECT)
        else:
            H = np.eye(3)
            out = 255 * (image / 255.0) ** [0.5, 0.7, 1.4, 2.0, 2.5][k - 2]
        out = np.clip(out + rng.normal(0, 3, out.shape), 0, 255).astype(np.uint8)
        cv2.imwrite(str(folder / f"{k}.ppm"), out)
        np.savetxt(folder / f"H_1_{k}", H)


@pytest.fixture(scope="module")
def hpatches(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hpatches")
    _write_sequence(root, "i_peppers", _photo("peppers.png"), seed=1)
    _write_sequence(root, "v_boat", _photo("boat.png"), seed=2)
    # A high-resolution sequence the protocol leaves out (its files are not even read).
    (root / "v_talent").mkdir()
    return root


class GroundTruthFeature:
    """A 'detector' that knows the truth: a grid of points of image 1, mapped by H_1_k
    (plus ``shift`` pixels in x in images 2..6), with one random descriptor per point."""

    def __init__(self, root: Path, shift: float = 0.0) -> None:
        self._answers = {}
        rng = np.random.default_rng(0)
        grid = np.stack(np.meshgrid(np.arange(40, SIDE - 40, 12.0),
                                    np.arange(40, SIDE * 3 // 4 - 40, 12.0)), -1).reshape(-1, 2)
        descriptors = rng.normal(size=(len(grid), 128)).astype(np.float32)
        for sequence in list_sequences(root):
            for k in range(1, 7):
                H = np.eye(3) if k == 1 else np.loadtxt(sequence / f"H_1_{k}")
                points = cv2.perspectiveTransform(grid.reshape(-1, 1, 2), H).reshape(-1, 2)
                points[:, 0] += shift if k > 1 else 0.0
                image = cv2.imread(str(sequence / f"{k}.ppm"))
                self._answers[image.tobytes()] = points

        self._descriptors = descriptors

    def detectAndCompute(self, image, mask):
        points = self._answers[image.tobytes()]
        return tuple(cv2.KeyPoint(float(x), float(y), 8) for x, y in points), self._descriptors

    def defaultNorm(self):
        return cv2.NORM_L2


def test_perfect_matches_give_mma_one(hpatches):
    results = evaluate_hpatches(hpatches, {"truth": GroundTruthFeature(hpatches)}, device="cpu")
    assert results["sequences"] == {"i": 1, "v": 1}
    scores = results["methods"]["truth"]
    for kind in ("i", "v", "overall"):
        for metric in METRICS:
            assert scores[metric][kind] == pytest.approx([1.0] * 10), metric
        assert scores["matches"][kind] == scores["keypoints"][kind] > 100


def test_matches_off_by_two_pixels(hpatches):
    results = evaluate_hpatches(hpatches, {"off": GroundTruthFeature(hpatches, shift=2.0)},
                                device="cpu")
    for metric in METRICS:
        values = results["methods"]["off"][metric]["overall"]
        assert values[0] == 0.0  # 1 px
        assert values[2:] == pytest.approx([1.0] * 8)  # 3..10 px


@pytest.mark.slow  # HPatches-like extractions
def test_r2d2_is_at_least_as_accurate_as_sift_at_3px(hpatches, r2d2, tmp_path):
    results = evaluate_hpatches(hpatches, {"r2d2": r2d2, "sift": cv2.SIFT_create(5000)},
                                device="cpu")
    r2d2_mma = results["methods"]["r2d2"]["mma"]
    sift_mma = results["methods"]["sift"]["mma"]
    assert r2d2_mma["overall"][2] >= sift_mma["overall"][2]
    assert r2d2_mma["overall"][2] > 0.8
    assert results["methods"]["r2d2"]["matches"]["overall"] > 100
    # Measured: repeatability@3 0.87 (R2D2) and 0.59 (SIFT), matching score@3 0.72, 0.60.
    for method in ("r2d2", "sift"):
        scores = results["methods"][method]
        for kind in ("i", "v", "overall"):
            assert 0.4 < scores["repeatability"][kind][2] <= 1
            assert 0.4 < scores["matching_score"][kind][2] <= 1
    r2d2_repeatability = results["methods"]["r2d2"]["repeatability"]["overall"][2]
    assert r2d2_repeatability > max(0.75, results["methods"]["sift"]["repeatability"]["overall"][2])
    table = format_table(results)
    for title in ("MMA on HPatches", "REPEATABILITY on HPatches", "MATCHING SCORE on HPatches"):
        assert title in table
    assert "r2d2" in table and "viewpoint" in table and "@3" in table
    write_json(results, tmp_path / "mma.json")
    assert json.loads((tmp_path / "mma.json").read_text()) == results
    pytest.importorskip("matplotlib")
    plot_metrics(results, tmp_path / "metrics.png")
    assert cv2.imread(str(tmp_path / "metrics.png")).shape[:2] == (1200, 1200)
    plot_metrics(results, tmp_path / "mma.png", "mma")
    assert cv2.imread(str(tmp_path / "mma.png")).shape[:2] == (400, 1200)
    assert format_table(results, "mma") == table.split("\n\n")[0]
    with pytest.raises(ValueError, match="not evaluated"):
        format_table({**results, "metrics": ["mma"]}, ["repeatability"])


class SteeredR2D2:
    """The session's R2D2 with steerers of its own (not cached)."""

    def __init__(self, r2d2, steerers) -> None:
        self._r2d2, self._steerers = r2d2, steerers

    def detectAndCompute(self, image, mask):
        return self._r2d2.detectAndCompute(image, mask)

    def defaultNorm(self):
        return cv2.NORM_L2

    def getSteerers(self, rotations):
        return self._steerers


@pytest.mark.slow  # extractions of rotated views
def test_r2d2_with_rotations_matches_rotated_views(r2d2, quarter_steerers, tmp_path):
    from cv2r2d2.steerer_fitting import rotate_image

    folder = tmp_path / "v_turns"
    folder.mkdir()
    image = _photo("boat.png")
    cv2.imwrite(str(folder / "1.ppm"), image)
    for k, angle in zip(range(2, 7), (90, 180, 270, 90, 180)):
        rotated, homography = rotate_image(image, angle)
        cv2.imwrite(str(folder / f"{k}.ppm"), rotated)
        np.savetxt(folder / f"H_1_{k}", homography)
    methods = {"r2d2": SteeredR2D2(r2d2, quarter_steerers), "sift": cv2.SIFT_create()}
    results = evaluate_hpatches(tmp_path, methods, metrics=["mma"], device="cpu", rotations=4)
    assert results["rotations"] == 4
    assert results["methods"]["r2d2"]["mma"]["v"][2] > 0.9  # plain matching: ~0.05
    assert results["methods"]["sift"]["mma"]["v"][2] > 0.9
    with pytest.raises(ValueError, match="divisor of 360"):
        evaluate_hpatches(tmp_path, methods, rotations=7)


def test_mean_matching_accuracy_of_a_pair():
    keypoints = np.array([[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]])
    H = np.array([[1.0, 0, 5], [0, 1.0, 0], [0, 0, 1]])
    moved = keypoints + [5, 0] + [[0, 0], [0.5, 0], [0, 2.5], [9, 0]]
    pair = PairData(keypoints, moved, np.array([[0, 0], [1, 1], [2, 2], [3, 3]]), H,
                    (64, 64), (64, 64))
    np.testing.assert_allclose(mean_matching_accuracy(pair, [0.1, 1, 3, 10]),
                               [0.25, 0.5, 0.75, 1.0])
    empty = PairData(keypoints, moved, np.zeros((0, 2), np.int64), H, (64, 64), (64, 64))
    np.testing.assert_array_equal(mean_matching_accuracy(empty, [1, 2]), [0, 0])


def _pair(keypoints_a, keypoints_b, homography=np.eye(3), size=(100, 80)) -> PairData:
    """Matches (i, i) for the first min(Na, Nb) keypoints: unique descriptors."""
    count = min(len(keypoints_a), len(keypoints_b))
    return PairData(np.asarray(keypoints_a, float), np.asarray(keypoints_b, float),
                    np.stack([np.arange(count)] * 2, axis=1), np.asarray(homography, float),
                    size, size)


GRID = np.stack(np.meshgrid(np.arange(10.0, 91, 10), np.arange(10.0, 71, 10)), -1).reshape(-1, 2)


def test_repeatability_and_matching_score_of_identical_and_shifted_keypoints():
    same = _pair(GRID, GRID)
    for metric in (repeatability, matching_score):
        np.testing.assert_array_equal(metric(same, [0.5, 1, 3]), [1, 1, 1])
    # Every keypoint 5 px off (3, 4): found again within 5 px, not within 3 px.
    shifted = _pair(GRID, GRID + [3, 4])
    for metric in (repeatability, matching_score):
        np.testing.assert_array_equal(metric(shifted, [3, 4.9, 5, 6]), [0, 0, 1, 1])
    # Mutual nearest neighbours in position, whatever the matches: descriptors that
    # pair every keypoint with the wrong one lower the matching score only.
    wrong = PairData(GRID, GRID, np.stack([np.arange(len(GRID)), np.roll(np.arange(len(GRID)), 1)],
                                          axis=1), np.eye(3), (100, 80), (100, 80))
    assert repeatability(wrong, [3]) == [1] and matching_score(wrong, [3]) == [0]
    # Keypoints found at one place at two scales pair with their twins one-to-one
    # (mutual nearest neighbours would pair one of each two: 0.5).
    twins = np.concatenate([GRID, GRID + 0.2])
    np.testing.assert_array_equal(repeatability(_pair(twins, twins + [0.5, 0]), [1, 3]), [1, 1])


def test_only_keypoints_of_the_common_region_count():
    # Image b sees image a moved 40 px to the left: a's x >= 40 (a keypoint at x = 39.6
    # lies in pixel 40 of a, which b does not see).
    H = np.array([[1.0, 0, -40], [0, 1, 0], [0, 0, 1]])
    inside = GRID[GRID[:, 0] >= 40]
    outside_a = np.array([[20.0, 30], [39.4, 50]])  # mapped to x < -0.5 in b
    outside_b = np.array([[70.0, 30], [80, 40], [90.0, 20]])  # mapped to x > 99.5 in a
    keypoints_a = np.concatenate([inside, outside_a])
    keypoints_b = np.concatenate([inside - [40, 0], outside_b])
    pair = _pair(keypoints_a, keypoints_b, H)
    np.testing.assert_array_equal(repeatability(pair, [1, 3]), [1, 1])
    np.testing.assert_array_equal(matching_score(pair, [1, 3]), [1, 1])
    # Half of b's visible keypoints gone: the smaller visible count is the denominator.
    half = _pair(keypoints_a, np.concatenate([inside[::2] - [40, 0], outside_b]), H)
    assert repeatability(half, [3]) == [1]
    # Half of a's visible keypoints 5 px off: half found again.
    moved = inside + np.where(np.arange(len(inside)) % 2, 1, 0)[:, None] * [3, 4]
    pair = _pair(np.concatenate([moved, outside_a]), keypoints_b, H)
    np.testing.assert_allclose(repeatability(pair, [3]), [np.ceil(len(inside) / 2) / len(inside)])
    # Nothing in the common region: zeros, not a division by zero.
    apart = _pair(outside_a, outside_b, H)
    for metric in (repeatability, matching_score):
        np.testing.assert_array_equal(metric(apart, [1, 3]), [0, 0])


def test_bad_folders(tmp_path):
    with pytest.raises(NotADirectoryError):
        list_sequences(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no HPatches sequences"):
        list_sequences(tmp_path)
    (tmp_path / "v_half").mkdir()
    (tmp_path / "v_half" / "1.ppm").write_bytes(b"")
    with pytest.raises(ValueError, match="missing 2.ppm"):
        list_sequences(tmp_path)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate_hpatches(tmp_path, {"sift": cv2.SIFT_create()}, metrics=("peakiness",))
