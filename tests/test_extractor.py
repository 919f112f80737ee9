"""The detection loop (NMS, top-k, sub-pixel refinement, cross-level suppression) and the
sampling of descriptors at given points, on backends with fixed maps."""
from __future__ import annotations

import cv2
import numpy as np

from cv2r2d2.extractor import (
    close_pairs, descriptor_shift, extract, peak_offsets, unique_across_levels,
)
from cv2r2d2.params import ExtractionParams
from cv2r2d2.sampling import describe, refine_matches


class MapRunner:
    """A backend whose network returns fixed maps (for the scale-1 level only)."""

    descriptor_size = 2

    def __init__(self, repeatability, reliability):
        self.repeatability = np.asarray(repeatability, np.float32)
        self.reliability = np.asarray(reliability, np.float32)

    def prepare(self, image):
        return image

    def resize(self, image, height, width):
        raise AssertionError("single-level test")

    def output_size(self, height, width):
        return self.repeatability.shape

    def run(self, image, box=None):
        y0, y1, x0, x1 = box or (0, self.repeatability.shape[0], 0, self.repeatability.shape[1])

        class Output:
            repeatability = self.repeatability[y0:y1, x0:x1]
            reliability = self.reliability[y0:y1, x0:x1]

            @staticmethod
            def descriptors_at(x, y):
                d = np.stack([x + x0 + 1, y + y0 + 1], axis=1).astype(np.float32)
                return d / np.linalg.norm(d, axis=1, keepdims=True)

        return Output()


def _single_level(**kw):
    return ExtractionParams(min_size=0, max_size=9999, min_scale=1.0, **kw)


def test_nms_thresholds_and_order():
    rep = np.zeros((6, 7), np.float32)
    rep[1, 1] = 0.9   # a maximum
    rep[1, 2] = 0.8   # its neighbour: suppressed
    rep[4, 5] = 0.95  # a maximum, but unreliable below
    rep[4, 1] = 0.75  # a maximum
    rep[0, 6] = 0.6   # below the repeatability threshold
    rel = np.full_like(rep, 0.9)
    rel[4, 5] = 0.5
    features = extract(MapRunner(rep, rel), np.zeros((3, 6, 7), np.float32), _single_level())
    np.testing.assert_array_equal(features.xy, [[1, 1], [1, 4]])
    np.testing.assert_allclose(features.scores, [0.9 * 0.9, 0.75 * 0.9], rtol=1e-6)
    assert features.sizes.tolist() == [32.0, 32.0] and features.octaves.tolist() == [0, 0]


def test_plateaus_count_as_maxima_like_the_reference():
    rep = np.zeros((4, 4), np.float32)
    rep[1, 1] = rep[1, 2] = 0.8
    features = extract(MapRunner(rep, np.ones_like(rep)), np.zeros((3, 4, 4), np.float32), _single_level())
    assert len(features) == 2


def test_top_k_and_mask():
    rng = np.random.default_rng(0)
    rep = np.zeros((40, 40), np.float32)
    rep[::3, ::3] = rng.uniform(0.71, 1.0, size=rep[::3, ::3].shape)
    runner = MapRunner(rep, np.ones_like(rep))
    image = np.zeros((3, 40, 40), np.float32)
    everything = extract(runner, image, _single_level(nfeatures=0))
    assert len(everything) == 14 * 14
    best = extract(runner, image, _single_level(nfeatures=10))
    np.testing.assert_array_equal(best.xy, everything.xy[:10])
    assert np.all(np.diff(best.scores) <= 0)
    mask = np.zeros((40, 40), np.uint8)
    mask[:, 20:] = 1
    masked = extract(runner, image, _single_level(nfeatures=10), mask=mask)
    assert len(masked) == 10 and masked.xy[:, 0].min() >= 20


def test_tiled_detection_equals_untiled():
    rng = np.random.default_rng(1)
    # Few distinct values: many equal scores, which rank in row-major order, tiled or not.
    rep = rng.uniform(0, 1, (90, 130)).round(1).astype(np.float32)
    runner = MapRunner(rep, np.ones_like(rep))
    image = np.zeros((3, 90, 130), np.float32)
    whole = extract(runner, image, _single_level(nfeatures=200), tile_size=0)
    tiled = extract(runner, image, _single_level(nfeatures=200), tile_size=64)
    assert len(np.unique(whole.scores)) < len(whole) // 10
    np.testing.assert_array_equal(whole.xy, tiled.xy)
    np.testing.assert_array_equal(whole.descriptors, tiled.descriptors)
    xy = rng.uniform(0, 89, (50, 2)).astype(np.float32)
    d_whole, _ = describe(runner, image, xy, np.full(50, 32.0), _single_level(), tile_size=0)
    d_tiled, _ = describe(runner, image, xy, np.full(50, 32.0), _single_level(), tile_size=64)
    np.testing.assert_allclose(d_whole, d_tiled, atol=1e-6)


def test_describe_drops_points_outside_the_image():
    runner = MapRunner(np.zeros((8, 8)), np.zeros((8, 8)))
    xy = np.array([[1, 2], [-1, 3], [7.5, 7.9], [8, 0], [np.nan, 1]], np.float32)
    descriptors, kept = describe(runner, np.zeros((3, 8, 8), np.float32), xy,
                                 np.full(5, 32.0), _single_level())
    assert kept.tolist() == [0, 2]
    np.testing.assert_allclose(descriptors[0], np.array([2, 3]) / np.hypot(2, 3), rtol=1e-6)


def test_peak_offsets_recover_a_parabola_vertex():
    yy, xx = np.mgrid[0:9, 0:11].astype(np.float32)
    values = 1 - 0.05 * ((xx - 5.3) ** 2 + (yy - 3.8) ** 2)
    dy, dx = peak_offsets(values, np.array([4, 0]), np.array([5, 5]))
    np.testing.assert_allclose([dy[0], dx[0]], [-0.2, 0.3], atol=1e-5)
    assert dy[1] == 0  # on the border: no neighbour on one side, no refinement
    flat = np.ones((3, 3), np.float32)
    assert peak_offsets(flat, np.array([1]), np.array([1])) == (0, 0)


def test_close_pairs_are_all_pairs_within_the_radius():
    rng = np.random.default_rng(2)
    xy = rng.uniform(0, 60, (400, 2)).astype(np.float32)
    xy[:100] = xy[:100].round()  # exact distances on the radius, and repeated points
    xy[100:110] = xy[0]
    for radius in (0.5, 2.0, 7.5):
        i, j = close_pairs(xy, radius)
        distances = np.linalg.norm(xy[:, None].astype(np.float64) - xy[None], axis=2)
        expected = set(zip(*np.nonzero(np.triu(distances <= radius, 1))))
        assert len(i) == len(expected) and set(zip(i.tolist(), j.tolist())) == expected
    assert [len(a) for a in close_pairs(xy[:1], 1.0)] == [0, 0]


def test_unique_across_levels_is_greedy_over_levels():
    xy = np.array([[0, 0], [1.5, 0], [3, 0], [0, 1], [10, 10]], np.float32)
    octaves = np.array([0, 1, 0, 0, 2])
    # 1 is within 2 px of 0 (another level, better): dropped; 2 is within 2 px of 1
    # only, which is dropped, so 2 stays; 3 shares 0's level and stays.
    assert unique_across_levels(xy, octaves, 2.0).tolist() == [True, False, True, True, True]
    assert unique_across_levels(xy, octaves, 0.5).all()


class PyramidRunner:
    """A backend whose network returns the image's first channel as repeatability, on
    every level: a blob is then found again on several levels."""

    descriptor_size = 2
    halo = 0  # each map pixel depends on its own input pixel only

    def prepare(self, image):
        return image[0]

    def resize(self, image, height, width):
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)

    def output_size(self, height, width):
        return height, width

    def run(self, image, box=None):
        y0, y1, x0, x1 = box or (0, image.shape[0], 0, image.shape[1])

        class Output:
            repeatability = np.ascontiguousarray(image[y0:y1, x0:x1])
            reliability = np.ones_like(repeatability)

            @staticmethod
            def descriptors_at(x, y):
                d = np.stack([x + x0 + 1, y + y0 + 1], axis=1).astype(np.float32)
                return d / np.linalg.norm(d, axis=1, keepdims=True)

        return Output()


def test_unique_radius_is_exact_and_independent_of_tiles():
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:150, 0:200].astype(np.float32)
    blobs = np.zeros((150, 200), np.float32)
    for (cx, cy), sigma in zip(rng.uniform(0, 200, (60, 2)), rng.uniform(2, 6, 60)):
        blobs += np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma**2))
    # Coarse values: many equal scores, whose order must not depend on tiling either.
    blobs = (blobs / blobs.max()).round(2)
    image = np.repeat(blobs[None], 3, axis=0)
    runner = PyramidRunner()

    def run(**kwargs):
        params = dict(min_size=0, max_size=9999, min_scale=0.3, repeatability_thr=0.2,
                      reliability_thr=0.5, nfeatures=60)
        params.update(kwargs.pop("params", {}))
        return extract(runner, image, ExtractionParams(**params), **kwargs)

    radius = 3.0
    everything = run(params=dict(nfeatures=0), tile_size=0)
    i, j = close_pairs(everything.xy, radius)
    assert (everything.octaves[i] != everything.octaves[j]).sum() > 20  # duplicates exist
    expected = np.flatnonzero(unique_across_levels(everything.xy, everything.octaves, radius))[:60]
    for subpixel in (False, True, "descriptor"):
        whole = run(params=dict(unique_radius=radius), tile_size=0, subpixel=subpixel)
        tiled = run(params=dict(unique_radius=radius), tile_size=64, subpixel=subpixel)
        for name in ("xy", "scores", "octaves", "descriptors"):
            np.testing.assert_array_equal(getattr(whole, name), getattr(tiled, name))
        i, j = close_pairs(whole.xy, radius)
        assert not (whole.octaves[i] != whole.octaves[j]).any()
    whole = run(params=dict(unique_radius=radius), tile_size=0)
    np.testing.assert_array_equal(whole.xy, everything.xy[expected])
    np.testing.assert_array_equal(whole.scores, everything.scores[expected])


def test_descriptor_shift_moves_towards_the_centre_of_similar_descriptors():
    class Field:
        """Descriptors constant on x <= 10, turning fast beyond: a plateau to the left."""

        @staticmethod
        def descriptors_at(x, y):
            angle = np.maximum(x - 10, 0) * 0.5
            d = np.stack([np.cos(angle), np.sin(angle), 0 * y], axis=1).astype(np.float32)
            return d / np.linalg.norm(d, axis=1, keepdims=True)

    x, y = descriptor_shift(Field(), np.array([10.0, 4.0], np.float32),
                            np.array([5.0, 5.0], np.float32), (30, 30), origin=(0, 0))
    assert -1.0 <= x[0] - 10 < -0.2  # left, into the plateau, within the reach
    assert x[1] == 4.0 and (y == 5.0).all()  # inside the plateau nothing pulls
    # The same in a window's coordinates.
    class Window(Field):
        @staticmethod
        def descriptors_at(x, y):
            return Field.descriptors_at(x + 3, y + 2)

    shifted, _ = descriptor_shift(Window(), np.array([10.0], np.float32),
                                  np.array([5.0], np.float32), (30, 30), origin=(3, 2))
    assert shifted[0] == x[0]


def test_descriptor_shift_stays_within_the_map():
    """Beyond the map's outermost samples bilinear sampling repeats the border, which
    pulls a border keypoint outwards (out of the image, as on photos larger than
    max_size): the shift stops at the outermost samples."""
    class Field:
        """Descriptors constant on x >= 9 and y >= 9, turning fast before."""

        @staticmethod
        def descriptors_at(x, y):
            angle = (np.maximum(9 - x, 0) + np.maximum(9 - y, 0)) * 0.5
            d = np.stack([np.cos(angle), np.sin(angle), 0 * y], axis=1).astype(np.float32)
            return d / np.linalg.norm(d, axis=1, keepdims=True)

    start = np.array([9.0], np.float32)
    x, y = descriptor_shift(Field(), start, start, (30, 30))
    assert x[0] > 9.2 and y[0] > 9.2  # a large map: right and down, into the plateau
    x, y = descriptor_shift(Field(), start, start, (10, 10))
    assert x[0] == 9 and y[0] == 9  # a 10 x 10 map: held at its last samples
    x, y = descriptor_shift(Field(), start, start, (10, 30))
    assert x[0] == 9 and y[0] > 9.2


def test_refined_matches_stay_inside_the_image():
    """The soft-argmax of refine_matches stops at the map's outermost samples: a partner
    descriptor that fits best beyond the left border leaves the keypoint at x = 0."""
    rep = np.zeros((6, 7), np.float32)
    runner = MapRunner(rep, rep)  # descriptors point along (x + 1, y + 1): (0, 1) fits x = -1
    xy = np.array([[0.2, 3.0], [5.0, 3.0]], np.float32)
    refined = refine_matches(runner, np.zeros((3, 6, 7), np.float32), xy, np.full(2, 32, np.float32),
                             np.array([[0, 1], [0, 1]], np.float32), _single_level())
    assert refined[0, 0] == 0 and refined[1, 0] < 4.5  # the second moves left, inside
    assert 0 <= refined[:, 1].min() and refined[:, 1].max() < 6
