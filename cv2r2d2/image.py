"""Images: files to OpenCV arrays, and OpenCV-convention arrays to the network's
normalised RGB input.

The reference reads images with PIL, converts them to RGB, scales them to [0, 1] and
normalises them with the ImageNet mean and std; :func:`normalize_image` gives the
same float32 values for the corresponding ``cv2.imread`` (BGR) array. Image files are
read and written through OpenCV's codecs from any path (non-ASCII included); a folder
is searched for the suffixes of :data:`IMAGE_SUFFIXES`, the one list of them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import cv2
import numpy as np

from .utils import PathLike, atomic_path

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "to_rgb01", "normalize_image",
    "IMAGE_SUFFIXES", "is_image_file", "list_images", "read_image", "check_image_suffix",
    "write_image",
]

# The image files looked for in folders: what OpenCV's codecs read.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp",
                  ".tif", ".tiff", ".webp", ".jp2")

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
"""Per-channel (R, G, B) mean of the network's input normalisation (ImageNet's)."""
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
"""Per-channel (R, G, B) standard deviation of that normalisation."""


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


# --- image files -------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    """Whether ``path`` names an image file (by its suffix; hidden files are not)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(inputs: Sequence[PathLike]) -> List[Tuple[str, Path]]:
    """The images named by files, folders (searched recursively) and ``.txt`` lists.

    Each image is named by its path relative to the folder it was found in: the folder
    argument, the list file's folder (list lines are paths relative to it, or absolute
    ones, named by their file name), or, for an image given directly, its own folder.

    Returns:
        (name, path) pairs, in argument order, names sorted within a folder.

    Raises:
        FileNotFoundError: an argument that does not exist.
        ValueError: no image found, or two images with the same name.
    """
    found: List[Tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p))
            found += [(p.relative_to(path).as_posix(), p) for p in files]
        elif path.is_file() and path.suffix.lower() == ".txt":
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    listed = Path(line)
                    # A name must stay inside an output folder: no absolute path, no "..".
                    outside = listed.is_absolute() or ".." in listed.parts
                    found.append((listed.name if outside else listed.as_posix(),
                                  path.parent / listed))
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise FileNotFoundError(f"no such image, folder or list file: {os.fspath(item)!r}")
    if not found:
        raise ValueError(
            f"no images found in {', '.join(map(os.fspath, inputs))} "
            f"(looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    seen: Dict[str, Path] = {}
    for name, path in found:
        if name in seen and seen[name] != path:
            raise ValueError(f"two images have the name {name!r}: {seen[name]} and {path}")
        seen[name] = path
    return list(seen.items())


def read_image(path: PathLike) -> np.ndarray:
    """Read an image as OpenCV does (8-bit BGR), from any path, including non-ASCII ones.

    Raises:
        OSError: the file cannot be read or decoded.
    """
    data = np.fromfile(os.fspath(path), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise OSError(f"cannot decode {os.fspath(path)} as an image")
    return image


def check_image_suffix(path: PathLike) -> None:
    """Raise a ValueError unless OpenCV can write an image in the format of the path's
    suffix (checked before a long computation, not after it)."""
    suffix = Path(path).suffix
    if not cv2.haveImageWriter(f"image{suffix}"):
        raise ValueError(f"cannot write {os.fspath(path)}: OpenCV has no encoder for "
                         f"{suffix or 'a name without suffix'!r} (use .png or .jpg)")


def write_image(path: PathLike, image: np.ndarray) -> None:
    """Write an image as ``cv2.imwrite`` does, in the format of the path's suffix, to any
    path (non-ASCII included), atomically.

    Raises:
        ValueError: OpenCV has no encoder for the suffix.
    """
    check_image_suffix(path)
    suffix = Path(path).suffix
    ok, data = cv2.imencode(suffix, image)
    if not ok:
        raise OSError(f"cannot encode the image as {suffix}")
    with atomic_path(path) as tmp:
        data.tofile(tmp)
