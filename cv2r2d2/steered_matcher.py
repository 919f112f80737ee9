"""``SteeredMatcher``: ``cv2.BFMatcher`` for R2D2 views rotated in the image plane.

It estimates each pair's rotation with the model's steerers and matches under it, with
the kernels of :mod:`cv2r2d2.matching` (:func:`~cv2r2d2.matching.estimate_rotation`,
:func:`~cv2r2d2.matching.match_rotated`, :func:`~cv2r2d2.matching.nearest_places`).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import cv2
import numpy as np

from .checks import check_count, check_flag, check_positions, check_radius
from .matching import PLACE_RADIUS, estimate_rotation, match_rotated, nearest_places, steered_by
from .steerers import DEFAULT_ROTATIONS, as_steerers, rotation_angles

__all__ = ["SteeredMatcher"]


class SteeredMatcher:
    """``cv2.BFMatcher(cv2.NORM_L2)`` for R2D2 views that may be rotated in the image plane.

    Each call estimates the rotation of image 2 against image 1 among ``rotations``
    angles (k * 360 / rotations degrees, counter-clockwise) with the model's steerers
    (:func:`estimate_rotation`), then matches image 1's descriptors, steered by it, with
    image 2's: as ``cv2.BFMatcher(cv2.NORM_L2, crossCheck).match(r2d2.steer(d1, angle),
    d2)``. ``rotations=1`` is exactly ``cv2.BFMatcher(cv2.NORM_L2, crossCheck)``.

    >>> matcher = cv2r2d2.SteeredMatcher(r2d2)   # rotations=24: every 15 degrees
    >>> matches = matcher.match(d1, d2)     # tuple of cv2.DMatch
    >>> matcher.getRotation()               # e.g. 90.0
    >>> ratio = cv2r2d2.SteeredMatcher(r2d2, crossCheck=False)
    >>> good = [m for m, n in ratio.knnMatch(d1, d2, 2, trainKeypoints=kp2)
    ...         if m.distance < 0.9 * n.distance]   # Lowe's test, second place apart
    """

    def __init__(self, steerers: Any, rotations: int = DEFAULT_ROTATIONS,
                 crossCheck: bool = True, device: Optional[str] = None) -> None:
        """
        Args:
            steerers: the ``R2D2Feature`` that computes the descriptors (its model's
                steerers are fitted on first use and cached) or its ``getSteerers()``.
            rotations: steering angles, a divisor of 360 (24: every 15 degrees).
            crossCheck: keep mutual nearest neighbours only, as ``cv2.BFMatcher``'s.
            device: torch device of the matching (None: CUDA when available).
        """
        self._angles = rotation_angles(rotations)
        self._cross_check = check_flag(crossCheck, "crossCheck")
        self._matrices = as_steerers(steerers, rotations).for_rotations(rotations)
        self._device = device
        self._rotation: Optional[float] = None

    def _descriptors(self, descriptors: Any, name: str) -> np.ndarray:
        dim = self._matrices.shape[1]
        if descriptors is None:  # what detectAndCompute gives for an image without keypoints
            return np.zeros((0, dim), np.float32)
        if not isinstance(descriptors, np.ndarray) or descriptors.dtype != np.float32:
            raise TypeError(f"{name} must be a float32 numpy array of R2D2 descriptors, got "
                            f"{getattr(descriptors, 'dtype', type(descriptors).__name__)}")
        if descriptors.ndim != 2 or descriptors.shape[1] != dim:
            raise ValueError(f"{name} must be N x {dim}, got shape {descriptors.shape}")
        return descriptors

    def _steered_query(self, query: np.ndarray, train: np.ndarray) -> np.ndarray:
        """The query steered by the estimated rotation (recorded for getRotation)."""
        best = estimate_rotation([(query, train)], self._matrices, self._device)[0]
        self._rotation = float(self._angles[best]) if len(query) and len(train) else None
        return steered_by(query, self._matrices[best])

    def match(self, queryDescriptors: Any, trainDescriptors: Any) -> Tuple[cv2.DMatch, ...]:
        """The best match in image 2 of each image-1 descriptor (mutual ones with
        crossCheck), under the estimated rotation; ordered by ``queryIdx``.

        Args:
            queryDescriptors: (N1, 128) float32 of image 1 (None: none).
            trainDescriptors: (N2, 128) float32 of image 2.
        """
        query = self._descriptors(queryDescriptors, "queryDescriptors")
        train = self._descriptors(trainDescriptors, "trainDescriptors")
        if not self._cross_check:
            steered = self._steered_query(query, train)
            if not len(steered) or not len(train):
                return ()
            return cv2.BFMatcher(cv2.NORM_L2).match(steered, train)
        indices, distances, best = match_rotated([(query, train)], self._matrices,
                                                 device=self._device)[0]
        self._rotation = float(self._angles[best]) if len(query) and len(train) else None
        return tuple(cv2.DMatch(int(i), int(j), float(d))
                     for (i, j), d in zip(indices.tolist(), distances.tolist()))

    def knnMatch(self, queryDescriptors: Any, trainDescriptors: Any, k: int,
                 trainKeypoints: Any = None,
                 radius: float = PLACE_RADIUS) -> Tuple[Tuple[cv2.DMatch, ...], ...]:
        """The ``k`` best matches in image 2 of each image-1 descriptor, under the
        estimated rotation (for Lowe's ratio test), as ``cv2.BFMatcher.knnMatch``.

        Args:
            queryDescriptors: as :meth:`match`.
            trainDescriptors: as :meth:`match`.
            k: matches per query descriptor.
            trainKeypoints: image 2's keypoints (``cv2.KeyPoint``, or (N2, 2) pixels):
                each next match is then the best at another place, farther than
                ``radius`` pixels from those before it, so that the ratio test compares
                two places, not one place found on two pyramid levels (crossCheck=False).
            radius: pixels.
        """
        check_count(k, "k")
        if self._cross_check and k != 1:
            raise ValueError(f"crossCheck=True matches with k=1 only (as cv2.BFMatcher), "
                             f"got k={k}; create the matcher with crossCheck=False")
        radius = check_radius(radius)
        query = self._descriptors(queryDescriptors, "queryDescriptors")
        train = self._descriptors(trainDescriptors, "trainDescriptors")
        if trainKeypoints is not None:
            if self._cross_check:
                raise ValueError("trainKeypoints= picks neighbours at distinct places for the "
                                 "ratio test: create the matcher with crossCheck=False")
            positions = check_positions(trainKeypoints, len(train), "trainKeypoints")
        steered = self._steered_query(query, train)
        if not len(steered):
            return ()
        if not len(train):
            return tuple(() for _ in range(len(steered)))
        if trainKeypoints is None:
            return cv2.BFMatcher(cv2.NORM_L2, crossCheck=self._cross_check).knnMatch(
                steered, train, int(k))
        indices, distances = nearest_places(steered, train, positions, int(k), radius,
                                            self._device)
        return tuple(tuple(cv2.DMatch(i, int(j), float(d)) for j, d in zip(row, gaps) if j >= 0)
                     for i, (row, gaps) in enumerate(zip(indices.tolist(), distances.tolist())))

    def getRotation(self) -> Optional[float]:
        """The rotation of image 2 against image 1 found by the last call, degrees in
        [0, 360) counter-clockwise (None before any call, or when a set was empty)."""
        return self._rotation

    def getRotations(self) -> int:
        """The number of steering angles tried: k * 360 / rotations degrees."""
        return len(self._angles)

    def getCrossCheck(self) -> bool:
        """Whether matches are mutual nearest neighbours (as ``cv2.BFMatcher``'s ``crossCheck``)."""
        return self._cross_check
