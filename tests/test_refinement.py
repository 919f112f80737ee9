"""Tracks from match graphs and the featuremetric keypoint refinement."""
from __future__ import annotations

import numpy as np
import pytest

from cv2r2d2.refinement import (
    RefinementParams, adjust_windows, build_tracks, window_offsets,
)


def _as_sets(tracks):
    return [set(zip(tracks.images[s:e].tolist(), tracks.keypoints[s:e].tolist()))
            for s, e in zip(tracks.starts[:-1], tracks.starts[1:])]


def test_tracks_join_matches_across_images():
    # (image, keypoint) pairs: a chain 0:5 - 1:2 - 2:7, a pair 0:1 - 3:4, and 3:4 - 1:8.
    edges = [[0, 5, 1, 2], [2, 7, 1, 2], [0, 1, 3, 4], [3, 4, 1, 8], [0, 5, 1, 2]]
    tracks = build_tracks(edges)
    assert _as_sets(tracks) == [{(0, 1), (3, 4), (1, 8)}, {(0, 5), (1, 2), (2, 7)}]
    assert tracks.lengths().tolist() == [3, 3] and tracks.num_conflicts == 0
    assert tracks.track_of().tolist() == [0, 0, 0, 1, 1, 1]
    # Each track is sorted by image.
    assert tracks.images.tolist() == [0, 1, 3, 0, 1, 2]


def test_conflicting_track_splits_at_its_weakest_match():
    # 0:5 - 1:2 - 2:7 - 0:9 would hold two keypoints of image 0 (5 and 9).
    edges = [[0, 5, 1, 2], [1, 2, 2, 7], [2, 7, 0, 9]]
    weakest_last = build_tracks(edges, scores=[0.9, 0.8, 0.1])
    assert _as_sets(weakest_last) == [{(0, 5), (1, 2), (2, 7)}]
    assert weakest_last.num_conflicts == 1
    # The weakest match decides where it splits: here 1:2 - 2:7 goes, two tracks remain.
    weakest_middle = build_tracks(edges, scores=[0.9, 0.1, 0.8])
    assert _as_sets(weakest_middle) == [{(0, 5), (1, 2)}, {(0, 9), (2, 7)}]
    assert weakest_middle.num_conflicts == 1
    for tracks in (weakest_last, weakest_middle):
        for s, e in zip(tracks.starts[:-1], tracks.starts[1:]):
            assert len(set(tracks.images[s:e].tolist())) == e - s


def test_tracks_check_their_input():
    empty = build_tracks(np.zeros((0, 4), np.int64))
    assert len(empty) == 0 and empty.starts.tolist() == [0]
    with pytest.raises(TypeError, match="E x 4 integer"):
        build_tracks(np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="two images"):
        build_tracks([[1, 0, 1, 2]])
    with pytest.raises(ValueError, match="one score per edge"):
        build_tracks([[0, 0, 1, 0]], scores=[0.5, 0.2])


def _field(points: np.ndarray, frequencies: np.ndarray, phases: np.ndarray) -> np.ndarray:
    """A smooth unit-vector field: random Fourier features of (x, y)."""
    values = np.cos(points @ frequencies.T + phases)
    return values / np.linalg.norm(values, axis=-1, keepdims=True)


def test_adjustment_brings_a_track_to_one_place():
    rng = np.random.default_rng(0)
    frequencies = rng.normal(0, 0.6, (64, 2))
    phases = rng.uniform(0, 2 * np.pi, 64)
    params = RefinementParams()
    offsets = window_offsets(params.window_radius)
    # 300 tracks of 2 to 5 observations of one true point each, detected up to 1.5 px off.
    lengths = rng.integers(2, 6, 300)
    truth = np.repeat(rng.uniform(-50, 50, (300, 2)), lengths, axis=0)
    detected = truth + rng.uniform(-1.5, 1.5, truth.shape)
    windows = _field(detected[:, None] + offsets, frequencies, phases).astype(np.float16)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    delta, similarity = adjust_windows(windows, starts, params)
    assert delta.dtype == np.float32 and delta.shape == detected.shape
    assert np.hypot(delta[:, 0], delta[:, 1]).max() <= params.max_displacement + 1e-5

    def spread(points):  # distance of each observation from its track's mean
        means = np.add.reduceat(points, starts[:-1]) / lengths[:, None]
        return np.linalg.norm(points - np.repeat(means, lengths, axis=0), axis=1)

    before, after = np.median(spread(detected)), np.median(spread(detected + delta))
    assert after < before / 5, (before, after)
    assert np.median(similarity) > 0.99
    # An observation that may not move stays; the others come to it.
    movable = np.ones(len(detected), bool)
    movable[starts[:-1]] = False
    delta, _ = adjust_windows(windows, starts, params, movable)
    assert (delta[starts[:-1]] == 0).all()


def test_adjustment_finds_a_track_point_between_samples():
    # Tracks of 7 observations that stay at the true point and one detected up to 1.2
    # samples off: the last must come to the true point, which lies between samples.
    rng = np.random.default_rng(1)
    frequencies = rng.normal(0, 0.6, (64, 2))
    phases = rng.uniform(0, 2 * np.pi, 64)
    params = RefinementParams()
    truth = rng.uniform(-50, 50, (400, 2))
    detected = np.stack([truth] * 7 + [truth + rng.uniform(-1.2, 1.2, truth.shape)], axis=1)
    detected = detected.reshape(-1, 2)
    windows = _field(detected[:, None] + window_offsets(params.window_radius), frequencies,
                     phases).astype(np.float16)
    movable = np.zeros(len(detected), bool)
    movable[7::8] = True
    delta, _ = adjust_windows(windows, np.arange(0, len(detected) + 1, 8), params, movable)
    error = np.linalg.norm(detected[7::8] + delta[7::8] - truth, axis=1)
    # On the bilinear interpolation the error is a fraction of the sub-sample step's
    # reach (0.03 median); a quadratic through the 3 x 3 best samples leaves 0.12.
    assert np.median(error) < 0.06 and np.percentile(error, 90) < 0.1, error
    with pytest.raises(ValueError, match="subcell_step"):
        RefinementParams(subcell_step=0)
    with pytest.raises(TypeError, match="subcell_step"):
        RefinementParams(subcell_step="1/16")


def test_adjustment_checks_its_input():
    params = RefinementParams(window_radius=2, max_displacement=1.5)
    with pytest.raises(ValueError, match="M x 25 x D"):
        adjust_windows(np.zeros((4, 49, 8), np.float32), [0, 2, 4], params)
    with pytest.raises(ValueError, match="starts"):
        adjust_windows(np.zeros((4, 25, 8), np.float32), [0, 3], params)
    with pytest.raises(ValueError, match="max_displacement"):
        RefinementParams(window_radius=2, max_displacement=2.0)
    with pytest.raises(ValueError, match="window_radius"):
        RefinementParams(window_radius=0)


def _homography(scale: float, degrees: float, tilt, size: int = 512) -> np.ndarray:
    """Scale, rotation and perspective tilt about the image centre."""
    angle = np.radians(degrees)
    centre = np.array([[1, 0, size / 2], [0, 1, size / 2], [0, 0, 1]])
    rotation = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 0],
                         [scale * np.sin(angle), scale * np.cos(angle), 0], [0, 0, 1]])
    perspective = np.array([[1, 0, 0], [0, 1, 0], [tilt[0] / size, tilt[1] / size, 1]])
    return centre @ rotation @ perspective @ np.linalg.inv(centre)


def _transfer(H: np.ndarray, points: np.ndarray) -> np.ndarray:
    projected = np.c_[points, np.ones(len(points))] @ H.T
    return projected[:, :2] / projected[:, 2:]


@pytest.fixture(scope="module")
def warped_boat(r2d2, boat, tmp_path_factory):
    """boat and two warps of it with known homographies (image files), their features
    (paper settings, 5 pyramid levels), the matches geometric verification would keep
    as (image0, keypoint0, image1, keypoint1) edges, and each edge's homography."""
    import cv2

    from cv2r2d2.matching import mutual_nearest_neighbours

    folder = tmp_path_factory.mktemp("warped_boat")
    homographies = [np.eye(3), _homography(1.2, 5, (0.2, -0.1)), _homography(0.85, -4, (-0.1, 0.2))]
    paths, found = [], []
    for k, H in enumerate(homographies):
        paths.append(folder / f"warp{k}.png")
        image = cv2.warpPerspective(boat, H, (512, 512), flags=cv2.INTER_LINEAR)
        cv2.imwrite(str(paths[-1]), image)
        found.append(r2d2.detectFeatures(image))
    edges, truth = [], []
    for a, b in ((0, 1), (0, 2), (1, 2)):
        matches, _ = mutual_nearest_neighbours(found[a].descriptors, found[b].descriptors)
        a_to_b = homographies[b] @ np.linalg.inv(homographies[a])
        error = np.linalg.norm(_transfer(a_to_b, found[a].xy[matches[:, 0]])
                               - found[b].xy[matches[:, 1]], axis=1)
        matches = matches[error < 3]  # what geometric verification would keep
        edges.append(np.c_[np.full(len(matches), a), matches[:, 0],
                           np.full(len(matches), b), matches[:, 1]])
        truth += [a_to_b] * len(matches)
    return paths, found, np.concatenate(edges), truth


@pytest.mark.parametrize("params", [
    RefinementParams(),
    RefinementParams(upsample=2.0, window_radius=3, max_displacement=2.5),
], ids=["pyramid", "upsampled"])
@pytest.mark.slow  # full-size refinement, minutes
def test_refined_keypoints_lie_closer_to_the_truth(r2d2, warped_boat, params):
    """The tracks' keypoints, refined, agree with the geometry better than as detected
    (on the extraction's pyramid; and on it upsampled twice, 4 levels finer), and stay
    inside their images."""
    from cv2r2d2.params import inside_image
    from cv2r2d2.refinement import RefinementReport, refine_keypoints

    paths, found, edges, truth = warped_boat
    keypoints = [f.xy for f in found]
    refined, report = refine_keypoints(r2d2, paths, keypoints, edges,
                                       sizes=[f.sizes for f in found],
                                       image_sizes=[(512, 512)] * 3, params=params)
    assert isinstance(report, RefinementReport) and report.num_tracks > 500
    assert report.num_outside == 0

    def errors(points):
        return np.array([np.linalg.norm(_transfer(H, points[a][[ka]])[0] - points[b][kb])
                         for (a, ka, b, kb), H in zip(edges, truth)])

    before, after = np.median(errors(keypoints)), np.median(errors(refined))
    assert after < before * 2 / 3, (before, after)
    for points, moved in zip(keypoints, refined):
        assert moved.shape == points.shape and moved.dtype == np.float32
        shift = np.linalg.norm(moved - points, axis=1)
        assert (shift > 0).any() and (shift == 0).any()
        assert inside_image(moved, 512, 512).all()


@pytest.mark.slow  # refines a full-size image
def test_a_keypoint_outside_its_image_is_left_out_and_the_rest_refined(r2d2, warped_boat, caplog):
    """A track keypoint outside its image (as an older version's descriptor mode stored:
    y = -0.86) and one not finite stop nothing: both stay as they are, a warning counts
    them, and every other track is refined exactly as without them. (The matches in one
    corner of the images: the network runs on a fraction of them.)"""
    from cv2r2d2.refinement import build_tracks, refine_keypoints

    paths, found, edges, _ = warped_boat
    keypoints = [f.xy.copy() for f in found]
    corner = np.ones(len(edges), bool)
    for column in (0, 2):  # both ends in the top-left 200 x 200 pixels
        for image, points in enumerate(keypoints):
            rows = edges[:, column] == image
            corner[rows] &= (points[edges[rows, column + 1]] < 200).all(axis=1)
    edges = edges[corner]
    tracks = build_tracks(edges)
    assert len(tracks) > 50

    def refine(points):
        return refine_keypoints(r2d2, paths, points, edges, sizes=[f.sizes for f in found],
                                image_sizes=[(512, 512)] * 3)

    expected, _ = refine(keypoints)
    bad = [(tracks.images[tracks.starts[t]], tracks.keypoints[tracks.starts[t]]) for t in (0, 1)]
    keypoints[bad[0][0]][bad[0][1], 1] = -0.86
    keypoints[bad[1][0]][bad[1][1], 0] = np.nan
    with caplog.at_level("WARNING", logger="cv2r2d2.refinement"):
        refined, report = refine(keypoints)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and warnings[0].startswith("2 track keypoints lie outside")
    assert "-0.86" in warnings[0] and "warp" in warnings[0], warnings
    assert report.num_outside == 2 and report.num_tracks == len(tracks)
    for image, keypoint in bad:
        np.testing.assert_array_equal(refined[image][keypoint], keypoints[image][keypoint])
    others = tracks.track_of() > 1
    moved = 0
    for image in range(3):
        rows = tracks.keypoints[others & (tracks.images == image)]
        np.testing.assert_array_equal(refined[image][rows], expected[image][rows])
        moved += int((refined[image][rows] != keypoints[image][rows]).any(axis=1).sum())
    assert moved > 50


@pytest.mark.slow  # a full-size image upsampled
def test_upsampled_windows_are_those_of_the_upsampled_image(r2d2, boat):
    """upsample=2 samples the levels of the image upsampled twice: on its finest level,
    windows match those of a 2x bilinear resize of the image at the same places (the
    pixel-centre mapping kept), with half a pixel of the image per map pixel."""
    import cv2

    import cv2r2d2

    rng = np.random.default_rng(0)
    points = rng.uniform(40, 470, (200, 2)).astype(np.float32)
    offsets = window_offsets(2)
    plain, plain_steps = r2d2._descriptor_windows(boat, points, offsets)
    same, same_steps = r2d2._descriptor_windows(boat, points, offsets, upsample=1.0)
    np.testing.assert_array_equal(plain, same)
    np.testing.assert_array_equal(plain_steps, same_steps)
    np.testing.assert_array_equal(plain_steps, np.ones_like(plain_steps))

    windows, steps = r2d2._descriptor_windows(boat, points, offsets, upsample=2.0)
    np.testing.assert_allclose(steps, 0.5)
    large = cv2.resize(boat, (1024, 1024), interpolation=cv2.INTER_LINEAR)
    wide = cv2r2d2.R2D2Feature.create(device="cpu", max_size=2048)
    expected, _ = wide._descriptor_windows(large, (points + 0.5) * 2 - 0.5, offsets)
    cosine = (windows * expected).sum(axis=2)
    assert np.median(cosine) > 0.99 and np.percentile(cosine, 5) > 0.95, \
        np.percentile(cosine, [5, 50])
    # and not those of the unscaled image's finest level, nor shifted by a pixel
    assert np.median((windows * plain).sum(axis=2)) < np.median(cosine) - 0.02
    shifted, _ = wide._descriptor_windows(large, (points + 0.5) * 2 + 0.5, offsets)
    assert np.median((windows * shifted).sum(axis=2)) < np.median(cosine) - 0.005


def test_upsampled_levels_follow_sizes(r2d2, boat):
    """With sizes, upsample=2 picks the level of the same keypoint size (image pixels)
    among the extraction's levels and finer ones: size 16 (the patch of 32 level pixels
    at scale 2) on the 2x level, 32 on the image's resolution, 64 on the extraction's
    coarsest level (boat: 256 pixels, min_size)."""
    points = np.array([[100.0, 120.0], [300.0, 250.0], [200.0, 400.0]], np.float32)
    _, steps = r2d2._descriptor_windows(boat, points, window_offsets(1),
                                             sizes=np.array([16.0, 32.0, 64.0]), upsample=2.0)
    np.testing.assert_allclose(steps[:, 0], [0.5, 1.0, 2.0], rtol=1e-3)


@pytest.mark.parametrize("upsample, error", [
    (0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("2", TypeError),
    (True, TypeError),
])
def test_upsample_is_checked(r2d2, boat, upsample, error):
    with pytest.raises(error, match="upsample"):
        r2d2._descriptor_windows(boat, np.zeros((1, 2), np.float32), window_offsets(1),
                                 upsample=upsample)
    with pytest.raises(error, match="upsample"):
        RefinementParams(upsample=upsample)


@pytest.mark.slow  # extractions of a full-size image
def test_windows_run_the_network_only_around_their_points(r2d2, boat, monkeypatch):
    """Each tile runs on the box of its points grown by the windows' reach, not on the
    whole tile: for two small clusters of points the network sees a small share of the
    level, and the windows are still those of the whole level's dense map."""
    from cv2r2d2.image import normalize_image
    from cv2r2d2.sampling import dense_maps

    runner = r2d2._runner()
    image = normalize_image(boat)
    full = dense_maps(runner, image)["descriptors"]  # (128, 512, 512), unit vectors
    rng = np.random.default_rng(3)
    points = np.concatenate([rng.integers(60, 90, (30, 2)), rng.integers(400, 440, (30, 2))])
    points = points.astype(np.float32)
    offsets = window_offsets(2)
    boxes = []
    run = runner.run

    def counting(handle, box=None):
        boxes.append(box)
        return run(handle, box)

    monkeypatch.setattr(runner, "run", counting)
    windows, steps = r2d2._descriptor_windows(boat, points, offsets)
    np.testing.assert_array_equal(steps, 1)
    area = sum((y1 - y0) * (x1 - x0) for y0, y1, x0, x1 in boxes)
    assert len(boxes) == 2 and area < 0.05 * 512 * 512, boxes
    for y0, y1, x0, x1 in boxes:  # each box: its cluster, reach 2 + 1 (bilinear) around
        inside = points[(points[:, 0] >= x0) & (points[:, 0] < x1)
                        & (points[:, 1] >= y0) & (points[:, 1] < y1)]
        assert len(inside) == 30
        assert (x0, y0) == tuple((inside.min(axis=0) - 3).astype(int).tolist())
        assert (x1, y1) == tuple((inside.max(axis=0) + 4).astype(int).tolist())
    x = points[:, None, 0].astype(int) + offsets[None, :, 0].astype(int)
    y = points[:, None, 1].astype(int) + offsets[None, :, 1].astype(int)
    np.testing.assert_allclose(windows, full[:, y, x].transpose(1, 2, 0), atol=2e-5)
