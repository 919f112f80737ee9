"""draw_heatmap: R2D2's dense maps as colour heatmaps over the photo."""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest

import cv2r2d2
from conftest import ROOT
from cv2r2d2.visualize import draw_heatmap

BLOBS = ((60, 50), (180, 70), (100, 140), (200, 150))  # (x, y) centres, radius 8 px
NEAR = 20  # px: R2D2 fires on a ring 10-15 px around a blob of radius 8, not at its centre


@pytest.fixture(scope="module")
def blobs() -> np.ndarray:
    """Four bright discs on a flat grey 256 x 192 background, slightly blurred."""
    image = np.full((192, 256), 100, np.uint8)
    for centre in BLOBS:
        cv2.circle(image, centre, 8, 230, -1, cv2.LINE_AA)
    return cv2.GaussianBlur(image, (0, 0), 1.5)


@pytest.fixture(scope="module")
def blob_maps(r2d2, blobs) -> dict:
    return r2d2.computeDenseMaps(blobs)


def _distance_to_blobs(shape) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    return np.min([np.hypot(x - cx, y - cy) for cx, cy in BLOBS], axis=0)


def _heat(drawn: np.ndarray, colormap: int = cv2.COLORMAP_TURBO) -> np.ndarray:
    """The colour map index (0..255) of each pixel of a heatmap drawn with alpha=1."""
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], colormap)[:, 0]
    errors = np.abs(drawn[:, :, None, :].astype(np.int16) - lut[None, None].astype(np.int16))
    return errors.sum(-1).argmin(-1)


def test_blob_heatmap_is_hottest_at_the_blobs(blobs, blob_maps):
    heat = _heat(draw_heatmap(blobs, blob_maps, "score", alpha=1.0))
    distance = _distance_to_blobs(blobs.shape)
    hottest = heat >= np.quantile(heat, 0.99)
    assert (distance[hottest] <= NEAR).mean() > 0.9
    assert np.median(heat[distance > 30]) < 30  # the flat background is cold
    repeatability = blob_maps["repeatability"]
    for cx, cy in BLOBS:  # every blob is hot
        around = (slice(cy - NEAR, cy + NEAR + 1), slice(cx - NEAR, cx + NEAR + 1))
        assert heat[around].max() > 240
        # Repeatability peaks on a ring around the blob, not at its centre.
        assert repeatability[around].max() > 0.95 and repeatability[cy, cx] < 0.5


def test_keypoints_sit_at_the_blobs(r2d2, blobs):
    xy = cv2.KeyPoint_convert(r2d2.detect(blobs))
    nearest = np.argmin([np.hypot(*(xy - centre).T) for centre in BLOBS], axis=0)
    distance = np.hypot(*(xy - np.array(BLOBS)[nearest]).T)
    assert distance.max() <= NEAR and sorted(set(nearest)) == [0, 1, 2, 3]


def test_keypoints_are_drawn_as_circles_of_their_size():
    image = np.zeros((64, 80), np.uint8)
    maps = {"repeatability": np.zeros((64, 80), np.float32), "reliability": np.zeros((64, 80))}
    keypoint = cv2.KeyPoint(30.25, 20.5, 24)
    out = draw_heatmap(image, maps, keypoints=[keypoint], alpha=0.0)
    y, x = np.nonzero(out.max(axis=2) > 64)
    radii = np.hypot(x - 30.25, y - 20.5)
    assert len(radii) > 60 and np.abs(radii - 12).max() <= 1.0
    assert not draw_heatmap(image, maps, keypoints=(), alpha=0.0).any()


def test_output_image_geometry_and_blending(tmp_path):
    image = np.full((100, 128, 3), 128, np.uint8)  # maps at half scale, as scale=0.5 gives
    repeatability = np.zeros((50, 64), np.float32)
    repeatability[10, 40] = 1.0
    maps = {"repeatability": repeatability, "reliability": np.full((50, 64), 0.5, np.float32)}
    lut = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_TURBO)[:, 0]
    out = draw_heatmap(image, maps, "repeatability", alpha=1.0)
    assert out.shape == (100, 128, 3) and out.dtype == np.uint8
    # Level pixel (40, 10) is centred on image pixel (80.5, 20.5), as keypoints are:
    # bilinear weights 0.75 x 0.75 at image pixels 80..81 x 20..21, 0.25 x 0.75 beside.
    heat = _heat(out)
    assert (heat[20:22, 80:82] == round(0.5625 * 255)).all()
    assert heat[20, 79] == heat[20, 82] == heat[19, 81] == round(0.1875 * 255)
    assert heat[50, 20] == 0
    np.testing.assert_array_equal(out[50, 20], lut[0])
    score = draw_heatmap(image, maps, "score", alpha=1.0)
    np.testing.assert_array_equal(score[90, 120], lut[0])
    reliability = draw_heatmap(image, maps, "reliability", alpha=1.0)
    np.testing.assert_array_equal(reliability[50, 20], lut[128])  # round(0.5 * 255)
    half = draw_heatmap(image, maps, "reliability", alpha=0.5)
    np.testing.assert_allclose(half[50, 20], (lut[128].astype(int) + 128) / 2, atol=1)
    np.testing.assert_array_equal(draw_heatmap(image, maps, "reliability", alpha=0.0), image)
    assert cv2.imwrite(str(tmp_path / "heat.png"), out)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "heat.png")), out)
    # Grey, BGRA and float images give the same picture as BGR uint8.
    np.testing.assert_array_equal(draw_heatmap(image[:, :, 0], maps), draw_heatmap(image, maps))
    np.testing.assert_array_equal(draw_heatmap(image / 255.0, maps), draw_heatmap(image, maps))


def test_bad_inputs_are_named():
    image = np.zeros((64, 80, 3), np.uint8)
    good = np.zeros((32, 40), np.float32)
    maps = {"repeatability": good, "reliability": good}
    with pytest.raises(ValueError, match="which must be one of repeatability, reliability, score"):
        draw_heatmap(image, maps, "peakiness")
    with pytest.raises(ValueError, match="image is None"):
        draw_heatmap(None, maps)
    with pytest.raises(TypeError, match="image must be a numpy array"):
        draw_heatmap("photo.png", maps)
    with pytest.raises(TypeError, match="dense_maps must be"):
        draw_heatmap(image, good)
    with pytest.raises(ValueError, match="no 'reliability' map"):
        draw_heatmap(image, {"repeatability": good}, "score")
    for bad, error, message in (
        (good.astype(np.uint8), TypeError, "must be float"),
        (good[None], ValueError, "h x w map"),
        (np.zeros((40, 32), np.float32), ValueError, "aspect ratio"),
        (good + 2, ValueError, r"\[0, 1\]"),
        (good * np.nan, ValueError, "finite"),
        ([[0.0]], TypeError, "numpy array"),
    ):
        with pytest.raises(error, match=message):
            draw_heatmap(image, {"repeatability": bad, "reliability": good}, "repeatability")
    with pytest.raises(ValueError, match="differ in shape"):
        draw_heatmap(image, {"repeatability": good, "reliability": np.zeros((64, 80))}, "score")
    with pytest.raises(TypeError, match=r"keypoints\[1\] must be a cv2.KeyPoint"):
        draw_heatmap(image, maps, keypoints=[cv2.KeyPoint(1, 2, 8), (3, 4)])
    with pytest.raises(ValueError, match="alpha"):
        draw_heatmap(image, maps, alpha=1.5)


def test_draw_heatmap_is_exported_without_torch():
    assert cv2r2d2.draw_heatmap is draw_heatmap and "draw_heatmap" in cv2r2d2.__all__
    done = subprocess.run(
        [sys.executable, "-c", "import sys, cv2r2d2; cv2r2d2.draw_heatmap; "
                               "sys.exit('torch' in sys.modules)"],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
