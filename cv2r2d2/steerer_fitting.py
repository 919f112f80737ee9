"""Fitting steerers (:mod:`cv2r2d2.steerers`) on images the package draws itself.

Each steerer S_a is fitted directly (not as a power or product of others) by orthogonal
Procrustes: S_a = U V^T from the SVD of sum(y x^T) over pairs (x, y) of dense
descriptors at corresponding pixels of an image and of its rotation by a. The images are
procedural textures (:func:`procedural_images`), so nothing is downloaded, trained or
shipped; a folder of one's own photos can stand in for them (:class:`FitSettings`).
Fitting S_a on the pairs (y, x) gives S_a^T, so only angles in (0, 180] are fitted.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, List, Optional, Protocol, Sequence, Tuple

import cv2
import numpy as np

from .image import list_images, read_image
from .steerers import Steerers, fitted_angle
from .utils import PathLike, progress

__all__ = [
    "FitSettings",
    "DEFAULT_SETTINGS",
    "rotate_image",
    "procedural_images",
    "fit_steerers",
]

_RIGHT_ANGLES = {90: cv2.ROTATE_90_COUNTERCLOCKWISE, 180: cv2.ROTATE_180,
                 270: cv2.ROTATE_90_CLOCKWISE}


@dataclass(frozen=True)
class FitSettings:
    """How steerers are fitted; the defaults were chosen by measurement (docs/benchmarks.md).

    Attributes:
        image_size: side of the square fitting images, pixels (the network runs on them
            at scale 1).
        num_images: procedural images drawn (ignored with ``images``).
        seed: seed of the procedural images.
        margin: correspondences keep pixels at least this far, in pixels, from the
            border of both images (and from the black corners of a rotation).
        stride: correspondences on every ``stride``-th pixel of the rotated image.
        images: a folder of the user's images to fit on instead of procedural ones
            (centre squares, resized to ``image_size``).
    """

    image_size: int = 192
    num_images: int = 4
    seed: int = 0
    margin: int = 16
    stride: int = 2
    images: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("image_size", "num_images", "margin", "stride", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if self.num_images < 1 or self.stride < 1 or self.margin < 0:
            raise ValueError(f"expected num_images >= 1, stride >= 1, margin >= 0, got "
                             f"{self.num_images!r}, {self.stride!r}, {self.margin!r}")
        if self.image_size < 2 * self.margin + 32:
            raise ValueError(f"image_size must be >= 2 * margin + 32 = {2 * self.margin + 32} "
                             f"pixels, got {self.image_size!r}")


DEFAULT_SETTINGS = FitSettings()
"""The fitting settings used unless others are given."""


class DenseDescriber(Protocol):
    """What fitting needs of a feature (an ``R2D2Feature``)."""

    def computeDenseMaps(self, image: Any, scale: float = 1.0) -> dict:
        """(H, W, 3) uint8 BGR image -> dict with ``descriptors`` (D, H, W) at scale 1."""

    def descriptorSize(self) -> int:
        """D."""


# --- images and correspondences -------------------------------------------------


def rotation_matrix(width: int, height: int, angle: float, expand: bool = True) -> Tuple[np.ndarray, Tuple[int, int]]:
    """The (2, 3) affine map of a rotation about the image centre, and the canvas size.

    Args:
        width: the image's width, pixels.
        height: the image's height, pixels.
        angle: degrees, counter-clockwise (as ``cv2.getRotationMatrix2D``).
        expand: enlarge the canvas to hold the whole rotated image (else keep W x H).

    Returns:
        (2, 3) float64 matrix mapping pixels (x, y) of the image to the rotated one, and
        the rotated canvas' (width, height).
    """
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), float(angle), 1.0)
    size = (width, height)
    if expand:
        cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
        # Rounded so that exact quarter turns give the swapped size cv2.rotate gives.
        size = (int(round(width * cos + height * sin, 6) + 0.999999),
                int(round(width * sin + height * cos, 6) + 0.999999))
    matrix[:, 2] += [(size[0] - width) / 2, (size[1] - height) / 2]
    return matrix, size


def rotate_image(image: np.ndarray, angle: float, expand: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """An image rotated about its centre by ``angle`` degrees (counter-clockwise).

    Quarter turns are exact (``cv2.rotate``); other angles are bilinear
    (``cv2.warpAffine``), with black outside the image.

    Returns:
        The rotated image and the (3, 3) homography from the image's pixels to its.
    """
    height, width = image.shape[:2]
    matrix, size = rotation_matrix(width, height, angle, expand)
    quarter = int(angle) % 360 if float(angle) == int(angle) else None
    if quarter == 0:
        rotated = image.copy()
    elif quarter in _RIGHT_ANGLES and (expand or width == height):
        rotated = cv2.rotate(image, _RIGHT_ANGLES[quarter])
    else:
        rotated = cv2.warpAffine(image, matrix, size, flags=cv2.INTER_LINEAR,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return rotated, np.vstack([matrix, [0.0, 0.0, 1.0]])


def procedural_images(count: int, size: int, seed: int = 0) -> List[np.ndarray]:
    """``count`` square BGR uint8 textures: multi-scale noise under random discs and
    rotated rectangles (filled, anti-aliased), deterministic for a seed."""
    images = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        texture = np.zeros((size, size, 3), np.float32)
        cells = 4
        while cells <= size:
            noise = rng.standard_normal((cells, cells, 3)).astype(np.float32)
            texture += cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC) / np.sqrt(cells)
            cells *= 2
        texture = (texture - texture.min()) * (255 / max(float(np.ptp(texture)), 1e-6))
        shift = 4  # sub-pixel drawing: coordinates in 1/16 pixel
        for _ in range(int(rng.integers(20, 40))):
            colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
            cx, cy = rng.uniform(0, size, 2)
            radius = rng.uniform(size / 60, size / 8)
            if rng.random() < 0.5:
                cv2.circle(texture, (int(cx * 16), int(cy * 16)), int(radius * 16), colour,
                           -1, cv2.LINE_AA, shift)
            else:
                box = cv2.boxPoints(((cx, cy), (radius * rng.uniform(0.5, 2),
                                                radius * rng.uniform(0.5, 2)), rng.uniform(0, 180)))
                cv2.fillPoly(texture, [np.round(box * 16).astype(np.int32)], colour,
                             cv2.LINE_AA, shift)
        images.append(np.clip(texture, 0, 255).round().astype(np.uint8))
    return images


def _folder_images(folder: PathLike, size: int) -> List[np.ndarray]:
    """The centre squares of a folder's images, resized to ``size``, in name order."""
    images = []
    for _, path in list_images([folder]):
        image = read_image(path)
        height, width = image.shape[:2]
        side = min(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        square = image[top:top + side, left:left + side]
        images.append(cv2.resize(square, (size, size), interpolation=cv2.INTER_AREA))
    return images


def _bilinear(dense: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(D, h, w) map sampled at (n,) positions -> (n, D), rows L2-normalised."""
    height, width = dense.shape[1:]
    x0 = np.clip(np.floor(x).astype(np.int64), 0, width - 2)
    y0 = np.clip(np.floor(y).astype(np.int64), 0, height - 2)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    pixels = dense.transpose(1, 2, 0)
    sample = (pixels[y0, x0] * ((1 - fx) * (1 - fy)) + pixels[y0, x0 + 1] * (fx * (1 - fy))
              + pixels[y0 + 1, x0] * ((1 - fx) * fy) + pixels[y0 + 1, x0 + 1] * (fx * fy))
    return sample / np.maximum(np.linalg.norm(sample, axis=1, keepdims=True), 1e-12)


def _correspondences(dense: np.ndarray, rotated: np.ndarray, homography: np.ndarray,
                     margin: int, stride: int) -> Tuple[np.ndarray, np.ndarray]:
    """Descriptor pairs (x from ``dense``, y from ``rotated``) at corresponding pixels.

    Pixels of the rotated map on a ``stride`` grid whose position in the unrotated map
    (``homography`` maps unrotated to rotated pixels) lies ``margin`` pixels or more
    inside both maps; x is bilinear there (exact for quarter turns).
    """
    height, width = rotated.shape[1:]
    ys, xs = np.mgrid[margin:height - margin:stride, margin:width - margin:stride]
    points = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)]).astype(np.float64)
    source = np.linalg.inv(homography) @ points
    source = np.round(source[:2] / source[2], 9)  # quarter turns land on whole pixels
    h0, w0 = dense.shape[1:]
    valid = (source[0] >= margin) & (source[0] <= w0 - 1 - margin) \
        & (source[1] >= margin) & (source[1] <= h0 - 1 - margin)
    x = _bilinear(dense, source[0, valid], source[1, valid])
    y = rotated[:, points[1, valid].astype(np.int64), points[0, valid].astype(np.int64)].T
    return x.astype(np.float64), y.astype(np.float64)


def _procrustes(cross: np.ndarray) -> np.ndarray:
    """The orthogonal S minimising sum |y - S x|^2 given cross = sum y x^T: U V^T."""
    u, _, vt = np.linalg.svd(cross)
    return u @ vt


# --- fitting --------------------------------------------------------------------


def fit_steerers(
    feature: DenseDescriber,
    angles: Sequence[float],
    settings: FitSettings = DEFAULT_SETTINGS,
    images: Optional[Sequence[np.ndarray]] = None,
    show_progress: bool = True,
) -> Steerers:
    """Fit one steerer per angle, each directly, by orthogonal Procrustes.

    Args:
        feature: the extractor whose descriptors are steered (an ``R2D2Feature``).
        angles: degrees; each is fitted as its representative in (0, 180] (0 needs no
            fit), duplicates once.
        settings: the fitting images and correspondences.
        images: BGR images to fit on (default: ``settings.images``' folder, else
            ``settings.num_images`` procedural images).
        show_progress: a progress bar on a terminal.

    Returns:
        :class:`Steerers` of the fitted angles (``sha256`` left empty).
    """
    wanted = sorted({fitted_angle(a) for a in angles} - {0.0})
    dim = int(feature.descriptorSize())
    if images is None:
        images = (_folder_images(settings.images, settings.image_size) if settings.images
                  else procedural_images(settings.num_images, settings.image_size, settings.seed))
    if wanted and not len(images):
        raise ValueError("no images to fit the steerers on")
    cross = {a: np.zeros((dim, dim)) for a in wanted}
    plain = {a: 0.0 for a in wanted}
    counts = {a: 0 for a in wanted}
    steps = [(i, a) for i in range(len(images)) for a in [None, *wanted]] if wanted else []
    dense = None
    for index, angle in progress(steps, len(steps), show_progress, "fitting steerers"):
        if angle is None:
            dense = feature.computeDenseMaps(images[index])["descriptors"]
            continue
        rotated, homography = rotate_image(images[index], angle, expand=False)
        x, y = _correspondences(dense, feature.computeDenseMaps(rotated)["descriptors"],
                                homography, settings.margin, settings.stride)
        cross[angle] += y.T @ x
        plain[angle] += float(np.einsum("ij,ij->", x, y))
        counts[angle] += len(x)
    matrices, cosines = [], []
    for angle in wanted:
        if not counts[angle]:
            raise ValueError(f"no corresponding pixels at {angle:g} degrees: the fitting "
                             f"images are too small for margin {settings.margin}")
        matrix = _procrustes(cross[angle])
        matrices.append(matrix.astype(np.float32))
        # sum y . S x = trace(S^T sum y x^T): the fit's mean cosine, for free.
        cosines.append((plain[angle] / counts[angle],
                        float(np.sum(matrix * cross[angle])) / counts[angle]))
    return Steerers(
        angles=tuple(wanted),
        matrices=np.stack(matrices) if matrices else np.zeros((0, dim, dim), np.float32),
        cosines=np.asarray(cosines, np.float64).reshape(-1, 2),
        settings=asdict(settings),
    )
