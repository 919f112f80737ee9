"""Image -> multi-scale R2D2 keypoints, scores and descriptors: the detection loop.

:func:`extract` walks the pyramid (:mod:`cv2r2d2.pyramid`) level by level, tile by tile
(:mod:`cv2r2d2.tiling`), and keeps the best keypoints: non-maximum suppression, top-k,
sub-pixel refinement and the suppression of one place found on several levels live here
and nowhere else. It is numpy written against the narrow
:class:`~cv2r2d2.runner.NetworkRunner` seam, so that every backend reuses it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import cv2
import numpy as np

from .checks import check_subpixel
from .params import ExtractionParams, Features
from .pyramid import Level, pyramid, walk_levels
from .runner import LevelOutput, NetworkRunner
from .tiling import DEFAULT_TILE_SIZE, grow, level_tiles

__all__ = [
    "extract",
    "peak_offsets",
    "descriptor_shift",
    "close_pairs",
    "unique_across_levels",
]

# The subpixel="descriptor" mean-shift, as measured best by benchmarks/bench_accuracy.py: softmax
# weights (temperature) of the cosine similarity between a keypoint's descriptor and the
# map's on a grid of +-radius level pixels (spacing step), a few iterations, the whole move
# kept within reach level pixels of the parabola's position.
SHIFT_ITERATIONS = 3
SHIFT_RADIUS = 1.5
SHIFT_STEP = 0.5
SHIFT_TEMPERATURE = 0.05
SHIFT_REACH = 1.0


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
        x: (n,) positions in the level's map pixels. Computing in the level's
            coordinates, not the window's, keeps the float32 rounding, and so the
            result, the same however the level is tiled.
        y: (n,) positions, likewise.
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
    levels: Optional[List[Level]] = None,
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
        levels: the image's pyramid when the caller has it at hand
            (:func:`cv2r2d2.pyramid.pyramid` of the image and ``params``); None
            computes it.

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
    if levels is None:
        levels = pyramid(height, width, params)
    for level, handle in walk_levels(runner, image, levels):
        map_h, map_w = runner.output_size(level.height, level.width)
        for core in level_tiles(runner, map_h, map_w, tile_size):
            # Beyond the core: the 3x3 NMS of a core pixel sees true neighbours (and the
            # descriptor shift true samples).
            window = grow(core, map_h, map_w, margin)
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
