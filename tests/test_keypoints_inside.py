"""Every extraction mode returns keypoints inside the image, 0 <= x < W and 0 <= y < H.

The descriptor mean-shift (``subpixel="descriptor"``) once moved border keypoints past the
outermost samples of their level's map, and so out of the image on levels smaller than it
(photos larger than ``max_size``): y = -0.86 on a 3072 x 2048 photo, which then stopped a
whole SfM refinement. Here every level is downscaled (small ``max_size``), keypoints
come within a level pixel of every border, and tiny images are all border.
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import read_image, weights_dir

from cv2r2d2.params import inside_image

MODES = (False, True, "descriptor")


@pytest.fixture(scope="module")
def small_levels():
    """The paper's settings but levels of at most 128 px (from 16 px): on the photo below
    every level is downscaled, as on photos larger than the default 1024."""
    weights_dir()
    import cv2r2d2

    return cv2r2d2.R2D2Feature.create(device="cpu", min_size=16, max_size=128, nfeatures=0)


def _detect(feature, image: np.ndarray, mode):
    feature.setSubpixel(mode)
    return feature.detectFeatures(image)


@pytest.mark.slow  # a full-size photo in every mode
def test_every_mode_keeps_keypoints_inside_a_photo_larger_than_max_size(small_levels):
    """A 384 x 288 photo, levels of at most 128 px: 3 image pixels per pixel of the
    finest level, as a 3072 x 2048 photo has at the default max_size of 1024. Keypoints
    come within one level pixel of each of the four borders, in every mode, and none
    lies outside (before the fix, 12 of the descriptor mode's 269 did)."""
    photo = cv2.resize(read_image("monstree/IMG_1025.JPG"), (288, 384), interpolation=cv2.INTER_AREA)
    height, width = photo.shape[:2]
    for mode in MODES:
        features = _detect(small_levels, photo, mode)
        assert len(features) > 100
        outside = ~inside_image(features.xy, height, width)
        assert not outside.any(), (mode, features.xy[outside][:5])
        pixel = features.sizes / 32  # image pixels per pixel of each keypoint's level
        x, y = features.xy.T
        near = [(x < pixel).sum(), (y < pixel).sum(),  # left, top, right, bottom
                (x > width - 1 - pixel).sum(), (y > height - 1 - pixel).sum()]
        assert min(near) > 0, (mode, near)


def test_every_mode_keeps_keypoints_inside_tiny_images(small_levels, boat):
    """Images of a few pixels, where every keypoint is at a border: one level up to
    16 px, more from there (16 x 24: 3 of the descriptor mode's 9 were outside)."""
    found = 0
    for height, width in ((2, 2), (5, 3), (9, 9), (16, 24), (24, 16)):
        image = np.ascontiguousarray(boat[200:200 + height, 220:220 + width])
        for mode in MODES:
            features = _detect(small_levels, image, mode)
            found += len(features)
            outside = ~inside_image(features.xy, height, width)
            assert not outside.any(), (mode, (height, width), features.xy[outside][:5])
    assert found > 0
