"""Steerers: the R2D2 descriptors of a rotated image, computed from the unrotated ones.

R2D2 is not rotation invariant. A *steerer* (Bökman, Edstedt, Felsberg, Kahl, "Steerers:
A Framework for Rotation Equivariant Keypoint Descriptors", CVPR 2024) is, for an angle
a, an orthogonal D x D matrix S_a such that the descriptor the network computes at a
point of the image rotated by a is close to S_a times the descriptor at the same point
of the unrotated image. The steerer of -a is the transpose of that of a, so only angles
in (0, 180] are fitted (:func:`fitted_angle`).

This module holds the fitted matrices of one model (:class:`Steerers`), the steering
angles and the steering itself (:meth:`Steerers.steer`).
They are fitted post hoc on procedural images by :mod:`cv2r2d2.steerer_fitting`, and
cached per model file by :mod:`cv2r2d2.steerer_cache` (its ``load_steerers`` is what
``R2D2Feature.getSteerers`` calls).

Angles are in degrees, counter-clockwise in the displayed image as
``cv2.getRotationMatrix2D`` counts them (90: ``cv2.ROTATE_90_COUNTERCLOCKWISE``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Tuple

import numpy as np

from .checks import check_descriptors

__all__ = [
    "DEFAULT_ROTATIONS",
    "Steerers",
    "rotation_angles",
    "check_angle",
    "fitted_angle",
    "as_steerers",
]

# The default steering set: every 360 / 24 = 15 degrees. 30-degree steps dip to MMA@3
# 0.79 midway between two angles (benchmarks/bench_steered_ratio.py).
DEFAULT_ROTATIONS = 24


# --- angles ---------------------------------------------------------------------


def rotation_angles(rotations: int) -> Tuple[int, ...]:
    """The steering angles of ``rotations`` equal steps, k * 360 / rotations degrees.

    Raises:
        ValueError: ``rotations`` is not a positive divisor of 360.
    """
    if isinstance(rotations, bool) or not isinstance(rotations, (int, np.integer)) \
            or rotations < 1 or 360 % rotations:
        raise ValueError(f"rotations must be a positive divisor of 360 (1, 2, 3, 4, 6, 8, 12, "
                         f"..., 360), got {rotations!r}")
    return tuple(k * 360 // int(rotations) for k in range(int(rotations)))


def check_angle(angle: Any, name: str = "angle") -> int:
    """A steering angle as an integer in [0, 360): any whole number of degrees.

    Raises:
        TypeError: not a real number. ValueError: not finite or not whole degrees.
    """
    if isinstance(angle, bool) or not isinstance(angle, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number of degrees, got {type(angle).__name__}")
    if not math.isfinite(angle) or angle != round(angle):
        raise ValueError(f"{name} must be a whole number of degrees (the steering set; e.g. "
                         f"30, 90, -45), got {angle!r}")
    return int(round(angle)) % 360


def fitted_angle(angle: float) -> float:
    """The fitted angle whose steerer (or its transpose) gives ``angle`` degrees, in
    (0, 180] (0 for 0, which needs no steerer), rounded to 1e-6 degrees to compare."""
    return _key(_canonical(angle))


def _canonical(angle: float) -> float:
    angle = float(angle) % 360
    return angle if angle <= 180 else 360 - angle


def _key(angle: float) -> float:
    return round(float(angle) % 360, 6)


# --- the matrices ---------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Steerers:
    """The fitted steerers of one model.

    Attributes:
        angles: (K,) fitted angles in (0, 180], degrees; the steerer of 360 - a is the
            transpose of that of a, the steerer of 0 the identity.
        matrices: (K, D, D) float32 orthogonal matrices, S_a for each angle.
        cosines: (K, 2) mean cosine of corresponding fitting descriptors, before and
            after steering (how well each steerer fits).
        sha256: of the model file they were fitted for ("" when unknown).
        settings: how they were fitted
            (:class:`~cv2r2d2.steerer_fitting.FitSettings` as a dict).
    """

    angles: Tuple[float, ...]
    matrices: np.ndarray
    cosines: np.ndarray
    sha256: str = ""
    settings: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        k = len(self.angles)
        if self.matrices.ndim != 3 or self.matrices.shape[0] != k or self.matrices.shape[1] < 1 \
                or self.matrices.shape[1] != self.matrices.shape[2] or self.cosines.shape != (k, 2):
            raise ValueError(f"inconsistent steerers: {k} angles, matrices "
                             f"{self.matrices.shape}, cosines {self.cosines.shape}")

    @property
    def descriptor_size(self) -> int:
        """D, the descriptors' length."""
        return int(self.matrices.shape[1])

    def available(self) -> List[float]:
        """Every angle in [0, 360) this object steers by, sorted."""
        angles = {0.0} | {_key(a) for a in self.angles} | {_key(360 - a) for a in self.angles}
        return sorted(angles)

    def has(self, angles: Iterable[float]) -> bool:
        """Whether every one of ``angles`` (degrees) can be steered by."""
        fitted = {_key(a) for a in self.angles}
        return all(_key(a) == 0 or fitted_angle(a) in fitted for a in angles)

    def matrix(self, angle: float) -> np.ndarray:
        """(D, D) float32 S_angle (the identity for 0).

        Raises:
            ValueError: no steerer was fitted for ``angle``.
        """
        if _key(angle) == 0:
            return np.eye(self.descriptor_size, dtype=np.float32)
        wanted = fitted_angle(angle)
        for index, fitted in enumerate(self.angles):
            if _key(fitted) == wanted:
                matrix = self.matrices[index]
                return matrix if _key(angle) <= 180 else np.ascontiguousarray(matrix.T)
        raise ValueError(f"no steerer for {angle!r} degrees; these steerers hold "
                         f"{', '.join(f'{a:g}' for a in self.available())}")

    def for_rotations(self, rotations: int) -> np.ndarray:
        """(rotations, D, D) float32: S_a for a = k * 360 / rotations, k = 0, 1, ..."""
        return np.stack([self.matrix(a) for a in rotation_angles(rotations)])

    def steer(self, descriptors: np.ndarray, angle: float) -> np.ndarray:
        """(N, D) float32 descriptors -> (N, D) float32 S_angle x, L2-normalised: the
        descriptors as if the image had been rotated by ``angle`` degrees."""
        descriptors = check_descriptors(descriptors, size=self.descriptor_size,
                                        allow_float64=False)
        return steer_descriptors(descriptors, self.matrix(angle))

    def merged(self, other: "Steerers") -> "Steerers":
        """These steerers with ``other``'s angles added (other's win where both have one)."""
        keep = [i for i, a in enumerate(self.angles)
                if _key(a) not in {_key(b) for b in other.angles}]
        angles = [self.angles[i] for i in keep] + list(other.angles)
        order = np.argsort(angles, kind="stable")
        matrices = np.concatenate([self.matrices[keep], other.matrices])
        cosines = np.concatenate([self.cosines[keep], other.cosines])
        return replace(other, angles=tuple(float(angles[i]) for i in order),
                       matrices=matrices[order], cosines=cosines[order])


def steer_descriptors(descriptors: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, D) descriptors times a (D, D) steerer, rows L2-normalised (float32).

    The product is numpy's own loop (``einsum`` without BLAS): each row's result is then
    the same however many rows are steered together and on any thread count (OpenBLAS's
    float32 GEMM rounds differently with 1 and 2 threads), so a collection matched on
    Ray workers gives the single machine's file bit for bit.
    """
    steered = np.einsum("nk,jk->nj", descriptors, matrix, optimize=False)
    norms = np.linalg.norm(steered, axis=1, keepdims=True)
    return (steered / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)


def as_steerers(source: Any, rotations: int) -> Steerers:
    """The :class:`Steerers` of ``source`` that steer by every angle of ``rotations``.

    Args:
        source: a :class:`Steerers`, or an ``R2D2Feature`` (anything with
            ``getSteerers(rotations)``): its model's steerers, fitted on first use.

    Raises:
        TypeError: ``source`` is neither. ValueError: it lacks some of the angles.
    """
    if not isinstance(source, Steerers):
        getter = getattr(source, "getSteerers", None)
        if getter is None:
            raise TypeError(f"steerers must be a cv2r2d2.R2D2Feature (the extractor of the "
                            f"descriptors) or its getSteerers(), got {type(source).__name__}")
        source = getter(rotations)
    angles = rotation_angles(rotations)
    if not source.has(angles):
        raise ValueError(f"the steerers lack some of the angles of rotations={rotations} "
                         f"({', '.join(map(str, angles))}); they hold "
                         f"{', '.join(f'{a:g}' for a in source.available())}: get them with "
                         f"R2D2Feature.getSteerers({rotations})")
    return source
