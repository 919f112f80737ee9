"""OpenCV images -> normalised network input, and input validation."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cv2r2d2.image import IMAGENET_MEAN, IMAGENET_STD, normalize_image, to_rgb01
from conftest import image_path


def test_bgr_uint8_becomes_normalised_rgb():
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0] = 255  # blue
    out = normalize_image(image)
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    expected = (np.array([0, 0, 1], np.float32) - IMAGENET_MEAN) / IMAGENET_STD
    np.testing.assert_array_equal(out[:, 0, 0], expected)


def test_grey_bgra_uint16_float_forms_agree():
    bgr = cv2.imread(str(image_path("peppers.png")))
    grey = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    reference = to_rgb01(bgr)
    bgra = cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA)
    bgra[..., 3] = 7  # alpha is ignored, not blended
    np.testing.assert_array_equal(to_rgb01(bgra), reference)
    np.testing.assert_allclose(to_rgb01(bgr.astype(np.uint16) * 257), reference, atol=1e-6)
    np.testing.assert_allclose(to_rgb01(bgr.astype(np.float64) / 255), reference, atol=1e-6)
    rgb_grey = to_rgb01(grey)
    np.testing.assert_array_equal(rgb_grey, to_rgb01(grey[..., None]))
    assert np.all(rgb_grey[..., 0] == rgb_grey[..., 2])


def test_imread_of_grey_and_rgba_png_matches_pil_convention():
    # boat.png is 8-bit grey and test.png RGBA: cv2.imread gives 3 channels.
    for name in ("boat.png", "test.png"):
        assert cv2.imread(str(image_path(name))).shape[2] == 3


@pytest.mark.parametrize(
    "image,error,message",
    [
        (None, ValueError, "None.*imread"),
        ([[1, 2], [3, 4]], TypeError, "numpy array"),
        (np.zeros((0, 5, 3), np.uint8), ValueError, "empty"),
        (np.zeros((4, 4, 2), np.uint8), ValueError, "shape"),
        (np.zeros((4, 4, 3, 1), np.uint8), ValueError, "shape"),
        (np.zeros((4, 4), np.int32), TypeError, "dtype"),
        (np.zeros((4, 4), bool), TypeError, "dtype"),
        (np.full((4, 4), np.nan, np.float32), ValueError, "NaN"),
        (np.full((4, 4), np.inf, np.float64), ValueError, "NaN or infinite"),
        (np.full((4, 4), 255.0, np.float32), ValueError, r"\[0, 1\]"),
        (np.full((4, 4), -0.1, np.float32), ValueError, r"\[0, 1\]"),
    ],
)
def test_bad_images_are_refused(image, error, message):
    with pytest.raises(error, match=message):
        normalize_image(image)
