"""Image -> multi-scale R2D2 keypoints, scores and descriptors.

The pyramid loop, non-maximum suppression and top-k selection live here and nowhere
else. They are written in numpy against a narrow :class:`NetworkRunner` seam, so that
any backend able to resize an image and run the network (torch now) reuses them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterator, List, Optional, Protocol, Tuple, Union

import cv2
import numpy as np

__all__ = [
    "ExtractionParams",
    "Level",
    "LevelOutput",
    "NetworkRunner",
    "Features",
    "pyramid",
    "reference_pyramid",
    "upsampled_pyramid",
    "check_upsample",
    "extract",
    "describe",
    "dense_maps",
    "descriptor_windows",
    "tiles",
    "halo_window",
    "inside_image",
]

# Keypoint size (patch diameter, pixels) at pyramid scale 1, as in the reference.
PATCH_SIZE = 32.0
# The smallest image side, pixels, the networks run on (the faster one pools by 2).
MIN_SIDE = 2
# Default cap on the pixels of one network run (tile_size ** 2); larger levels are tiled.
# A run peaks at two 128-channel float32 maps of its tile (1 KB per pixel, <= 170 MB at 416):
# brooklyn's default extraction stays under 500 MB for ~4% more halo recomputation than 512.
DEFAULT_TILE_SIZE = 416
# Descriptor windows (keypoint refinement) run on tiles of at most this size, each cut to
# the box of its points: with the Sacre-Coeur tracks at twice the finest resolution, 256
# took 0.85x the time of 416 with PyTorch fp32 and 0.6x with an int8 ONNX export (192 and
# 128: no faster), as smaller boxes skip more of a level and fit the CPU's caches.
WINDOW_TILE_SIZE = 256

Box = Tuple[int, int, int, int]

# The subpixel="descriptor" mean-shift, as measured best by benchmarks/bench_accuracy.py: softmax
# weights (temperature) of the cosine similarity between a keypoint's descriptor and the
# map's on a grid of +-radius level pixels (spacing step), a few iterations, the whole move
# kept within reach level pixels of the parabola's position.
SHIFT_ITERATIONS = 3
SHIFT_RADIUS = 1.5
SHIFT_STEP = 0.5
SHIFT_TEMPERATURE = 0.05
SHIFT_REACH = 1.0


@dataclass
class ExtractionParams:
    """Multi-scale extraction parameters; the defaults are the paper's.

    Attributes:
        scale_f: ratio between consecutive pyramid scales (> 1).
        min_size, max_size: the pyramid spans levels whose longer side lies in
            [min_size, max_size] pixels.
        min_scale, max_scale: and whose scale lies in [min_scale, max_scale]
            (max_scale <= 1: images are never upscaled).
        reliability_thr, repeatability_thr: a keypoint's minimum reliability and
            repeatability, in [0, 1].
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


@dataclass(frozen=True)
class Level:
    """One step of the pyramid: its index, scale, image size and whether it is used."""

    octave: int
    scale: float
    height: int
    width: int
    processed: bool = True

    @property
    def size(self) -> float:
        """Keypoint size (patch diameter in original-image pixels) at this level."""
        return PATCH_SIZE / self.scale


class LevelOutput(Protocol):
    """The network's output on one level, as a backend holds it."""

    reliability: np.ndarray  # (h', w') float32 in [0, 1]
    repeatability: np.ndarray  # (h', w') float32 in [0, 1]

    def descriptors_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n,) float map coordinates -> (n, dim) L2-normalised descriptors (bilinear)."""

    def dense_descriptors(self) -> np.ndarray:
        """(dim, h', w') L2-normalised descriptor map."""


class NetworkRunner(Protocol):
    """What the extractor needs from a backend."""

    descriptor_size: int
    # Input pixels of context run() adds around a box (tiles are sized with it); None:
    # the runner only runs whole images, so levels are not tiled. An absent attribute
    # counts as 0.
    halo: Optional[int]

    def prepare(self, image: np.ndarray) -> Any:
        """(3, H, W) normalised float32 image -> the backend's image handle."""

    def resize(self, image: Any, height: int, width: int) -> Any:
        """Bilinear resize (align_corners=False, no antialiasing) of a handle."""

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Size (h', w') of the maps the network gives for a height x width input."""

    def run(self, image: Any, box: Optional[Box] = None) -> LevelOutput:
        """Run the network on a handle; only the maps inside ``box`` when given.

        ``box`` = (y0, y1, x0, x1) in map coordinates, end excluded. The backend
        adds the context the network's receptive field needs, so the maps inside
        the box equal those of a whole-image run.
        """


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


def reference_pyramid(height: int, width: int, params: ExtractionParams) -> List[Level]:
    """The pyramid steps the reference walks for an image of ``height`` x ``width``.

    Step k has scale ``scale_f ** -k`` and is processed when that scale lies within
    [max(min_scale, min_size / L), min(max_scale, max_size / L)] (L the longer side,
    with the reference's 0.001 tolerance). Steps after the last processed one are
    dropped; a step too small to run (a side < ``MIN_SIDE`` px) ends the pyramid.

    Returns:
        Every step from scale 1 to the last processed one (empty if none is).
    """
    longest = max(height, width)
    lowest = max(params.min_scale, params.min_size / longest)
    highest = min(params.max_scale, params.max_size / longest)
    steps: List[Level] = []
    s, octave, h, w = 1.0, 0, height, width
    while s + 0.001 >= lowest and min(h, w) >= MIN_SIDE:
        steps.append(Level(octave, s, h, w, processed=s - 0.001 <= highest))
        s /= params.scale_f
        octave += 1
        h, w = round(height * s), round(width * s)
    while steps and not steps[-1].processed:
        steps.pop()
    return steps


def pyramid(height: int, width: int, params: ExtractionParams) -> List[Level]:
    """The pyramid steps the extraction walks for an image of ``height`` x ``width``.

    Those of :func:`reference_pyramid`; but where the reference processes no step at
    all (an image whose longer side is under ``min_size``, say, where it finds
    nothing), one step at scale 1: the image is processed at its own size. An image
    with a side under ``MIN_SIDE`` px gets no step.
    """
    steps = reference_pyramid(height, width, params)
    if not steps and min(height, width) >= MIN_SIDE:
        return [Level(0, 1.0, height, width)]
    return steps


def _walk(runner: NetworkRunner, image: np.ndarray, steps: List[Level]) -> Iterator[Tuple[Level, Any]]:
    """Yield (level, image handle) for each processed step."""
    handle = None
    for level in steps:
        if handle is None:
            handle = runner.prepare(image)
            if (level.height, level.width) != tuple(image.shape[1:]):  # an upsampled pyramid
                handle = runner.resize(handle, level.height, level.width)
        else:
            # The reference resizes from the previous step, not from the original
            # image, at every step (processed or not); keep it for parity.
            handle = runner.resize(handle, level.height, level.width)
        if level.processed:
            yield level, handle


def _nms(output: LevelOutput, params: ExtractionParams) -> Tuple[np.ndarray, np.ndarray]:
    """(y, x) of the local maxima of repeatability (3x3) that pass both thresholds."""
    repeatability = output.repeatability
    # cv2.dilate pads with -inf, as the reference's max-pool does.
    local_max = cv2.dilate(repeatability, np.ones((3, 3), np.uint8))
    keep = (repeatability == local_max)
    keep &= repeatability >= np.float32(params.repeatability_thr)
    keep &= output.reliability >= np.float32(params.reliability_thr)
    return np.nonzero(keep)


def _in_mask(mask: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Same pixel lookup as OpenCV's KeyPointsFilter::runByPixelsMask.
    rows = np.clip((y + 0.5).astype(np.int64), 0, mask.shape[0] - 1)
    cols = np.clip((x + 0.5).astype(np.int64), 0, mask.shape[1] - 1)
    return mask[rows, cols] != 0


def _top(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores, best first (ties in input order); k=0: all."""
    order = np.argsort(-scores, kind="stable")
    return order[:k] if k else order


def _edge_margin(length: int, parts: int, halo: int) -> int:
    """How much longer the end boxes of ``parts`` along ``length`` are than inner ones.

    Inner boxes carry a halo on both sides, end boxes on one: making the end boxes
    ``halo`` longer gives all grown boxes about the same size (less than ``halo`` where
    the inner boxes would otherwise drop under 1 pixel).
    """
    return max(0, min(halo, (length - parts) // 2))


def _grown_length(length: int, parts: int, halo: int) -> int:
    """An upper bound on the longest box of :func:`_cuts` grown by its inner halos."""
    if parts == 1:
        return length
    return -(-(length - 2 * _edge_margin(length, parts, halo)) // parts) + 2 * halo


def _cuts(length: int, parts: int, halo: int) -> np.ndarray:
    """(parts + 1,) box edges along one side, from 0 to ``length``."""
    margin = _edge_margin(length, parts, halo)
    edges = np.linspace(margin, length - margin, parts + 1).round().astype(int)
    edges[0], edges[-1] = 0, length
    return edges


def tiles(height: int, width: int, tile_size: int, halo: int) -> List[Box]:
    """Split a height x width map into a grid of boxes (y0, y1, x0, x1).

    Each box grown by ``halo`` on its inner sides holds at most ``tile_size ** 2``
    pixels (unless a single row or column of that size is needed), inner boxes are
    narrower than the end ones so that the grown boxes are about equal (the peak
    memory of a level is its largest grown box's), and the grid is the one with the
    least total area including halos, i.e. the least recomputation. ``tile_size=0``
    never tiles.
    """
    if tile_size <= 0 or height * width <= tile_size * tile_size:
        return [(0, height, 0, width)]
    best = None
    for rows in range(1, height + 1):
        tile_h = _grown_length(height, rows, halo)
        cols = 1
        while cols < width and tile_h * _grown_length(width, cols, halo) > tile_size**2:
            cols += 1
        area = (height + 2 * halo * (rows - 1)) * (width + 2 * halo * (cols - 1))
        if best is None or area < best[0]:
            best = (area, rows, cols)
        if tile_h <= 2 * halo + 1:
            break
    _, rows, cols = best
    ys, xs = _cuts(height, rows, halo), _cuts(width, cols, halo)
    return [(int(ys[i]), int(ys[i + 1]), int(xs[j]), int(xs[j + 1]))
            for i in range(rows) for j in range(cols)]


def _level_tiles(runner: NetworkRunner, height: int, width: int, tile_size: int) -> List[Box]:
    """:func:`tiles` of a height x width map for ``runner``: one box if it cannot crop."""
    halo = getattr(runner, "halo", 0)
    if halo is None:
        return [(0, height, 0, width)]
    return tiles(height, width, tile_size, halo)


def halo_window(
    box: Optional[Box], map_size: Tuple[int, int], image_size: Tuple[int, int],
    halo: Optional[int], alignment: int,
) -> Tuple[slice, slice, slice, slice]:
    """Where a runner crops its input for the maps in ``box``, and where the box lies in the crop's maps.

    Args:
        box: (y0, y1, x0, x1) in map pixels, end excluded; None: the whole map.
        map_size: (h', w') of the whole image's maps; image_size: (H, W) of its input.
        halo: input pixels of context each side (None: crop nothing, run the whole image).
        alignment: the crop begins at a multiple of it (the network's pooling factor), so
            the crop's pooling grid is the whole image's.

    Returns:
        (input rows, input columns, box rows, box columns) as slices; the crop's maps
        inside the box slices equal the whole image's maps inside ``box``.
    """
    y0, y1, x0, x1 = box if box is not None else (0, map_size[0], 0, map_size[1])

    def along(start: int, stop: int, length: int) -> Tuple[int, int]:
        if halo is None:
            return 0, length
        begin = max(0, start - halo)
        begin -= begin % alignment
        return begin, min(length, stop + halo)

    top, bottom = along(y0, y1, image_size[0])
    left, right = along(x0, x1, image_size[1])
    return slice(top, bottom), slice(left, right), slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)


def _grow(box: Box, height: int, width: int, margin: int = 1) -> Box:
    y0, y1, x0, x1 = box
    return max(0, y0 - margin), min(height, y1 + margin), max(0, x0 - margin), min(width, x1 + margin)


def peak_offsets(values: np.ndarray, y: np.ndarray, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sub-pixel offsets of local maxima by a parabola through each axis' 3 samples.

    Args:
        values: (h, w) map; y, x: (n,) integer positions of its local maxima.

    Returns:
        (dy, dx), (n,) float32 each in [-0.5, 0.5]; 0 on the map's border and where
        the samples are flat.
    """
    def along(axis: int) -> np.ndarray:
        pos = y if axis == 0 else x
        size = values.shape[axis]
        lo, hi = np.maximum(pos - 1, 0), np.minimum(pos + 1, size - 1)
        before = values[lo, x] if axis == 0 else values[y, lo]
        after = values[hi, x] if axis == 0 else values[y, hi]
        centre = values[y, x]
        curvature = before - 2 * centre + after
        with np.errstate(divide="ignore", invalid="ignore"):
            offset = np.where(
                (curvature < 0) & (lo < pos) & (hi > pos), 0.5 * (before - after) / curvature, 0
            )
        return np.clip(offset, -0.5, 0.5).astype(np.float32)

    return along(0), along(1)


class _TopK:
    """Running best-``k`` keypoints (k = 0: all), so memory stays bounded.

    Columns are (scores, octaves, positions, ...), positions row-major indices in the
    level's map: equal scores rank by level, then row-major position, however the
    levels were tiled.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self.parts: List[Tuple[np.ndarray, ...]] = []
        self.count = 0

    def add(self, *columns: np.ndarray) -> None:
        self.parts.append(columns)
        self.count += len(columns[0])
        if self.k and self.count > 2 * self.k:
            self.parts = [self.result()]
            self.count = len(self.parts[0][0])

    def result(self) -> Tuple[np.ndarray, ...]:
        columns = [np.concatenate(c) for c in zip(*self.parts)]
        scores, octaves, positions = columns[:3]
        order = np.lexsort((positions, octaves, -scores))
        if self.k:
            order = order[:self.k]
        return tuple(c[order] for c in columns)


def check_subpixel(subpixel: Any) -> Union[bool, str]:
    """``subpixel`` as extract() takes it: True/False, or "descriptor"."""
    if isinstance(subpixel, (bool, np.bool_)):
        return bool(subpixel)
    if not isinstance(subpixel, str):
        raise TypeError(f"subpixel must be True, False or 'descriptor', got {subpixel!r}")
    if subpixel != "descriptor":
        raise ValueError(f"subpixel must be True, False or 'descriptor', got {subpixel!r}")
    return subpixel


def descriptor_shift(
    output: LevelOutput, x: np.ndarray, y: np.ndarray, size: Tuple[int, int],
    origin: Tuple[int, int] = (0, 0), iterations: int = SHIFT_ITERATIONS,
    radius: float = SHIFT_RADIUS, step: float = SHIFT_STEP,
    temperature: float = SHIFT_TEMPERATURE, reach: float = SHIFT_REACH,
) -> Tuple[np.ndarray, np.ndarray]:
    """Move keypoints to the centre of the map region their descriptor resembles.

    Each iteration samples the descriptor at the current position and the map on a grid
    of +-``radius`` pixels around it (spacing ``step``), and moves to the soft-argmax of
    their cosine similarities (softmax at ``temperature``): a mean-shift on the
    descriptor's self-similarity, a smooth function of the map, so the same place in two
    images lands on the same point more often than the repeatability peak alone does.

    Args:
        output: the network output of a level, or of the window of it that begins at
            ``origin`` = (x0, y0) map pixels.
        x, y: (n,) positions in the level's map pixels. Computing in the level's
            coordinates, not the window's, keeps the float32 rounding, and so the
            result, the same however the level is tiled.
        size: (w', h') of the level's whole map. Positions stay within its outermost
            samples, [0, w' - 1] x [0, h' - 1]: beyond them the bilinear samples repeat
            the border's descriptors, which would pull keypoints past it (and out of
            the image) for no reason in the image.

    Returns:
        (x, y), (n,) float32 level map positions, each within ``reach`` pixels of its
        start (per axis) and within the map's samples.
    """
    offsets = np.arange(-radius, radius + step / 2, step, dtype=np.float32)
    grid_y, grid_x = (g.reshape(-1) for g in np.meshgrid(offsets, offsets, indexing="ij"))
    x0, y0 = np.float32(origin[0]), np.float32(origin[1])
    x, y = np.array(x, np.float32), np.array(y, np.float32)
    # At most 2 ** 15 samples at a time (16 MB of 128-d descriptors), however many keypoints.
    chunk = max(1, 2**15 // len(grid_x))
    for part in range(0, len(x), chunk):
        rows = slice(part, part + chunk)
        px, py = x[rows], y[rows]
        low_x, high_x = np.maximum(px - reach, 0), np.minimum(px + reach, np.float32(size[0] - 1))
        low_y, high_y = np.maximum(py - reach, 0), np.minimum(py + reach, np.float32(size[1] - 1))
        for _ in range(iterations):
            own = output.descriptors_at(px - x0, py - y0)
            samples = output.descriptors_at(((px[:, None] + grid_x) - x0).reshape(-1),
                                            ((py[:, None] + grid_y) - y0).reshape(-1))
            # Row-wise sums rather than BLAS products: each keypoint's result must not
            # depend on which others share its chunk (tiles group them differently).
            similarity = (samples.reshape(len(px), len(grid_x), -1) * own[:, None]).sum(axis=2)
            weights = np.exp((similarity - similarity.max(axis=1, keepdims=True)) / temperature)
            weights /= weights.sum(axis=1, keepdims=True)
            px = np.clip(px + (weights * grid_x).sum(axis=1), low_x, high_x)
            py = np.clip(py + (weights * grid_y).sum(axis=1), low_y, high_y)
        x[rows], y[rows] = px, py
    return x, y


def close_pairs(xy: np.ndarray, radius: float) -> Tuple[np.ndarray, np.ndarray]:
    """All pairs of points within ``radius`` of each other, found on a grid of cells.

    Args:
        xy: (N, 2) positions; radius: > 0, same unit.

    Returns:
        (i, j), (M,) int64 each with i < j and ``|xy[i] - xy[j]| <= radius``, in no
        particular order. Each point is compared with those of its own and the 8
        neighbouring cells of side ``radius`` only, so the cost grows with N and the
        local density, not with N ** 2.
    """
    xy = np.asarray(xy, np.float64).reshape(-1, 2)
    if len(xy) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    cells = np.floor((xy - xy.min(axis=0)) / radius).astype(np.int64) + 1
    stride = int(cells[:, 1].max()) + 2
    order = np.argsort(cells[:, 0] * stride + cells[:, 1], kind="stable")
    keys = cells[order, 0] * stride + cells[order, 1]  # sorted
    firsts, seconds = [], []
    # The 4 cells ahead of a point's own in key order, and its own: each close pair once.
    for offset in (0, 1, stride - 1, stride, stride + 1):
        begin = np.searchsorted(keys, keys + offset, "left")
        count = np.searchsorted(keys, keys + offset, "right") - begin
        if offset == 0:  # within the own cell, only the points after this one
            count -= np.arange(len(keys)) + 1 - begin
            begin = np.arange(len(keys)) + 1
        first = np.repeat(np.arange(len(keys)), count)
        # Positions begin[p], ..., begin[p] + count[p] - 1 for each point p, flattened.
        within = np.arange(len(first)) - np.repeat(np.cumsum(count) - count, count)
        firsts.append(first)
        seconds.append(np.repeat(begin, count) + within)
    i, j = np.sort([order[np.concatenate(firsts)], order[np.concatenate(seconds)]], axis=0)
    close = ((xy[i] - xy[j]) ** 2).sum(axis=1) <= radius * radius
    return i[close], j[close]


def unique_across_levels(xy: np.ndarray, octaves: np.ndarray, radius: float) -> np.ndarray:
    """Greedy suppression of the same place found on several pyramid levels.

    Args:
        xy: (N, 2) keypoint positions in image pixels, best-ranked first.
        octaves: (N,) their pyramid levels; radius: pixels, > 0.

    Returns:
        (N,) bool, the keypoints kept: in rank order, a keypoint is kept unless a kept
        better-ranked keypoint of another level lies within ``radius`` (keypoints of
        one level never suppress each other: their level's 3x3 non-maximum
        suppression already separates them).
    """
    i, j = close_pairs(xy, radius)
    other = octaves[i] != octaves[j]
    better, worse = i[other], j[other]  # i < j: i ranks better
    undecided, kept = np.ones(len(xy), bool), np.zeros(len(xy), bool)
    # Each pass settles every keypoint whose better neighbours are settled, among them
    # the best undecided one, so it ends; real images need a handful of passes.
    while undecided.any():
        beaten = np.zeros(len(xy), bool)
        beaten[worse[kept[better]]] = True
        waiting = np.zeros(len(xy), bool)
        waiting[worse[undecided[better]]] = True
        kept |= undecided & ~beaten & ~waiting
        undecided &= ~beaten & waiting
        live = undecided[worse]
        better, worse = better[live], worse[live]
    return kept


def extract(
    runner: NetworkRunner,
    image: np.ndarray,
    params: ExtractionParams,
    mask: Optional[np.ndarray] = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    subpixel: Union[bool, str] = False,
) -> Features:
    """Detect and describe R2D2 keypoints over the image pyramid.

    Args:
        runner: the network backend.
        image: (3, H, W) float32 normalised RGB image (see ``image.normalize_image``).
        params: extraction parameters.
        mask: optional (H, W) uint8; keypoints are kept where it is non-zero.
        tile_size: levels larger than tile_size**2 pixels run on overlapping tiles
            (same output, bounded memory); 0 never tiles.
        subpixel: True refines each position by a quadratic fit to its repeatability
            peak; ``"descriptor"`` then moves it further by :func:`descriptor_shift` on
            its level's descriptor map; each keypoint is described where it ends. False:
            the reference's integer positions.

    Returns:
        The ``nfeatures`` best keypoints over all levels, sorted by decreasing score
        (equal scores in level, then row-major order), after the suppression of
        cross-level duplicates when ``params.unique_radius`` > 0.
    """
    check_subpixel(subpixel)
    height, width = image.shape[1:]
    # Map pixels a tile's window reaches beyond it: the 3x3 NMS needs 1, the shift's
    # samples its reach, grid radius and the bilinear neighbour.
    margin = 1 + math.ceil(SHIFT_REACH + SHIFT_RADIUS) if subpixel == "descriptor" else 1
    # Suppression can drop any keypoint, so every candidate must reach it.
    budget = 0 if params.unique_radius > 0 else params.nfeatures
    best = _TopK(budget)
    for level, handle in _walk(runner, image, pyramid(height, width, params)):
        map_h, map_w = runner.output_size(level.height, level.width)
        for core in _level_tiles(runner, map_h, map_w, tile_size):
            # Beyond the core: the 3x3 NMS of a core pixel sees true neighbours (and the
            # descriptor shift true samples).
            window = _grow(core, map_h, map_w, margin)
            output = runner.run(handle, window)
            y, x = _nms(output, params)
            y += window[0]
            x += window[2]
            inside = (y >= core[0]) & (y < core[1]) & (x >= core[2]) & (x < core[3])
            y, x = y[inside], x[inside]
            # Reference rounding: (x * W) / w in float32, w the level image's width.
            px = x.astype(np.float32) * np.float32(width) / np.float32(level.width)
            py = y.astype(np.float32) * np.float32(height) / np.float32(level.height)
            wy, wx = y - window[0], x - window[2]
            scores = output.reliability[wy, wx] * output.repeatability[wy, wx]
            keep = np.ones(len(scores), bool) if mask is None else _in_mask(mask, px, py)
            # Without suppression only the window's own best nfeatures can make the top-k.
            chosen = np.flatnonzero(keep)[_top(scores[keep], budget)]
            chosen.sort()
            sample_x, sample_y = wx[chosen].astype(np.float32), wy[chosen].astype(np.float32)
            if subpixel:
                dy, dx = peak_offsets(output.repeatability, wy[chosen], wx[chosen])
                if subpixel == "descriptor":
                    shifted_x, shifted_y = descriptor_shift(
                        output, (x[chosen] + dx).astype(np.float32),
                        (y[chosen] + dy).astype(np.float32), (map_w, map_h),
                        origin=(window[2], window[0]))
                    dx, dy = shifted_x - x[chosen], shifted_y - y[chosen]  # exact
                # Pixel centres kept consistent between the level and the image.
                px[chosen] = (x[chosen] + dx + 0.5) * np.float32(width / level.width) - 0.5
                py[chosen] = (y[chosen] + dy + 0.5) * np.float32(height / level.height) - 0.5
                # Described where they now are: bilinear samples at the refined position
                # match more and better than the integer position's descriptor
                # (benchmarks/bench_accuracy.py).
                sample_x += dx
                sample_y += dy
            best.add(
                scores[chosen], np.full(len(chosen), level.octave, np.int32),
                y[chosen].astype(np.int64) * map_w + x[chosen],
                px[chosen], py[chosen], np.full(len(chosen), np.float32(level.size), np.float32),
                output.descriptors_at(sample_x, sample_y),
            )
            del output  # free this tile's maps before the next tile runs
    if not best.parts:
        return _empty_features(runner.descriptor_size)
    columns = best.result()
    if params.unique_radius > 0:
        _, octaves, _, px, py = columns[:5]
        kept = unique_across_levels(np.stack([px, py], axis=1), octaves, params.unique_radius)
        chosen = np.flatnonzero(kept)[:params.nfeatures or None]
        columns = tuple(c[chosen] for c in columns)
    scores, octaves, _, px, py, sizes, descriptors = columns
    return Features(
        xy=np.stack([px, py], axis=1), sizes=sizes, scores=scores, octaves=octaves,
        descriptors=descriptors,
    )


def _empty_features(dim: int) -> Features:
    return Features(
        xy=np.zeros((0, 2), np.float32),
        sizes=np.zeros(0, np.float32),
        scores=np.zeros(0, np.float32),
        octaves=np.zeros(0, np.int32),
        descriptors=np.zeros((0, dim), np.float32),
    )


def _level_choice(sizes: np.ndarray, levels: List[Level]) -> np.ndarray:
    """Index of the level whose keypoint size is closest (by ratio) to each size."""
    level_sizes = np.log([level.size for level in levels])
    with np.errstate(divide="ignore", invalid="ignore"):
        log_sizes = np.where(sizes > 0, np.log(np.maximum(sizes, 1e-30)), -np.inf)
    return np.abs(log_sizes[:, None] - level_sizes[None, :]).argmin(axis=1)


def upsampled_pyramid(height: int, width: int, params: ExtractionParams,
                      upsample: float = 1.0) -> List[Level]:
    """The extraction's pyramid extended by finer levels: that of the image upsampled by
    ``upsample`` with ``max_size`` scaled alike, so its finest level has ``upsample``
    times the resolution of the extraction's finest (2: twice) and its coarsest is
    about the extraction's. Level sizes and scales are those of the upsampled image: a
    level's keypoint size in original-image pixels is ``level.size / upsample``.
    ``upsample`` 1: the extraction's pyramid."""
    if upsample == 1:
        return pyramid(height, width, params)
    scaled = replace(params, max_size=params.max_size * upsample)
    return pyramid(round(height * upsample), round(width * upsample), scaled)


def check_upsample(upsample: Any) -> float:
    """``upsample`` as :func:`descriptor_windows` takes it: a finite number > 0."""
    if isinstance(upsample, (bool, np.bool_)) \
            or not isinstance(upsample, (int, float, np.integer, np.floating)):
        raise TypeError(f"upsample must be a number, got {upsample!r}")
    if not (math.isfinite(upsample) and upsample > 0):
        raise ValueError(f"upsample must be a finite number > 0, got {upsample!r}")
    return float(upsample)


def _at_levels(
    runner: NetworkRunner,
    image: np.ndarray,
    xy: np.ndarray,
    sizes: np.ndarray,
    params: ExtractionParams,
    tile_size: int,
    centred: bool = False,
    margin: int = 1,
    upsample: float = 1.0,
) -> Iterator[Tuple[np.ndarray, Level, LevelOutput, np.ndarray, np.ndarray, Box]]:
    """Network outputs around points, each on the level its size picks.

    Yields, per level and tile holding some points: their indices, the level, the
    window's output, their (x, y) in the window's map pixels, and the window: the
    box of the tile's points (the pixels they and their right and lower neighbours
    lie on) grown by ``margin`` map pixels. ``centred`` maps image to
    map pixels with consistent pixel centres, (x + 0.5) w / W - 0.5, as sub-pixel
    keypoints are mapped; else as x w / W, the inverse of the reference's mapping.
    ``upsample`` > 1 walks :func:`upsampled_pyramid` (sizes stay in image pixels).
    """
    height, width = image.shape[1:]
    steps = upsampled_pyramid(height, width, params, upsample)
    levels = [level for level in steps if level.processed]
    if not len(xy) or not levels:
        return
    choice = _level_choice(sizes * np.float32(upsample), levels)
    shift = np.float32(0.5 if centred else 0)
    for index, (level, handle) in enumerate(_walk(runner, image, steps)):
        rows = np.flatnonzero(choice == index)
        if not len(rows):
            continue
        map_h, map_w = runner.output_size(level.height, level.width)
        mx = np.clip((xy[rows, 0] + shift) * np.float32(level.width / width) - shift, 0, map_w - 1)
        my = np.clip((xy[rows, 1] + shift) * np.float32(level.height / height) - shift, 0, map_h - 1)
        for core in _level_tiles(runner, map_h, map_w, tile_size):
            inside = (my >= core[0]) & (my < core[1]) & (mx >= core[2]) & (mx < core[3])
            if not inside.any():
                continue
            # Only the part of the tile its points read: the maps inside any box are
            # the whole level's, so a smaller box changes nothing but the work.
            x0, y0 = np.floor(mx[inside].min()), np.floor(my[inside].min())
            x1, y1 = np.floor(mx[inside].max()) + 1, np.floor(my[inside].max()) + 1
            window = _grow((int(y0), int(y1), int(x0), int(x1)), map_h, map_w, margin)
            output = runner.run(handle, window)
            yield (rows[inside], level, output, mx[inside] - np.float32(window[2]),
                   my[inside] - np.float32(window[0]), window)
            del output  # free this tile's maps before the next tile runs


def inside_image(xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N,) bool: which of the (N, 2) positions (x, y) are finite and inside a height x
    width image, 0 <= x < width and 0 <= y < height (the range every extraction mode
    returns)."""
    return (
        np.isfinite(xy).all(axis=1)
        & (xy[:, 0] >= 0) & (xy[:, 0] < width)
        & (xy[:, 1] >= 0) & (xy[:, 1] < height)
    )


def describe(
    runner: NetworkRunner,
    image: np.ndarray,
    xy: np.ndarray,
    sizes: np.ndarray,
    params: ExtractionParams,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> Tuple[np.ndarray, np.ndarray]:
    """Descriptors at given keypoints (e.g. from SIFT or ORB).

    Each keypoint is described on the processed level whose R2D2 keypoint size
    (32 / scale) is closest to its own size (by ratio), by bilinear sampling of the raw
    descriptor map at its position, then L2 normalisation.

    Args:
        runner: the network backend.
        image: (3, H, W) normalised image.
        xy: (N, 2) positions in original-image pixels.
        sizes: (N,) keypoint diameters in pixels (non-positive: the finest level).
        params: extraction parameters (they define the levels).
        tile_size: as for :func:`extract`.

    Returns:
        descriptors (M, dim) float32 and the (M,) indices of the keypoints kept: those
        inside the image (0 <= x < W, 0 <= y < H); the others are dropped as
        OpenCV's ``compute`` drops them (all are, on an image with no pyramid step).
    """
    xy = np.asarray(xy, np.float32).reshape(-1, 2)
    sizes = np.asarray(sizes, np.float32).reshape(-1)
    kept = np.flatnonzero(inside_image(xy, *image.shape[1:]))
    if not pyramid(*image.shape[1:], params):  # too thin for the network: nothing to sample
        kept = kept[:0]
    descriptors = np.zeros((len(kept), runner.descriptor_size), np.float32)
    # One pixel more than the tile: bilinear sampling reads the next pixel too.
    for rows, _, output, x, y, _ in _at_levels(runner, image, xy[kept], sizes[kept], params,
                                               tile_size):
        descriptors[rows] = output.descriptors_at(x, y)
    return descriptors, kept


def refine_matches(
    runner: NetworkRunner,
    image: np.ndarray,
    xy: np.ndarray,
    sizes: np.ndarray,
    descriptors: np.ndarray,
    params: ExtractionParams,
    radius: float = 1.5,
    step: float = 0.25,
    temperature: float = 0.01,
    tile_size: int = DEFAULT_TILE_SIZE,
) -> np.ndarray:
    """Move matched keypoints to where their partners' descriptors fit best.

    Around each keypoint, on its level, the dense descriptor map is sampled on a grid
    (+-``radius`` map pixels, spacing ``step``); the new position is the soft-argmax of
    the cosine similarity with the partner's descriptor (softmax at ``temperature``).

    Args:
        image: (3, H, W) normalised image the keypoints belong to.
        xy: (N, 2) matched keypoint positions in image pixels; sizes: (N,) their sizes.
        descriptors: (N, dim) the partners' L2-normalised descriptors, row for row.

    Returns:
        (N, 2) float32 refined positions in image pixels (consistent pixel centres),
        inside the image: a soft-argmax beyond the map's outermost samples, where its
        bilinear samples only repeat the border, is held at them. Points outside the
        image are returned unchanged.
    """
    height, width = image.shape[1:]
    xy = np.asarray(xy, np.float32).reshape(-1, 2)
    sizes = np.asarray(sizes, np.float32).reshape(-1)
    refined = xy.copy()
    kept = np.flatnonzero(inside_image(xy, height, width))
    offsets = np.arange(-radius, radius + step / 2, step, dtype=np.float32)
    grid_y, grid_x = (g.reshape(-1) for g in np.meshgrid(offsets, offsets, indexing="ij"))
    chunk = max(1, 2**22 // (len(grid_x) * runner.descriptor_size))  # ~16 MB of samples
    margin = int(np.ceil(radius)) + 1
    for rows, level, output, x, y, window in _at_levels(
        runner, image, xy[kept], sizes[kept], params, tile_size, centred=True, margin=margin
    ):
        for part in range(0, len(rows), chunk):
            r = rows[part:part + chunk]
            px, py = x[part:part + chunk], y[part:part + chunk]
            samples = output.descriptors_at((px[:, None] + grid_x).reshape(-1),
                                            (py[:, None] + grid_y).reshape(-1))
            similarity = np.einsum("ngd,nd->ng", samples.reshape(len(r), len(grid_x), -1),
                                   descriptors[kept[r]].astype(np.float32))
            weights = np.exp((similarity - similarity.max(axis=1, keepdims=True)) / temperature)
            weights /= weights.sum(axis=1, keepdims=True)
            map_h, map_w = runner.output_size(level.height, level.width)
            map_x = np.clip(px + weights @ grid_x + np.float32(window[2]), 0, map_w - 1)
            map_y = np.clip(py + weights @ grid_y + np.float32(window[0]), 0, map_h - 1)
            refined[kept[r], 0] = (map_x + 0.5) * np.float32(width / level.width) - 0.5
            refined[kept[r], 1] = (map_y + 0.5) * np.float32(height / level.height) - 0.5
    return refined


def descriptor_windows(
    runner: NetworkRunner,
    image: np.ndarray,
    xy: np.ndarray,
    sizes: np.ndarray,
    offsets: np.ndarray,
    params: ExtractionParams,
    tile_size: int = DEFAULT_TILE_SIZE,
    dtype: Any = np.float32,
    upsample: float = 1.0,
) -> Tuple[np.ndarray, np.ndarray]:
    """Descriptors on a grid of offsets around points, each point on the level its size picks.

    Points are mapped to their level's map with consistent pixel centres, as sub-pixel
    keypoints are; the dense descriptor map is sampled bilinearly at each point plus each
    offset and L2-normalised (positions beyond the map are clamped to its border). Only
    these windows are kept, never a whole map.

    Args:
        image: (3, H, W) normalised image.
        xy: (N, 2) positions in image pixels, inside the image.
        sizes: (N,) keypoint diameters in pixels (as :func:`describe`; non-positive:
            the finest processed level).
        offsets: (K, 2) (dx, dy) in map pixels of each point's level.
        tile_size: as for :func:`extract`, capped at ``WINDOW_TILE_SIZE`` (faster here).
        dtype: of the returned windows (float16 halves their memory).
        upsample: the levels are those of :func:`upsampled_pyramid` (2: down to twice
            the finest level's resolution, the image upsampled bilinearly).

    Returns:
        (N, K, dim) descriptors and (N, 2) float32 image pixels per map pixel (x, y) of
        each point's level, which turn offsets into image pixels.
    """
    xy = np.asarray(xy, np.float32).reshape(-1, 2)
    sizes = np.asarray(sizes, np.float32).reshape(-1)
    offsets = np.asarray(offsets, np.float32).reshape(-1, 2)
    height, width = image.shape[1:]
    windows = np.zeros((len(xy), len(offsets), runner.descriptor_size), dtype)
    steps = np.ones((len(xy), 2), np.float32)
    # A window reads one map pixel beyond its farthest offset (bilinear sampling).
    margin = int(np.ceil(np.abs(offsets).max(initial=0))) + 1
    chunk = max(1, 2**22 // (max(len(offsets), 1) * runner.descriptor_size))  # ~16 MB of samples
    if tile_size > 0:
        tile_size = min(tile_size, WINDOW_TILE_SIZE)
    for rows, level, output, x, y, _ in _at_levels(
        runner, image, xy, sizes, params, tile_size, centred=True, margin=margin,
        upsample=check_upsample(upsample),
    ):
        for part in range(0, len(rows), chunk):
            r = rows[part:part + chunk]
            px, py = x[part:part + chunk], y[part:part + chunk]
            samples = output.descriptors_at((px[:, None] + offsets[:, 0]).reshape(-1),
                                            (py[:, None] + offsets[:, 1]).reshape(-1))
            windows[r] = samples.reshape(len(r), len(offsets), -1)
        steps[rows] = (width / level.width, height / level.height)
    return windows, steps


def dense_maps(runner: NetworkRunner, image: np.ndarray, scale: float = 1.0) -> dict:
    """The network's dense outputs on the image resized by ``scale`` (one level).

    Returns:
        dict with ``descriptors`` (dim, h, w), ``reliability`` and ``repeatability``
        (h, w), float32.
    """
    if not (isinstance(scale, (int, float)) and 0 < scale <= 1):
        raise ValueError(f"scale must lie in (0, 1], got {scale!r}")
    height, width = image.shape[1:]
    size = (round(height * scale), round(width * scale))
    if min(size) < 2:
        raise ValueError(
            f"scale {scale!r} makes the {height}x{width} image {size[0]}x{size[1]} pixels; "
            "the network needs at least 2x2"
        )
    handle = runner.prepare(image)
    if scale != 1:
        handle = runner.resize(handle, *size)
    output = runner.run(handle)
    return {
        "descriptors": output.dense_descriptors(),
        "reliability": output.reliability,
        "repeatability": output.repeatability,
    }
