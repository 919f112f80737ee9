"""The batched mutual nearest-neighbour matcher against cv2.BFMatcher(crossCheck=True)."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from conftest import read_image
from cv2r2d2 import matching
from cv2r2d2.collection import match_collection
from cv2r2d2.matching import (
    DEFAULT_MAX_ELEMENTS, ESTIMATE_ON, PLACE_RADIUS, _votes, estimate_rotation, match_batch,
    match_rotated, mutual_nearest_neighbours, nearest_places,
)
from cv2r2d2.pairs import exhaustive_pairs, parse_pairs, sequential_pairs
from cv2r2d2.steered_matcher import SteeredMatcher
from cv2r2d2.steerer_fitting import FitSettings, fit_steerers, rotate_image
from cv2r2d2.steerers import DEFAULT_ROTATIONS, rotation_angles

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
    from cv2r2d2.collection import MatchingSettings
    from cv2r2d2.stores import H5Features, H5Matches, ImageFeatures

    cpu = MatchingSettings(device="cpu")
    names = ["a.png", "b.png", "c.png"]
    with H5Features(tmp_path / "features.h5", writable=True) as features:
        for name, descriptors in zip(names, r2d2_descriptors):
            n = len(descriptors)
            features.write(name, ImageFeatures(np.zeros((n, 2), np.float32), descriptors,
                                               np.ones(n, np.float32), (320, 320)))
        pairs = parse_pairs("exhaustive", features.names())
        with H5Matches(tmp_path / "matches.h5", writable=True) as matches:
            report = match_collection(features, pairs[:2], matches, cpu)
            assert report.matched == pairs[:2] and report.skipped == []
            report = match_collection(features, pairs, matches, cpu)
            assert report.matched == pairs[2:] and report.skipped == pairs[:2]
            indices, scores = matches.read("b.png", "a.png")
    expected, distances = _bfmatcher(r2d2_descriptors[1], r2d2_descriptors[0], cv2.NORM_L2)
    order = np.argsort(expected[:, 1])
    np.testing.assert_array_equal(indices, expected[order])
    np.testing.assert_allclose(scores, 1 - distances[order] ** 2 / 2, atol=1e-5)


# --- rotated views -------------------------------------------------------------------


@pytest.fixture(scope="module")
def quarter_turns(r2d2):
    """Keypoints, descriptors and homography (from the first) of a 256 px boat and of its
    exact rotations by 90, 180 and 270 degrees (cv2.rotate)."""
    boat = _small("boat.png")
    views = []
    for angle in (0, 90, 180, 270):
        rotated, homography = rotate_image(boat, angle)
        keypoints, descriptors = r2d2.detectAndCompute(rotated, None)
        views.append((cv2.KeyPoint_convert(keypoints), descriptors, homography))
    return views


def _indices(matches) -> np.ndarray:
    return np.array([(m.queryIdx, m.trainIdx) for m in matches], np.int64).reshape(-1, 2)


def _corner_error(xy_a, xy_b, indices, homography, side=256) -> float:
    """Mean corner error of the RANSAC homography of the matches (inf if none)."""
    if len(indices) < 4:
        return float("inf")
    estimate, _ = cv2.findHomography(xy_a[indices[:, 0]], xy_b[indices[:, 1]], cv2.RANSAC, 3.0)
    if estimate is None:
        return float("inf")
    corners = np.array([[[0, 0], [side, 0], [side, side], [0, side]]], np.float64)
    return float(np.linalg.norm(cv2.perspectiveTransform(corners, estimate)
                                - cv2.perspectiveTransform(corners, homography), axis=2).mean())


@pytest.mark.slow  # extractions of rotated views
def test_steered_matching_recovers_quarter_turns_where_plain_matching_fails(
        quarter_turns, quarter_steerers):
    xy_a, d_a, _ = quarter_turns[0]
    matcher = SteeredMatcher(quarter_steerers, rotations=4, device="cpu")
    for angle, (xy_b, d_b, homography) in zip((90, 180, 270), quarter_turns[1:]):
        steered = _indices(matcher.match(d_a, d_b))
        assert matcher.getRotation() == angle
        assert _corner_error(xy_a, xy_b, steered, homography) < 2
        plain, _ = mutual_nearest_neighbours(d_a, d_b, device="cpu")
        assert _corner_error(xy_a, xy_b, plain, homography) > 2
        # The same pairs as plain OpenCV on the steered descriptors, and as the functions.
        opencv = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(
            quarter_steerers.steer(d_a, angle), d_b)
        np.testing.assert_array_equal(steered, _indices(opencv))
        indices, _ = mutual_nearest_neighbours(d_a, d_b, rotations=4, steerers=quarter_steerers,
                                               device="cpu")
        np.testing.assert_array_equal(indices, steered)
        [(_, _, best)] = match_rotated([(d_a, d_b)], quarter_steerers.for_rotations(4),
                                       device="cpu", estimate_on=None)
        assert best * 90 == angle
    assert estimate_rotation([(q[1], d_a) for q in quarter_turns[1:]],
                             quarter_steerers.for_rotations(4), device="cpu") == [3, 2, 1]


def test_rotations_1_is_exactly_plain_matching(r2d2_descriptors, quarter_steerers):
    a, b = r2d2_descriptors[0], r2d2_descriptors[2]
    matcher = SteeredMatcher(quarter_steerers, rotations=1, device="cpu")
    matches = matcher.match(a, b)
    expected = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(a, b)
    assert len(expected) >= 10 and matcher.getRotation() == 0
    assert [(m.queryIdx, m.trainIdx) for m in matches] == \
        [(m.queryIdx, m.trainIdx) for m in expected]
    np.testing.assert_allclose([m.distance for m in matches], [m.distance for m in expected],
                               rtol=1e-5, atol=1e-5)
    plain = mutual_nearest_neighbours(a, b, device="cpu")
    for one in (mutual_nearest_neighbours(a, b, device="cpu", rotations=1),
                mutual_nearest_neighbours(a, b, device="cpu", rotations=1,
                                          steerers=quarter_steerers)):
        np.testing.assert_array_equal(one[0], plain[0])
        np.testing.assert_array_equal(one[1], plain[1])


def test_knn_match_and_no_cross_check_under_the_estimated_rotation(quarter_turns,
                                                                   quarter_steerers):
    (xy_a, d_a, _), (xy_b, d_b, homography) = quarter_turns[0], quarter_turns[1]
    matcher = SteeredMatcher(quarter_steerers, rotations=4, crossCheck=False, device="cpu")
    knn = matcher.knnMatch(d_a, d_b, 2)
    assert matcher.getRotation() == 90 and matcher.getCrossCheck() is False
    steered = quarter_steerers.steer(d_a, 90)
    expected = cv2.BFMatcher(cv2.NORM_L2).knnMatch(steered, d_b, 2)
    assert [[(m.queryIdx, m.trainIdx) for m in row] for row in knn] == \
        [[(m.queryIdx, m.trainIdx) for m in row] for row in expected]
    good = [row[0] for row in knn if row[0].distance < 0.9 * row[1].distance]
    assert _corner_error(xy_a, xy_b, _indices(good), homography) < 2
    np.testing.assert_array_equal(_indices(matcher.match(d_a, d_b)),
                                  _indices(cv2.BFMatcher(cv2.NORM_L2).match(steered, d_b)))
    cross = SteeredMatcher(quarter_steerers, rotations=4, device="cpu")
    rows = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).knnMatch(steered, d_b, 1)
    assert [[(m.queryIdx, m.trainIdx) for m in row] for row in cross.knnMatch(d_a, d_b, 1)] == \
        [[(m.queryIdx, m.trainIdx) for m in row] for row in rows]


def test_steered_matching_bad_input_and_empty_sets(r2d2_descriptors, quarter_steerers):
    a, b = r2d2_descriptors[0], r2d2_descriptors[2]
    for rotations in (0, -4, 7, 16, 2.5, True):
        with pytest.raises(ValueError, match="divisor of 360"):
            SteeredMatcher(quarter_steerers, rotations=rotations)
        with pytest.raises(ValueError, match="divisor of 360"):
            mutual_nearest_neighbours(a, b, rotations=rotations, steerers=quarter_steerers)
    with pytest.raises(ValueError, match="lack some of the angles"):
        SteeredMatcher(quarter_steerers, rotations=12)
    with pytest.raises(TypeError, match="R2D2Feature"):
        SteeredMatcher("r2d2_WASF_N16", rotations=4)
    with pytest.raises(TypeError, match="crossCheck"):
        SteeredMatcher(quarter_steerers, rotations=4, crossCheck=1)
    with pytest.raises(ValueError, match="needs steerers"):
        mutual_nearest_neighbours(a, b, rotations=4)
    orb = np.zeros((5, 32), np.uint8)
    with pytest.raises(ValueError, match="NORM_L2"):
        mutual_nearest_neighbours(orb, orb, norm=cv2.NORM_HAMMING, rotations=4,
                                  steerers=quarter_steerers)
    with pytest.raises(ValueError, match="128-dimensional"):
        mutual_nearest_neighbours(a[:, :64], b[:, :64], rotations=4, steerers=quarter_steerers)
    matcher = SteeredMatcher(quarter_steerers, rotations=4, device="cpu")
    with pytest.raises(ValueError, match="N x 128"):
        matcher.match(a[:, :64], b)
    for wrong in (a.astype(np.float64), a.astype(np.uint8), a.tolist()):
        with pytest.raises(TypeError, match="float32"):
            matcher.match(wrong, b)
    with pytest.raises(ValueError, match="k=1 only"):
        matcher.knnMatch(a, b, 2)
    with pytest.raises(ValueError, match="k must be"):
        matcher.knnMatch(a, b, 0)
    # Empty sets (and None, what detectAndCompute gives without keypoints): no matches.
    matcher.match(a, b)
    for query, train in ((a[:0], b), (a, b[:0]), (None, b), (a[:0], b[:0])):
        assert matcher.match(query, train) == () and matcher.getRotation() is None
    assert matcher.knnMatch(a[:0], b, 1) == ()
    loose = SteeredMatcher(quarter_steerers, rotations=4, crossCheck=False, device="cpu")
    assert loose.match(a, b[:0]) == () and loose.knnMatch(a[:3], b[:0], 2) == ((), (), ())
    indices, distances = mutual_nearest_neighbours(a[:0], b, rotations=4,
                                                   steerers=quarter_steerers)
    assert indices.shape == (0, 2) and distances.shape == (0,)


def test_match_collection_with_rotations(quarter_turns, quarter_steerers, tmp_path):
    pytest.importorskip("h5py")
    from cv2r2d2.collection import MatchingSettings
    from cv2r2d2.stores import H5Features, H5Matches, ImageFeatures

    names = ["a.png", "b.png", "c.png"]
    with H5Features(tmp_path / "features.h5", writable=True) as features:
        for name, (xy, descriptors, _) in zip(names, quarter_turns):
            features.write(name, ImageFeatures(xy, descriptors, np.ones(len(xy), np.float32),
                                               (256, 256)))
        pairs = parse_pairs("exhaustive", features.names())
        with H5Matches(tmp_path / "matches.h5", writable=True) as matches:
            match_collection(features, pairs, matches,
                             MatchingSettings(rotations=4, device="cpu"), quarter_steerers)
            stored = {pair: matches.read(*pair)[0] for pair in pairs}
    by_name = dict(zip(names, quarter_turns))
    for (name_a, name_b), indices in stored.items():
        expected, _ = mutual_nearest_neighbours(by_name[name_a][1], by_name[name_b][1],
                                                rotations=4, steerers=quarter_steerers,
                                                device="cpu")
        np.testing.assert_array_equal(indices, expected)
        assert len(indices) > 50


# --- between steering angles: the ratio recipe, the coarse-to-fine vote ----------------


@pytest.fixture(scope="module")
def default_steerers(r2d2):
    """r2d2's steerers for the default steering set, fitted on one 128 px procedural
    image (not cached)."""
    return fit_steerers(r2d2, rotation_angles(DEFAULT_ROTATIONS),
                        FitSettings(image_size=128, num_images=1), show_progress=False)


@pytest.fixture(scope="module")
def turned_45(r2d2):
    """Keypoints and descriptors of a 320 px Sacre-Coeur photo and of its rotation by 45
    degrees (two pyramid levels at the paper's settings), and the homography."""
    photo = _small("sacre_coeur/03903474_1471484089.jpg", 320)
    rotated, homography = rotate_image(photo, 45)
    return r2d2.detectAndCompute(photo, None), r2d2.detectAndCompute(rotated, None), homography


def _correct(keypoints_a, keypoints_b, matches, homography) -> int:
    """Matches whose image-b keypoint lies within 3 px of the truth."""
    indices = _indices(matches)
    if not len(indices):
        return 0
    xy_a, xy_b = cv2.KeyPoint_convert(keypoints_a), cv2.KeyPoint_convert(keypoints_b)
    mapped = cv2.perspectiveTransform(xy_a[indices[:, 0]].reshape(-1, 1, 2).astype(np.float64),
                                      homography).reshape(-1, 2)
    return int((np.linalg.norm(mapped - xy_b[indices[:, 1]], axis=1) <= 3).sum())


@pytest.mark.slow  # full-size extractions
def test_readme_ratio_recipe_at_45_degrees_keeps_the_cross_checked_correct_matches(
        turned_45, default_steerers):
    (kp1, d1), (kp2, d2), homography = turned_45
    cross = SteeredMatcher(default_steerers, device="cpu")
    cross_correct = _correct(kp1, kp2, cross.match(d1, d2), homography)
    # The README's recipe.
    matcher = SteeredMatcher(default_steerers, crossCheck=False, device="cpu")
    good = [m for m, n in matcher.knnMatch(d1, d2, 2, trainKeypoints=kp2)
            if m.distance < 0.9 * n.distance]
    assert matcher.getRotation() == cross.getRotation() == 45
    assert _correct(kp1, kp2, good, homography) >= cross_correct >= 100


@pytest.mark.slow  # extractions of rotated full-size views
def test_k_nearest_places(turned_45, default_steerers):
    (_, d1), (kp2, d2), _ = turned_45
    steered = default_steerers.steer(d1, 45)
    xy = cv2.KeyPoint_convert(kp2)
    opencv = cv2.BFMatcher(cv2.NORM_L2).knnMatch(steered, d2, 3)
    indices, distances = nearest_places(steered, d2, xy, 3, radius=0, device="cpu")
    np.testing.assert_array_equal(indices, [[m.trainIdx for m in row] for row in opencv])
    np.testing.assert_allclose(distances, [[m.distance for m in row] for row in opencv],
                               rtol=1e-5, atol=1e-6)
    # With a radius each next neighbour is the nearest farther than it from those before.
    indices, distances = nearest_places(steered, d2, xy, 2, radius=PLACE_RADIUS, device="cpu")
    a, b = steered.astype(np.float64), d2.astype(np.float64)
    exact = np.sqrt(np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1) - 2 * a @ b.T, 0))
    first = exact.argmin(axis=1)
    np.testing.assert_array_equal(indices[:, 0], first)
    apart = np.linalg.norm(xy[None] - xy[first][:, None], axis=2) > PLACE_RADIUS
    second = np.where(apart, exact, np.inf)
    np.testing.assert_array_equal(indices[:, 1], second.argmin(axis=1))
    np.testing.assert_allclose(distances[:, 1], second.min(axis=1), rtol=1e-5)
    close = (np.linalg.norm(xy[indices[:, 0]] - xy[indices[:, 1]], axis=1) <= PLACE_RADIUS)
    assert not close.any()
    # The matcher's knnMatch gives the same; one place only: rows of one match.
    matcher = SteeredMatcher(default_steerers, crossCheck=False, device="cpu")
    rows = matcher.knnMatch(d1, d2, 2, trainKeypoints=kp2)
    assert [[m.trainIdx for m in row] for row in rows] == indices.tolist()
    assert [m.queryIdx for m, _ in rows] == list(range(len(d1)))
    same_place = np.zeros((len(d2), 2), np.float32)
    assert {len(row) for row in matcher.knnMatch(d1, d2, 2, trainKeypoints=same_place)} == {1}


def test_knn_match_train_keypoints_bad_input(turned_45, default_steerers):
    (_, d1), (kp2, d2), _ = turned_45
    matcher = SteeredMatcher(default_steerers, crossCheck=False, device="cpu")
    with pytest.raises(ValueError, match="same image's"):
        matcher.knnMatch(d1, d2, 2, trainKeypoints=kp2[:-1])
    with pytest.raises(ValueError, match="N x 2"):
        matcher.knnMatch(d1, d2, 2, trainKeypoints=np.zeros((len(d2), 3)))
    with pytest.raises(TypeError, match="cv2.KeyPoint"):
        matcher.knnMatch(d1, d2, 2, trainKeypoints=["a"] * len(d2))
    with pytest.raises(ValueError, match="NaN"):
        matcher.knnMatch(d1, d2, 2, trainKeypoints=np.full((len(d2), 2), np.nan))
    for radius in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="radius"):
            matcher.knnMatch(d1, d2, 2, trainKeypoints=kp2, radius=radius)
    with pytest.raises(TypeError, match="radius"):
        matcher.knnMatch(d1, d2, 2, trainKeypoints=kp2, radius="4")
    with pytest.raises(ValueError, match="descriptor sizes differ"):
        nearest_places(d1[:, :64], d2, kp2, 2)
    with pytest.raises(ValueError, match="k must be"):
        nearest_places(d1, d2, kp2, 0)
    with pytest.raises(ValueError, match="crossCheck=False"):
        SteeredMatcher(default_steerers, device="cpu").knnMatch(d1, d2, 1, trainKeypoints=kp2)
    assert matcher.knnMatch(d1, d2[:0], 2, trainKeypoints=kp2[:0]) == ((),) * len(d1)
    assert matcher.knnMatch(None, d2, 2, trainKeypoints=kp2) == ()


def test_coarse_to_fine_vote_finds_what_every_angle_voting_finds(turned_45, default_steerers,
                                                                   monkeypatch):
    (_, d1), (_, d2), _ = turned_45
    matrices = default_steerers.for_rotations(DEFAULT_ROTATIONS)
    pairs = [(d1, d2), (d2, d1)]
    best, votes = _votes(pairs, matrices, "cpu", DEFAULT_MAX_ELEMENTS, ESTIMATE_ON)
    step = 360 / DEFAULT_ROTATIONS
    assert [b * step for b in best] == [45, 315]
    # Each pair voted on every 2nd angle, then on the two beside the winner.
    assert [sum(v is not None for v in pair) for pair in votes] == [DEFAULT_ROTATIONS // 2 + 2] * 2
    monkeypatch.setattr(matching, "COARSE_VOTES", 10**9)
    assert estimate_rotation(pairs, matrices, device="cpu") == best
