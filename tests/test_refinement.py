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
