"""What an extraction takes and gives: :class:`ExtractionParams` and :class:`Features`,
with :func:`inside_image`, the range every extraction's positions lie in."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

__all__ = ["ExtractionParams", "Features", "inside_image"]


@dataclass
class ExtractionParams:
    """Multi-scale extraction parameters; the defaults are the paper's.

    Attributes:
        scale_f: ratio between consecutive pyramid scales (> 1).
        min_size: the pyramid spans levels whose longer side lies in
            [min_size, max_size] pixels.
        max_size: see ``min_size``.
        min_scale: and whose scale lies in [min_scale, max_scale].
        max_scale: see ``min_scale`` (max_scale <= 1: images are never upscaled).
        reliability_thr: a keypoint's minimum reliability, in [0, 1].
        repeatability_thr: a keypoint's minimum repeatability, in [0, 1].
        nfeatures: the number of best-scoring keypoints kept (0 keeps all).
        unique_radius: image pixels; when > 0, of keypoints from different levels
            within this distance of each other only the best-scoring one is kept
            (before the top ``nfeatures``). 0, the paper's: no such suppression.
    """

    scale_f: float = 2**0.25
    min_size: int = 256
    max_size: int = 1024
    min_scale: float = 0.0
    max_scale: float = 1.0
    reliability_thr: float = 0.7
    repeatability_thr: float = 0.7
    nfeatures: int = 5000
    unique_radius: float = 0.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming any parameter out of range."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{f.name} must be finite, got {value!r}")
        if self.scale_f <= 1.0:
            raise ValueError(f"scale_f must be > 1, got {self.scale_f!r}")
        if self.min_size < 0 or self.max_size <= 0:
            raise ValueError(
                f"min_size must be >= 0 and max_size > 0, got {self.min_size!r}, {self.max_size!r}"
            )
        if not 0.0 <= self.min_scale <= self.max_scale <= 1.0:
            raise ValueError(
                "expected 0 <= min_scale <= max_scale <= 1, got "
                f"min_scale={self.min_scale!r}, max_scale={self.max_scale!r}"
            )
        for name in ("reliability_thr", "repeatability_thr"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)!r}")
        if int(self.nfeatures) != self.nfeatures or self.nfeatures < 0:
            raise ValueError(f"nfeatures must be an integer >= 0, got {self.nfeatures!r}")
        if self.unique_radius < 0:
            raise ValueError(f"unique_radius must be >= 0 pixels, got {self.unique_radius!r}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Features:
    """Keypoints of one image, sorted by decreasing score.

    Attributes:
        xy: (N, 2) float32 positions in original-image pixels. With ``subpixel``: the
            refined peak, pixel centres consistent between level and image, (x + 0.5)
            W / w - 0.5 (OpenCV's convention). Otherwise the reference's x W / w, which
            is that convention on the scale-1 level only; on a level w < W pixels wide
            it lies 0.5 (W / w - 1) px up and left of the level pixel's centre. Every
            mode keeps 0 <= x < W and 0 <= y < H: positions stay within the level
            map's outermost samples, which map inside the image as W / w >= 1.
        sizes: (N,) float32 patch diameters in pixels (32 / scale).
        scores: (N,) float32 reliability x repeatability.
        octaves: (N,) int32 pyramid level indices (scale = scale_f ** -octave).
        descriptors: (N, dim) float32, L2-normalised.
    """

    xy: np.ndarray
    sizes: np.ndarray
    scores: np.ndarray
    octaves: np.ndarray
    descriptors: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def inside_image(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N,) bool: which of the (N, 2) positions (x, y) are finite and inside a height x
    width image, 0 <= x < width and 0 <= y < height (the range every extraction mode
    returns)."""
    return (
        np.isfinite(xy).all(axis=1)
        & (xy[:, 0] >= 0) & (xy[:, 0] < width)
        & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    )
