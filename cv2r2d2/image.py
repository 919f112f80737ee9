"""OpenCV-convention images to the network's normalised RGB input (numpy only).

The reference reads images with PIL, converts them to RGB, scales them to [0, 1] and
normalises them with the ImageNet mean and std; :func:`normalize_image` gives the
same float32 values for the corresponding ``cv2.imread`` (BGR) array.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "to_rgb01", "normalize_image", "check_mask"]

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def _check_array(image: Any, name: str = "image") -> np.ndarray:
    if image is None:
        raise ValueError(f"{name} is None (did cv2.imread fail to read the file?)")
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(image).__name__}")
    if image.size == 0:
        raise ValueError(f"{name} is empty (shape {image.shape})")
    return image


def to_rgb01(image: Any, name: str = "image") -> np.ndarray:
    """Convert an OpenCV image to RGB float32 in [0, 1].

    Args:
        image: (H, W), (H, W, 1) grey, (H, W, 3) BGR or (H, W, 4) BGRA (alpha ignored);
            uint8 (0..255), uint16 (0..65535) or float32/float64 in [0, 1].

    Returns:
        (H, W, 3) float32 RGB array in [0, 1].
    """
    image = _check_array(image, name)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"{name} must be H x W, H x W x 1, H x W x 3 (BGR) or H x W x 4 (BGRA), "
            f"got shape {image.shape}"
        )
    if image.dtype == np.uint8:
        scale = 255.0
    elif image.dtype == np.uint16:
        scale = 65535.0
    elif image.dtype in (np.float32, np.float64):
        scale = None
    else:
        raise TypeError(
            f"{name} dtype must be uint8, uint16, float32 or float64, got {image.dtype}"
        )
    rgb = image[:, :, [0, 0, 0]] if image.shape[2] == 1 else image[:, :, 2::-1]
    if scale is None:
        if not np.isfinite(rgb).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        low, high = float(rgb.min()), float(rgb.max())
        if low < 0.0 or high > 1.0:
            raise ValueError(
                f"float {name} values must lie in [0, 1], got [{low:g}, {high:g}] "
                f"(divide 8-bit data by 255)"
            )
        return rgb.astype(np.float32)
    # float32 division, as torchvision's ToTensor does, for bit-equal inputs.
    return rgb.astype(np.float32) / np.float32(scale)


def normalize_image(image: Any, name: str = "image") -> np.ndarray:
    """OpenCV image -> (3, H, W) float32 RGB normalised with the ImageNet mean and std."""
    rgb = to_rgb01(image, name)
    # Subtract then divide in float32, the order torchvision's Normalize uses.
    out = (rgb - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(out.transpose(2, 0, 1))


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
