"""Heatmaps of R2D2's dense maps over the photo, to see where and why keypoints land.

:func:`draw_heatmap` colours one map of :meth:`R2D2Feature.computeDenseMaps` (values in
[0, 1], mapped as they are, so that heatmaps of different images and models compare),
resizes it to the image and blends it over a grey copy of the photo; keypoints may be
drawn on top.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import cv2
import numpy as np

from .checks import check_keypoints
from .image import to_rgb01

__all__ = ["HEATMAPS", "DEFAULT_HEATMAP", "draw_heatmap"]

# Keypoints are the repeatability maxima that pass both maps' thresholds, ranked by
# "score", the product of the two: the map that shows where keypoints land.
HEATMAPS = ("repeatability", "reliability", "score")
DEFAULT_HEATMAP = "score"
"""The map drawn unless another is asked for."""
KEYPOINT_COLOR = (255, 255, 255)  # BGR
SHIFT = 4  # cv2.circle's fractional bits: keypoints drawn to 1/16 px


def _check_map(dense_maps: Mapping[str, Any], name: str, image_shape: Sequence[int]) -> np.ndarray:
    if name not in dense_maps:
        keys = ", ".join(map(str, dense_maps))
        raise ValueError(f"dense_maps has no {name!r} map (keys: {keys})")
    values = dense_maps[name]
    if not isinstance(values, np.ndarray):
        raise TypeError(f"dense_maps[{name!r}] must be a numpy array, got {type(values).__name__}")
    if not np.issubdtype(values.dtype, np.floating):
        raise TypeError(f"dense_maps[{name!r}] must be float, got {values.dtype}")
    if values.ndim != 2 or min(values.shape) < 1:
        raise ValueError(f"dense_maps[{name!r}] must be an h x w map, got shape {values.shape}")
    height, width = image_shape[:2]
    h, w = values.shape
    # Maps of the image at scale s are round(s H) x round(s W): their aspect ratios
    # differ by the rounding alone, |w H - h W| <= (H + W) / 2.
    if abs(w * height - h * width) > (height + width) / 2:
        raise ValueError(
            f"dense_maps[{name!r}] is {h}x{w}, not the {height}x{width} image's aspect "
            "ratio: compute the maps on this image"
        )
    if not np.isfinite(values).all() or values.min() < 0 or values.max() > 1:
        raise ValueError(f"dense_maps[{name!r}] values must be finite and lie in [0, 1]")
    return values.astype(np.float32, copy=False)


def draw_heatmap(
    image: np.ndarray,
    dense_maps: Mapping[str, np.ndarray],
    which: str = DEFAULT_HEATMAP,
    keypoints: Optional[Sequence[cv2.KeyPoint]] = None,
    colormap: int = cv2.COLORMAP_TURBO,
    alpha: float = 0.5,
) -> np.ndarray:
    """One dense map as a colour heatmap over the image.

    Args:
        image: the image the maps were computed on, any OpenCV image (H, W[, C]).
        dense_maps: :meth:`R2D2Feature.computeDenseMaps`'s dict: ``repeatability`` and
            ``reliability`` (h, w) float in [0, 1], at any scale of the image.
        which: ``"repeatability"``, ``"reliability"`` or ``"score"`` (their product).
        keypoints: ``cv2.KeyPoint`` in image pixels, drawn as circles of diameter
            ``kp.size`` (None: none).
        colormap: an OpenCV colour map (``cv2.COLORMAP_*``); 0 to 1 spans all of it.
        alpha: weight of the colours, in [0, 1]; the photo has ``1 - alpha``.

    Returns:
        (H, W, 3) uint8 BGR image, for ``cv2.imwrite`` or ``cv2.imshow``.
    """
    if which not in HEATMAPS:
        raise ValueError(f"which must be one of {', '.join(HEATMAPS)}, got {which!r}")
    if not isinstance(dense_maps, Mapping):
        raise TypeError(
            f"dense_maps must be computeDenseMaps' dict, got {type(dense_maps).__name__}")
    if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    # A grey photo, so that its own colours are not read as heat.
    grey = cv2.cvtColor(to_rgb01(image), cv2.COLOR_RGB2GRAY)
    photo = cv2.cvtColor(np.round(grey * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    names = ("repeatability", "reliability") if which == "score" else (which,)
    maps = [_check_map(dense_maps, name, photo.shape) for name in names]
    if len({m.shape for m in maps}) > 1:
        raise ValueError(f"the repeatability and reliability maps differ in shape: "
                         f"{maps[0].shape} and {maps[1].shape}")
    values = np.prod(maps, axis=0)
    height, width = photo.shape[:2]
    # cv2.resize keeps the pixel centres consistent, (x + 0.5) W / w - 0.5, as the
    # keypoint coordinates of the pyramid levels do.
    values = cv2.resize(values, (width, height), interpolation=cv2.INTER_LINEAR)
    heat = cv2.applyColorMap(np.round(values * 255).astype(np.uint8), colormap)
    out = cv2.addWeighted(heat, alpha, photo, 1 - alpha, 0)
    if keypoints is not None:
        for kp in check_keypoints(keypoints):
            center = tuple(int(round(c * 2**SHIFT)) for c in kp.pt)
            radius = int(round(max(kp.size / 2, 1) * 2**SHIFT))
            cv2.circle(out, center, radius, KEYPOINT_COLOR, 1, cv2.LINE_AA, SHIFT)
    return out
