"""Training pairs with exact correspondences, from folders a user points at.

A :class:`Pair` holds two OpenCV (BGR uint8) images and the absolute flow ``aflow``
(2, H1, W1): for each pixel (x1, y1) of image 1, the position (x2, y2) in image 2 of
the same point (pixel centres at integer coordinates), NaN where it has none.

Sources of pairs:

* :class:`SyntheticPairs`: single images, image 2 a random perspective tilt of image 1
  (the paper's web-image and Aachen sets);
* :class:`HomographyPairs`: HPatches-style folders (``1.ppm`` .. ``6.ppm``, ``H_1_k``);
* :class:`FlowPairs`: the same layout with a stored dense flow ``flow_1_k.npy``.

:class:`PairDataset` turns them into fixed-size training crops (rescale and colour
jitter of image 2, zoom-matched 192 x 192 crops) and :func:`make_loader` batches them.
Every random draw comes from a generator seeded by (seed, epoch, position in the
epoch), so a pair is the same whatever the number of workers or an interruption.
"""
from __future__ import annotations

import bisect
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..image import is_image_file, normalize_image, read_image
from ..image import list_images as image_files

__all__ = [
    "Pair",
    "list_images",
    "read_image",
    "homography_flow",
    "color_jitter",
    "SyntheticPairs",
    "HomographyPairs",
    "FlowPairs",
    "PairDataset",
    "epoch_batches",
    "collate",
    "make_loader",
]

PathLike = Union[str, Path]


@dataclass
class Pair:
    """Two images and the flow from the first to the second.

    Attributes:
        image1: (H1, W1, 3) uint8 BGR.
        image2: (H2, W2, 3) uint8 BGR.
        aflow: (2, H1, W1) float32 positions in image 2 (pixels), NaN where undefined.
    """

    image1: np.ndarray
    image2: np.ndarray
    aflow: np.ndarray


def list_images(path: PathLike) -> List[Path]:
    """Image files under a folder (recursively, sorted, by suffix), or an image file.

    Raises:
        ValueError: neither an existing file nor a folder with images.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path} is neither an image file nor a folder")
    if path.is_file():
        return [path]
    try:
        return [found for _, found in image_files([path])]
    except ValueError:
        return []


def homography_flow(homography: np.ndarray, height: int, width: int) -> np.ndarray:
    """(3, 3) homography of image-1 to image-2 pixels -> (2, height, width) float32 aflow."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    h = np.asarray(homography, np.float64)
    z = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        flow = np.stack([(h[0, 0] * x + h[0, 1] * y + h[0, 2]) / z,
                         (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / z])
    flow[:, ~(z > 0)] = np.nan  # points behind the camera
    return flow.astype(np.float32)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _rescale(image: np.ndarray, shorter: float) -> Tuple[np.ndarray, float, float]:
    """Resize so that the shorter side is ``shorter`` px; returns image, x and y factors."""
    height, width = image.shape[:2]
    factor = shorter / min(height, width)
    new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation)
    return resized, new_w / width, new_h / height


def color_jitter(
    image: np.ndarray,
    rng: np.random.Generator,
    brightness: float = 0.2,
    contrast: float = 0.2,
    saturation: float = 0.2,
    hue: float = 0.1,
) -> np.ndarray:
    """Random brightness, contrast, saturation and hue changes, in random order.

    Args:
        image: (H, W, 3) uint8 BGR.
        brightness: a factor drawn in [1 - v, 1 + v].
        contrast: a factor drawn in [1 - v, 1 + v].
        saturation: a factor drawn in [1 - v, 1 + v].
        hue: hue shift drawn in [-v, v] turns (v <= 0.5).

    Returns:
        (H, W, 3) uint8 BGR.
    """
    out = image.astype(np.float32) / 255
    for op in rng.permutation(4):
        if op == 0 and brightness:
            out = out * rng.uniform(1 - brightness, 1 + brightness)
        elif op == 1 and contrast:
            mean = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY).mean()
            out = (out - mean) * rng.uniform(1 - contrast, 1 + contrast) + mean
        elif op == 2 and saturation:
            grey = cv2.cvtColor(out, cv2.COLOR_BGR2GRAY)[:, :, None]
            out = (out - grey) * rng.uniform(1 - saturation, 1 + saturation) + grey
        elif op == 3 and hue:
            hsv = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)  # float input: hue in degrees
            hsv[:, :, 0] = (hsv[:, :, 0] + 360 * rng.uniform(-hue, hue)) % 360
            out = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        out = np.clip(out, 0, 1)
    return (out * 255 + 0.5).astype(np.uint8)


def _check_scale(scale: Optional[Tuple[float, float]]) -> Optional[Tuple[float, float]]:
    if scale is None:
        return None
    if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
        raise ValueError(
            f"scale must be (min, max) shorter-side sizes with 0 < min <= max, got {scale!r}"
        )
    return float(scale[0]), float(scale[1])


class SyntheticPairs:
    """Pairs made from single images by a random perspective tilt.

    Image 1 is the image rescaled so that its shorter side is log-uniform in ``scale``;
    image 2 is image 1 with one side pushed outwards (each of its corners moved along
    it by up to ``tilt`` x max(w, h)) plus uniform noise of ``noise`` grey levels
    (peak to peak); ``aflow`` follows from the homography.

    Args:
        images: a folder (searched recursively), an image file or a list of image files.
        scale: (min, max) shorter side of image 1 in pixels; None keeps the size.
        tilt: the largest corner displacement, as a fraction of max(w, h).
        noise: amplitude of the pixel noise (grey levels).
    """

    def __init__(
        self,
        images: Union[PathLike, Sequence[PathLike]],
        scale: Optional[Tuple[float, float]] = (256, 1024),
        tilt: float = 0.5,
        noise: float = 25,
    ) -> None:
        if isinstance(images, (str, Path)):
            self.paths = list_images(images)
        else:
            self.paths = [Path(p) for p in images]
        if not self.paths:
            raise ValueError(f"no image found in {images}")
        self.scale = _check_scale(scale)
        if not tilt >= 0 or not noise >= 0:
            raise ValueError(f"tilt and noise must be >= 0, got {tilt!r}, {noise!r}")
        self.tilt, self.noise = float(tilt), float(noise)

    def __len__(self) -> int:
        return len(self.paths)

    def tilt_homography(
        self, rng: np.random.Generator, height: int, width: int
    ) -> Tuple[np.ndarray, Tuple[int, int]]:
        """A random tilt: (3, 3) homography and the (width, height) of image 2."""
        corners = np.float32([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]])
        moved = corners.copy()
        side = int(rng.integers(4))  # top, right, bottom, left
        a, b = side, (side + 1) % 4
        direction = corners[b] - corners[a]
        direction /= np.linalg.norm(direction)
        shift = rng.uniform(0, self.tilt * max(width, height))
        moved[a] -= shift * direction
        moved[b] += shift * direction
        moved -= moved.min(axis=0)
        size = np.ceil(moved.max(axis=0)).astype(int) + 1
        return cv2.getPerspectiveTransform(corners, moved), (int(size[0]), int(size[1]))

    def pair(self, index: int, rng: np.random.Generator) -> Pair:
        """The pair of image ``index`` for the random draws of ``rng``."""
        image1 = read_image(self.paths[index])
        if self.scale is not None:
            image1 = _rescale(image1, _log_uniform(rng, *self.scale))[0]
        height, width = image1.shape[:2]
        homography, size = self.tilt_homography(rng, height, width)
        image2 = cv2.warpPerspective(image1, homography, size, flags=cv2.INTER_LINEAR)
        if self.noise:
            noise = rng.uniform(-self.noise / 2, self.noise / 2, image2.shape)
            image2 = np.clip(image2 + noise + 0.5, 0, 255).astype(np.uint8)
        return Pair(image1, image2, homography_flow(homography, height, width))


class _SequencePairs:
    """Folders holding an image ``1.*`` and, for each k, an image ``k.*`` with its flow."""

    pattern = re.compile("")

    def __init__(self, root: PathLike) -> None:
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"{root} does not exist or is not a folder")
        self.pairs: List[Tuple[Path, Path, Path]] = []
        for folder in sorted({root, *(p for p in root.rglob("*") if p.is_dir())}):
            images = {p.stem: p for p in folder.iterdir() if is_image_file(p)}
            for flow in sorted(folder.iterdir()):
                match = self.pattern.fullmatch(flow.name)
                if match and "1" in images and match.group(1) in images:
                    self.pairs.append((images["1"], images[match.group(1)], flow))
        if not self.pairs:
            raise ValueError(
                f"no pair found under {root} "
                f"(expected 1.<ext>, k.<ext> and {self.pattern.pattern})"
            )

    def __len__(self) -> int:
        return len(self.pairs)

    def flow(self, path: Path, height: int, width: int) -> np.ndarray:
        raise NotImplementedError

    def pair(self, index: int, rng: np.random.Generator) -> Pair:
        """The ``index``-th pair (``rng`` unused: these pairs are fixed)."""
        path1, path2, flow = self.pairs[index]
        image1 = read_image(path1)
        return Pair(image1, read_image(path2), self.flow(flow, *image1.shape[:2]))


class HomographyPairs(_SequencePairs):
    """HPatches-style pairs: ``1.ppm``, ``k.ppm`` and ``H_1_k`` (3 x 3 text homography
    from image-1 to image-k pixels), in ``root`` or any folder below it."""

    pattern = re.compile(r"H_1_(\w+)")

    def flow(self, path: Path, height: int, width: int) -> np.ndarray:
        homography = np.loadtxt(path)
        if homography.shape != (3, 3):
            raise ValueError(f"{path}: expected a 3 x 3 homography, got shape {homography.shape}")
        return homography_flow(homography, height, width)


class FlowPairs(_SequencePairs):
    """Pairs with a stored dense flow: ``1.<ext>``, ``k.<ext>`` and ``flow_1_k.npy``
    holding the absolute flow (2, H1, W1) or (H1, W1, 2) float, in image-k pixels, NaN
    where undefined, in ``root`` or any folder below it."""

    pattern = re.compile(r"flow_1_(\w+)\.npy")

    def flow(self, path: Path, height: int, width: int) -> np.ndarray:
        flow = np.load(path, allow_pickle=False).astype(np.float32)
        if flow.shape == (height, width, 2):
            flow = flow.transpose(2, 0, 1)
        if flow.shape != (2, height, width):
            raise ValueError(
                f"{path}: expected flow of shape (2, {height}, {width}), got {flow.shape}"
            )
        return np.ascontiguousarray(flow)


def _invalidate_outside(aflow: np.ndarray, height: int, width: int) -> np.ndarray:
    """NaN wherever the target falls outside a height x width image."""
    x, y = aflow
    with np.errstate(invalid="ignore"):
        outside = ~((x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5))
    aflow = aflow.copy()
    aflow[:, outside] = np.nan
    return aflow


def _resample(image: np.ndarray, zoom: float, origin: Tuple[float, float], size: int) -> np.ndarray:
    """The size x size crop whose pixel (u, v) shows image point origin + zoom (u, v)."""
    if zoom > 1:
        # Antialias before shrinking; only the region the crop covers is blurred.
        sigma = (zoom - 1) / 2
        margin = int(math.ceil(3 * sigma)) + 2
        height, width = image.shape[:2]
        x0 = min(max(int(math.floor(origin[0])) - margin, 0), width)
        y0 = min(max(int(math.floor(origin[1])) - margin, 0), height)
        x1 = max(min(int(math.ceil(origin[0] + zoom * size)) + margin, width), x0)
        y1 = max(min(int(math.ceil(origin[1] + zoom * size)) + margin, height), y0)
        if x1 - x0 < 1 or y1 - y0 < 1:
            return np.zeros((size, size) + image.shape[2:], image.dtype)
        image = cv2.GaussianBlur(image[y0:y1, x0:x1], (0, 0), sigma)
        origin = (origin[0] - x0, origin[1] - y0)
    matrix = np.float64([[zoom, 0, origin[0]], [0, zoom, origin[1]]])
    return cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT, borderValue=0,
    )


def _crop_flow(aflow: np.ndarray, window1: Tuple[float, float, float],
               window2: Tuple[float, float, float], size: int) -> np.ndarray:
    """aflow between two crops, each given as (zoom, x origin, y origin)."""
    zoom1, x1, y1 = window1
    zoom2, x2, y2 = window2
    ramp = np.arange(size, dtype=np.float32) * np.float32(zoom1)
    map_x = np.broadcast_to(ramp[None, :] + np.float32(x1), (size, size)).copy()
    map_y = np.broadcast_to(ramp[:, None] + np.float32(y1), (size, size)).copy()
    flow = np.stack([
        cv2.remap(channel, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                  borderValue=float("nan"))
        for channel in aflow
    ])
    flow[0] = (flow[0] - x2) / zoom2
    flow[1] = (flow[1] - y2) / zoom2
    return _invalidate_outside(flow, size, size)


def _local_scale(aflow: np.ndarray, x: int, y: int, radius: int = 4) -> float:
    """sqrt |det J| of the flow at (x, y): image-2 pixels per image-1 pixel (NaN if unknown)."""
    height, width = aflow.shape[1:]
    xa, xb = max(x - radius, 0), min(x + radius, width - 1)
    ya, yb = max(y - radius, 0), min(y + radius, height - 1)
    if xb == xa or yb == ya:
        return float("nan")
    dx = (aflow[:, y, xb] - aflow[:, y, xa]) / (xb - xa)
    dy = (aflow[:, yb, x] - aflow[:, ya, x]) / (yb - ya)
    return float(np.sqrt(abs(dx[0] * dy[1] - dx[1] * dy[0])))


class PairDataset(Dataset):
    """Training crops from pair sources.

    For each pair: image 2 is rescaled (shorter side log-uniform in ``scale``); then
    ``crop`` x ``crop`` windows are centred on a random pixel of image 1 with a target
    and on that target, the window of the more zoomed-in image enlarged by the local
    scale of the flow (kept when 1/max_zoom < scale < max_zoom), best of ``tries`` by
    how much of the windows the flow covers; both windows are resampled to ``crop``
    pixels, image 2's is colour-jittered (the crop rather than the whole image, to save
    time: only contrast differs, taken about the crop's mean grey level), and ``aflow``
    is NaN where a target leaves crop 2.

    Items are indexed by ``(epoch, position, index)`` (see :func:`epoch_batches`): the
    pair ``index`` with random draws seeded by (seed, epoch, position).

    Args:
        sources: pair sources (:class:`SyntheticPairs`, :class:`HomographyPairs`, ...).
        crop: crop size in pixels.
        scale: (min, max) shorter side of image 2 in pixels; None keeps the size.
        jitter: (brightness, contrast, saturation, hue) of :func:`color_jitter`; None: off.
        seed: seed of all the random draws.
        tries: number of crop centres tried.
        max_zoom: the largest accepted local scale between the images.
    """

    def __init__(
        self,
        sources: Sequence[object],
        crop: int = 192,
        scale: Optional[Tuple[float, float]] = (256, 1024),
        jitter: Optional[Tuple[float, float, float, float]] = (0.2, 0.2, 0.2, 0.1),
        seed: int = 0,
        tries: int = 5,
        max_zoom: float = 5.0,
    ) -> None:
        self.sources = list(sources)
        if not self.sources or not all(
            hasattr(s, "pair") and hasattr(s, "__len__") for s in self.sources
        ):
            raise TypeError(
                "sources must be a non-empty list of pair sources (with pair() and len())"
            )
        if isinstance(crop, bool) or not isinstance(crop, int) or crop < 8:
            raise ValueError(f"crop must be an int >= 8, got {crop!r}")
        if jitter is not None and len(jitter) != 4:
            raise ValueError(
                f"jitter must be (brightness, contrast, saturation, hue), got {jitter!r}"
            )
        if not max_zoom > 1 or tries < 1:
            raise ValueError(f"expected max_zoom > 1 and tries >= 1, got {max_zoom!r}, {tries!r}")
        self.crop, self.scale, self.jitter = crop, _check_scale(scale), jitter
        self.seed, self.tries, self.max_zoom = int(seed), int(tries), float(max_zoom)
        self._ends = np.cumsum([len(s) for s in self.sources]).tolist()
        if self._ends[-1] == 0:
            raise ValueError("the pair sources are empty")

    def __len__(self) -> int:
        return self._ends[-1]

    def rng(self, epoch: int, position: int) -> np.random.Generator:
        """The generator of the item at ``position`` of ``epoch``."""
        return np.random.default_rng([self.seed, epoch, position])

    def source_pair(self, index: int, rng: np.random.Generator) -> Pair:
        """The uncropped pair ``index`` of the concatenated sources."""
        if not 0 <= index < len(self):
            raise IndexError(f"pair index {index} out of range [0, {len(self)})")
        source = bisect.bisect_right(self._ends, index)
        start = self._ends[source - 1] if source else 0
        return self.sources[source].pair(index - start, rng)

    def sample(self, index: int, rng: np.random.Generator) -> Pair:
        """The ``crop`` x ``crop`` training pair drawn from pair ``index`` with ``rng``."""
        pair = self.source_pair(index, rng)
        image2, aflow = pair.image2, pair.aflow
        if self.scale is not None:
            image2, fx, fy = _rescale(image2, _log_uniform(rng, *self.scale))
            # Pixel centres: x' = (x + 0.5) fx - 0.5, as cv2.resize maps them.
            aflow = np.stack([(aflow[0] + 0.5) * fx - 0.5, (aflow[1] + 0.5) * fy - 0.5])
        aflow = _invalidate_outside(aflow.astype(np.float32), *image2.shape[:2])
        window1, window2 = self._windows(aflow, rng)
        crop2 = _resample(image2, window2[0], window2[1:], self.crop)
        if self.jitter is not None:
            crop2 = color_jitter(crop2, rng, *self.jitter)
        return Pair(
            _resample(pair.image1, window1[0], window1[1:], self.crop),
            crop2,
            _crop_flow(aflow, window1, window2, self.crop),
        )

    def _windows(self, aflow: np.ndarray, rng: np.random.Generator
                 ) -> Tuple[Tuple[float, float, float], Tuple[float, float, float]]:
        """(zoom, x origin, y origin) of the crop windows in images 1 and 2."""
        size = self.crop
        valid = np.flatnonzero(np.isfinite(aflow).all(axis=0))
        height, width = aflow.shape[1:]
        best, best_score = None, -1.0
        for _ in range(self.tries if valid.size else 0):
            y, x = divmod(int(valid[rng.integers(valid.size)]), width)
            scale = _local_scale(aflow, x, y)
            if not 1 / self.max_zoom < scale < self.max_zoom:
                continue
            zoom1, zoom2 = (1.0, scale) if scale >= 1 else (1 / scale, 1.0)
            centre = (size - 1) / 2
            window1 = (zoom1, x - zoom1 * centre, y - zoom1 * centre)
            window2 = (zoom2, aflow[0, y, x] - zoom2 * centre, aflow[1, y, x] - zoom2 * centre)
            flow = _crop_flow(aflow, window1, window2, size)
            hit = np.isfinite(flow).all(axis=0)
            targets = np.unique(np.round(flow[:, hit]).astype(np.int64).T @ np.int64([1, size]))
            score = hit.mean() * targets.size / size**2
            if score > best_score:
                best, best_score = (window1, window2), score
        if best is None:  # no usable centre: the image centres, possibly without any target
            best = ((1.0, (width - size) / 2, (height - size) / 2),
                    (1.0, (width - size) / 2, (height - size) / 2))
        return best

    def __getitem__(self, key: Union[int, Tuple[int, int, int]]) -> Dict[str, torch.Tensor]:
        """``(epoch, position, index)`` (or an index: epoch 0) -> tensors of one pair:
        ``image1``, ``image2`` (3, crop, crop) normalised RGB, ``aflow`` (2, crop, crop)."""
        epoch, position, index = (0, key, key) if isinstance(key, int) else key
        pair = self.sample(index, self.rng(epoch, position))
        return {
            "image1": torch.from_numpy(normalize_image(pair.image1)),
            "image2": torch.from_numpy(normalize_image(pair.image2)),
            "aflow": torch.from_numpy(pair.aflow),
        }


def epoch_batches(
    num_pairs: int, batch_size: int, epoch: int, seed: int, epoch_size: Optional[int] = None
) -> List[List[Tuple[int, int, int]]]:
    """The batches of one epoch, as lists of ``(epoch, position, index)`` keys.

    The pairs are shuffled by a generator seeded with (seed, epoch) and repeated (in new
    random draws) until ``epoch_size`` pairs; by default the dataset size rounded up to
    a whole batch. An incomplete last batch is dropped.
    """
    if num_pairs < 1 or batch_size < 1:
        raise ValueError(f"need num_pairs >= 1 and batch_size >= 1, got {num_pairs}, {batch_size}")
    if epoch_size is None:
        epoch_size = -(-num_pairs // batch_size) * batch_size
    if epoch_size < batch_size:
        raise ValueError(f"epoch_size ({epoch_size}) must be at least batch_size ({batch_size})")
    rng = np.random.default_rng([seed, epoch])
    order = np.concatenate([rng.permutation(num_pairs) for _ in range(-(-epoch_size // num_pairs))])
    keys = [(epoch, position, int(index)) for position, index in enumerate(order[:epoch_size])]
    return [keys[i:i + batch_size] for i in range(0, epoch_size - batch_size + 1, batch_size)]


def collate(items: Iterable[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack items into ``image1``, ``image2`` (B, 3, H, W) and ``aflow`` (B, 2, H, W)."""
    items = list(items)
    return {key: torch.stack([item[key] for item in items]) for key in items[0]}


def make_loader(
    dataset: PairDataset, batches: Sequence[Sequence[Tuple[int, int, int]]], workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader yielding the given batches in order (see :func:`epoch_batches`)."""
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        # A private generator: creating a loader must not consume the global torch RNG,
        # or a resumed run would diverge from an uninterrupted one.
        generator=torch.Generator(),
    )
