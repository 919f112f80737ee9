"""Argument checks at the package's boundary, each in one place.

Each ``check_*`` takes a value as the caller received it and returns it as the code
below uses it, or raises ``TypeError``/``ValueError`` naming the argument, the value
received and what is expected (as kornia's ``core/check.py`` gathers its checks).
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

__all__ = [
    "check_flag",
    "check_count",
    "check_backend",
    "check_tile_size",
    "check_num_threads",
    "check_subpixel",
    "check_upsample",
    "check_mask",
    "check_per_image",
    "check_keypoints",
    "check_matches",
    "check_descriptors",
    "check_positions",
    "check_radius",
    "check_positive",
    "check_match_indices",
    "check_points",
    "check_inside",
    "check_offsets",
    "check_sizes",
    "check_window_dtype",
    "check_executor",
]


def check_flag(value: Any, name: str) -> bool:
    """Validate a boolean option (``True``/``False``, numpy's too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_count(value: Any, name: str) -> int:
    """Validate a count: an integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_backend(backend: Any, choices: Tuple[str, ...]) -> str:
    """Validate a backend name (one of ``choices``, e.g. ``config.BACKENDS``)."""
    if backend not in choices:
        raise ValueError(f"backend must be one of {', '.join(choices)}, got {backend!r}")
    return backend


def check_tile_size(tile_size: Any) -> int:
    """Validate a tile side: 0 (never tile) or an integer >= 64 pixels."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 0:
        raise ValueError(f"tile_size must be an integer >= 0, got {tile_size!r}")
    if 0 < tile_size < 64:
        raise ValueError(f"tile_size must be 0 or >= 64 pixels, got {tile_size!r}")
    return int(tile_size)


def check_num_threads(num_threads: Any, name: str = "num_threads") -> int:
    """Validate a thread count: an integer >= 0 (0: the runtime's default)."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= 0 (0: the runtime's default), got {num_threads!r}")
    if num_threads < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0: the runtime's default), got {num_threads!r}")
    return int(num_threads)


def check_subpixel(subpixel: Any) -> Union[bool, str]:
    """``subpixel`` as :func:`cv2r2d2.extractor.extract` takes it: True/False, or "descriptor"."""
    if isinstance(subpixel, (bool, np.bool_)):
        return bool(subpixel)
    if not isinstance(subpixel, str):
        raise TypeError(f"subpixel must be True, False or 'descriptor', got {subpixel!r}")
    if subpixel != "descriptor":
        raise ValueError(f"subpixel must be True, False or 'descriptor', got {subpixel!r}")
    return subpixel


def check_upsample(upsample: Any) -> float:
    """``upsample`` as :func:`cv2r2d2.sampling.descriptor_windows` takes it: a finite number > 0."""
    if isinstance(upsample, (bool, np.bool_)) \
            or not isinstance(upsample, (int, float, np.integer, np.floating)):
        raise TypeError(f"upsample must be a number, got {upsample!r}")
    if not (math.isfinite(upsample) and upsample > 0):
        raise ValueError(f"upsample must be a finite number > 0, got {upsample!r}")
    return float(upsample)


def check_mask(mask: Any, shape: Tuple[int, int], name: str = "mask") -> Optional[np.ndarray]:
    """Validate a detection mask: ``None`` or uint8 (H, W) matching the image.

    Returns:
        The (H, W) uint8 mask, or ``None``.
    """
    if mask is None:
        return None
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or None, got {type(mask).__name__}")
    if mask.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 (CV_8UC1), got {mask.dtype}")
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.shape != tuple(shape):
        raise ValueError(
            f"{name} must have the image's size {tuple(shape)}, got shape {mask.shape}"
        )
    return mask


def check_per_image(values: Any, count: int, name: str, what: str,
                    optional: bool = False) -> Sequence[Any]:
    """``values`` given with a list of ``count`` images: a list or tuple of one ``what``
    per image; when ``optional``, None gives None for each image."""
    if values is None and optional:
        return [None] * count
    if not isinstance(values, (list, tuple)) or len(values) != count:
        accepted = "None or a list" if optional else "a list"
        raise ValueError(f"{name} must be {accepted} with one {what} per image ({count})")
    return values


def _instances(items: Any, kind: type, name: str) -> List[Any]:
    """``items`` as a list, each checked to be an OpenCV ``kind`` (``cv2.KeyPoint``...)."""
    items = list(items)
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise TypeError(f"{name}[{i}] must be a cv2.{kind.__name__}, got {type(item).__name__}")
    return items


def check_keypoints(keypoints: Any) -> List[cv2.KeyPoint]:
    """``keypoints`` as a list, once checked to hold only ``cv2.KeyPoint`` objects."""
    if keypoints is None:
        raise TypeError("keypoints must be a sequence of cv2.KeyPoint, got None")
    return _instances(keypoints, cv2.KeyPoint, "keypoints")


def check_matches(matches: Any) -> np.ndarray:
    """cv2.DMatch sequence or (M, 2) integer array -> (M, 2) int64 (index in 1, in 2)."""
    if isinstance(matches, np.ndarray):
        if matches.ndim != 2 or matches.shape[1] != 2 or not np.issubdtype(matches.dtype, np.integer):
            raise TypeError(f"matches must be cv2.DMatch objects or an M x 2 integer array, "
                            f"got {matches.dtype} {matches.shape}")
        return matches.astype(np.int64)
    if matches is None:
        raise TypeError("matches must be cv2.DMatch objects or an M x 2 integer array, got None")
    matches = _instances(matches, cv2.DMatch, "matches")
    return np.array([(m.queryIdx, m.trainIdx) for m in matches], np.int64).reshape(-1, 2)


def check_descriptors(descriptors: Any, name: str = "descriptors", norm: int = cv2.NORM_L2,
                      size: Optional[int] = None, allow_float64: bool = True) -> np.ndarray:
    """``descriptors`` as an (N, D) array for ``norm``, or a TypeError/ValueError saying why not.

    Args:
        norm: ``cv2.NORM_HAMMING``: uint8 (binary descriptors), returned as they are;
            ``cv2.NORM_L2``: float32 (or float64 when ``allow_float64``), finite,
            returned as float32.
        size: D, when it must be this.
    """
    if not isinstance(descriptors, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(descriptors).__name__}")
    if descriptors.ndim != 2 or (size is not None and descriptors.shape[1] != size):
        raise ValueError(f"{name} must be N x {'D' if size is None else size}, "
                         f"got shape {descriptors.shape}")
    if norm == cv2.NORM_HAMMING:
        if descriptors.dtype != np.uint8:
            raise TypeError(f"{name} must be uint8 for NORM_HAMMING, got {descriptors.dtype}")
        return descriptors
    if descriptors.dtype not in ((np.float32, np.float64) if allow_float64 else (np.float32,)):
        raise TypeError(f"{name} must be float32 for NORM_L2 (R2D2 descriptors), "
                        f"got {descriptors.dtype}")
    if not np.isfinite(descriptors).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return descriptors.astype(np.float32, copy=False)


def check_positions(keypoints: Any, count: int, name: str) -> np.ndarray:
    """(count, 2) float32 positions of a sequence of ``cv2.KeyPoint`` or an (N, 2) array."""
    if isinstance(keypoints, np.ndarray):
        positions = keypoints
    else:
        try:
            keypoints = list(keypoints)
        except TypeError:
            raise TypeError(f"{name} must be a sequence of cv2.KeyPoint or an N x 2 array of "
                            f"pixel positions, got {type(keypoints).__name__}") from None
        if not all(isinstance(k, cv2.KeyPoint) for k in keypoints):
            raise TypeError(f"{name} must be a sequence of cv2.KeyPoint or an N x 2 array of "
                            f"pixel positions")
        positions = cv2.KeyPoint_convert(keypoints) if keypoints else np.zeros((0, 2))
    if positions.dtype.kind not in "fiu" or positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"{name} must be N x 2 pixel positions, got "
                         f"{positions.dtype} {positions.shape}")
    if len(positions) != count:
        raise ValueError(f"{name} has {len(positions)} keypoints for {count} descriptors: "
                         f"they must be the same image's")
    if not np.isfinite(positions).all():
        raise ValueError(f"{name} contains NaN or infinite positions")
    return positions.astype(np.float32)


def check_radius(radius: Any) -> float:
    """Validate a radius: a finite number of pixels >= 0."""
    if isinstance(radius, bool) or not isinstance(radius, (int, float, np.integer, np.floating)):
        raise TypeError(f"radius must be a number of pixels, got {type(radius).__name__}")
    if not 0 <= radius < float("inf"):
        raise ValueError(f"radius must be a finite number of pixels >= 0, got {radius!r}")
    return float(radius)


def check_positive(value: Any, name: str) -> float:
    """Validate a positive number (a search radius, a softmax temperature)."""
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def check_match_indices(pairs: np.ndarray, counts: Tuple[int, int]) -> np.ndarray:
    """(M, 2) matches (:func:`check_matches`) whose queryIdx and trainIdx lie in
    [0, ``counts[0]``) and [0, ``counts[1]``): the sizes of the two matched sets."""
    for column, (name, count) in enumerate(zip(("queryIdx", "trainIdx"), counts)):
        if len(pairs) and (pairs[:, column].min() < 0 or pairs[:, column].max() >= count):
            raise ValueError(f"matches' {name} must lie in [0, {count}), got "
                             f"{pairs[:, column].min()}..{pairs[:, column].max()}")
    return pairs


def check_points(points: Any) -> np.ndarray:
    """``points`` as an (N, 2) float32 array of (x, y) positions."""
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 2 or not np.issubdtype(points.dtype, np.number):
        raise TypeError(f"points must be an N x 2 array of positions, got {points.dtype} "
                        f"{points.shape}")
    return points.astype(np.float32)


def check_inside(points: np.ndarray, inside: np.ndarray, height: int, width: int) -> np.ndarray:
    """``points``, once ``inside`` ((N,) bool: :func:`cv2r2d2.params.inside_image` of
    them in a ``width`` x ``height`` image) holds for each."""
    outside = ~inside
    if outside.any():
        raise ValueError(f"points must lie inside the {width}x{height} image, got "
                         f"{points[outside][0].tolist()} (and {outside.sum() - 1} more)")
    return points


def check_offsets(offsets: Any) -> np.ndarray:
    """``offsets`` as a (K, 2) array of finite (dx, dy)."""
    offsets = np.asarray(offsets)
    if offsets.ndim != 2 or offsets.shape[1] != 2 or not np.isfinite(offsets).all():
        raise TypeError(f"offsets must be a K x 2 array of finite (dx, dy), got "
                        f"{offsets.dtype} {offsets.shape}")
    return offsets


def check_sizes(sizes: Any, count: int) -> np.ndarray:
    """(``count``,) float32 keypoint sizes; None: zeros (the finest level)."""
    if sizes is None:
        return np.zeros(count, np.float32)
    sizes = np.asarray(sizes, np.float32).reshape(-1)
    if len(sizes) != count:
        raise ValueError(f"sizes must hold one size per point ({count}), got {len(sizes)}")
    return sizes


def check_window_dtype(dtype: Any) -> np.dtype:
    """The element type of descriptor windows: ``np.float32`` or ``np.float16``."""
    if np.dtype(dtype) not in (np.float16, np.float32):
        raise TypeError(f"dtype must be np.float32 or np.float16, got {dtype!r}")
    return np.dtype(dtype)


def check_executor(executor: Any) -> Any:
    """None, or an executor: anything with ``map_blocks`` (``LocalExecutor``, ``RayExecutor``)."""
    if executor is not None and not callable(getattr(executor, "map_blocks", None)):
        raise TypeError("executor must be None, a cv2r2d2.collection.LocalExecutor or a "
                        f"cv2r2d2.distributed.RayExecutor, got {type(executor).__name__}")
    return executor
