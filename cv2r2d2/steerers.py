"""Steerers: the R2D2 descriptors of a rotated image, computed from the unrotated ones.

R2D2 is not rotation invariant. A *steerer* (Bökman, Edstedt, Felsberg, Kahl, "Steerers:
A Framework for Rotation Equivariant Keypoint Descriptors", CVPR 2024) is, for an angle
a, an orthogonal D x D matrix S_a such that the descriptor the network computes at a
point of the image rotated by a is close to S_a times the descriptor at the same point
of the unrotated image. Each S_a is fitted here post hoc, directly (not as a power or
product of others), by orthogonal Procrustes: S_a = U V^T from the SVD of sum(y x^T)
over pairs (x, y) of dense descriptors at corresponding pixels of an image and of its
rotation. The images are procedural textures that the package draws itself, so nothing
is downloaded, trained or shipped. Fitting S_a on the pairs (y, x) gives S_a^T, so the
steerer of -a is the transpose of that of a: only angles in (0, 180] are fitted.

Angles are in degrees, counter-clockwise in the displayed image as
``cv2.getRotationMatrix2D`` counts them (90: ``cv2.ROTATE_90_COUNTERCLOCKWISE``).

Steerers depend on the model: they are fitted on first use per model file and cached
in the package's cache folder (:func:`cv2r2d2.weights.cache_dir`,
``<weights stem>.steerers-<sha256[:16]>.npz``), keyed by the file's sha256; never in the
weights folder, which may be read-only. A cache file placed beside the weights is read
too (first).
"""
from __future__ import annotations

import json
import logging
import math
import os
import stat
import time
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

import cv2
import numpy as np

from .checks import check_descriptors
from .image import list_images, read_image
from .utils import atomic_path, progress
from .weights import cache_dir, sha256sum

__all__ = [
    "DEFAULT_ROTATIONS",
    "FitSettings",
    "DEFAULT_SETTINGS",
    "Steerers",
    "rotation_angles",
    "check_angle",
    "as_steerers",
    "rotate_image",
    "procedural_images",
    "fit_steerers",
    "cache_file",
    "read_cache",
    "load_steerers",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
# The default steering set: every 360 / 24 = 15 degrees. 30-degree steps dip to MMA@3
# 0.79 midway between two angles (benchmarks/bench_steered_ratio.py).
DEFAULT_ROTATIONS = 24
CACHE_FORMAT = 1
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


def _canonical(angle: float) -> float:
    """The fitted angle whose steerer (or its transpose) gives ``angle``: (0, 180]."""
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
        settings: how they were fitted (:class:`FitSettings` as a dict).
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
        return all(_key(a) == 0 or _key(_canonical(a)) in fitted for a in angles)

    def matrix(self, angle: float) -> np.ndarray:
        """(D, D) float32 S_angle (the identity for 0).

        Raises:
            ValueError: no steerer was fitted for ``angle``.
        """
        if _key(angle) == 0:
            return np.eye(self.descriptor_size, dtype=np.float32)
        wanted = _key(_canonical(angle))
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


# --- images and correspondences -------------------------------------------------


def rotation_matrix(width: int, height: int, angle: float, expand: bool = True) -> Tuple[np.ndarray, Tuple[int, int]]:
    """The (2, 3) affine map of a rotation about the image centre, and the canvas size.

    Args:
        width, height: the image's size, pixels.
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
    wanted = sorted({_key(_canonical(a)) for a in angles} - {0.0})
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


# --- the cache ------------------------------------------------------------------


def _writable(folder: Path) -> bool:
    """Whether ``folder`` may be written: write permission and a write bit (a folder
    without write bits counts as read-only even for root)."""
    try:
        mode = folder.stat().st_mode
    except OSError:
        return False
    return os.access(folder, os.W_OK) and bool(mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _cache_name(model_file: Path, sha256: str) -> str:
    return f"{model_file.stem}.steerers-{sha256[:16]}.npz"


def cache_file(model_file: PathLike, sha256: str) -> Path:
    """Where the steerers of a model file are cached: in the package's cache folder
    (:func:`cv2r2d2.weights.cache_dir`), never beside the weights."""
    return cache_dir() / _cache_name(Path(model_file), sha256)


def _read_any_cache(model_file: Path, sha256: str, descriptor_size: int) -> Optional[Steerers]:
    """The cached steerers beside the model file (a read-only folder may hold them too),
    else those in the user cache folder."""
    for folder in (model_file.parent, cache_dir()):
        steerers = read_cache(folder / _cache_name(model_file, sha256), sha256, descriptor_size)
        if steerers is not None:
            return steerers
    return None


def _write_cache(path: Path, steerers: Steerers) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, format=np.int64(CACHE_FORMAT), sha256=np.str_(steerers.sha256),
                 angles=np.asarray(steerers.angles, np.float64), matrices=steerers.matrices,
                 cosines=steerers.cosines, settings=np.str_(json.dumps(steerers.settings,
                                                                        sort_keys=True)))


def read_cache(path: PathLike, sha256: str, descriptor_size: Optional[int] = None) -> Optional[Steerers]:
    """The steerers cached in ``path`` for a model file of this sha256, or None.

    A missing file gives None; an unreadable, corrupted or foreign one (another
    sha256, format or descriptor size, matrices not orthogonal) a warning, and None.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != CACHE_FORMAT or str(data["sha256"]) != sha256:
                raise ValueError("written for another model file or format")
            steerers = Steerers(
                angles=tuple(float(a) for a in data["angles"]),
                matrices=np.asarray(data["matrices"], np.float32),
                cosines=np.asarray(data["cosines"], np.float64),
                sha256=sha256, settings=json.loads(str(data["settings"])),
            )
        dim = steerers.descriptor_size
        if descriptor_size is not None and dim != descriptor_size:
            raise ValueError(f"{dim}-dimensional, the model's descriptors are {descriptor_size}")
        gram = np.einsum("kij,kil->kjl", steerers.matrices.astype(np.float64),
                         steerers.matrices.astype(np.float64))
        if not np.allclose(gram, np.eye(dim)[None], atol=1e-4):
            raise ValueError("matrices not orthogonal")
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("ignoring the steerer cache %s (%s: %s); fitting the steerers again",
                       path, type(exc).__name__, exc)
        return None
    return steerers


def load_steerers(
    feature: DenseDescriber,
    model_file: PathLike,
    angles: Sequence[float],
    settings: Optional[FitSettings] = None,
    known: Optional[Steerers] = None,
    show_progress: bool = True,
) -> Steerers:
    """The steerers of a model for ``angles``: from the cache, fitting those missing.

    Args:
        feature: the model's extractor (used to fit).
        model_file: its weights (``.pt``) or ``.onnx`` file; the cache is keyed by its
            sha256 (:func:`cache_file`).
        angles: degrees.
        settings: fit with these and replace the cache; None: use the cached steerers
            and fit the missing angles as the cached ones were (with the default
            settings when none are cached, or when their image folder is gone).
        known: steerers already at hand for this file (used when the sha256 matches).
        show_progress: a progress bar on a terminal while fitting.
    """
    model_file = Path(model_file)
    sha256 = sha256sum(model_file)
    dim = int(feature.descriptorSize())
    steerers: Optional[Steerers] = None
    if settings is None:
        if known is not None and known.sha256 == sha256:
            steerers = known
        else:
            steerers = _read_any_cache(model_file, sha256, dim)
        settings = _settings_like(steerers)
        if steerers is not None and asdict(settings) != steerers.settings:
            steerers = None  # their images are gone: fit all alike
    if steerers is not None and steerers.has(angles):
        return steerers
    if steerers is None:
        steerers = Steerers((), np.zeros((0, dim, dim), np.float32), np.zeros((0, 2)), sha256,
                            asdict(settings))
    fitted = {_key(a) for a in steerers.angles}
    wanted = sorted({_key(_canonical(a)) for a in angles} - {0.0} - fitted)
    source = f"the images of {settings.images}" if settings.images else \
        f"{settings.num_images} procedural {settings.image_size} px images"
    logger.info("fitting the steerers of %s for %s degrees on %s (once per model file)",
                model_file.name, ", ".join(f"{a:g}" for a in wanted), source)
    start = time.perf_counter()
    new = fit_steerers(feature, wanted, settings, show_progress=show_progress)
    steerers = steerers.merged(replace(new, sha256=sha256))
    target = cache_file(model_file, sha256)
    try:
        _write_cache(target, steerers)
    except OSError as exc:
        logger.warning("could not cache the steerers in %s (%s); they are fitted again "
                       "next time", target, exc)
    else:
        logger.info("fitted %d steerer(s) in %.1f s; cached in %s", len(wanted),
                    time.perf_counter() - start, target)
    return steerers


def _settings_like(steerers: Optional[Steerers]) -> FitSettings:
    """The settings of cached steerers, if their images are still there; else defaults."""
    if steerers is None:
        return DEFAULT_SETTINGS
    try:
        settings = FitSettings(**steerers.settings)
    except (TypeError, ValueError):
        return DEFAULT_SETTINGS
    if settings.images and not Path(settings.images).is_dir():
        logger.warning("the steerers were fitted on %s, which is gone; fitting on "
                       "procedural images instead", settings.images)
        return DEFAULT_SETTINGS
    return settings
