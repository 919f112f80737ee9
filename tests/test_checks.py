"""The argument checks: what they accept, what they return, and their errors."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cv2r2d2.checks import (
    check_count, check_descriptors, check_flag, check_mask, check_matches, check_positions,
    check_radius,
)


def test_masks():
    assert check_mask(None, (4, 5)) is None
    assert check_mask(np.ones((4, 5, 1), np.uint8), (4, 5)).shape == (4, 5)
    with pytest.raises(TypeError, match="uint8"):
        check_mask(np.ones((4, 5), bool), (4, 5))
    with pytest.raises(ValueError, match=r"\(4, 5\)"):
        check_mask(np.ones((5, 4), np.uint8), (4, 5))
    with pytest.raises(TypeError, match="numpy array"):
        check_mask([[1]], (1, 1))


def test_descriptors_for_each_norm():
    binary = np.zeros((3, 32), np.uint8)
    assert check_descriptors(binary, norm=cv2.NORM_HAMMING) is binary
    doubles = np.ones((3, 4))
    assert check_descriptors(doubles).dtype == np.float32
    with pytest.raises(TypeError, match="float32"):
        check_descriptors(doubles, size=4, allow_float64=False)
    with pytest.raises(ValueError, match="N x 128"):
        check_descriptors(np.ones((3, 4), np.float32), size=128)
    with pytest.raises(ValueError, match="NaN"):
        check_descriptors(np.full((1, 4), np.nan, np.float32), "d1")
    with pytest.raises(TypeError, match="d1 must be uint8 for NORM_HAMMING"):
        check_descriptors(doubles, "d1", cv2.NORM_HAMMING)
    with pytest.raises(TypeError, match="numpy array"):
        check_descriptors([[1.0]])


def test_counts_flags_radii_positions_and_matches():
    assert check_count(np.int64(3), "k") == 3
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            check_count(bad, "k")
    assert check_flag(np.bool_(True), "half") is True
    with pytest.raises(TypeError, match="half must be True or False"):
        check_flag(1, "half")
    assert check_radius(0) == 0.0
    with pytest.raises(ValueError, match="finite"):
        check_radius(float("inf"))
    keypoints = [cv2.KeyPoint(1, 2, 8), cv2.KeyPoint(3, 4, 8)]
    assert check_positions(keypoints, 2, "kp").tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="2 keypoints for 3 descriptors"):
        check_positions(keypoints, 3, "kp")
    assert check_matches([cv2.DMatch(0, 1, 0.5)]).tolist() == [[0, 1]]
    with pytest.raises(TypeError, match="M x 2 integer array"):
        check_matches(np.zeros((2, 3), np.int64))
