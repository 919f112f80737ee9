"""Sampling the network's outputs at given points, each on the level its size picks.

Descriptors at given keypoints (:func:`describe`), matches moved to where their partners'
descriptors fit best (:func:`refine_matches`), descriptor windows around points
(:func:`descriptor_windows`) and one level's dense maps (:func:`dense_maps`).
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from .checks import check_upsample
from .params import ExtractionParams, inside_image
from .pyramid import Level, level_choice, pyramid, upsampled_pyramid, walk_levels
from .runner import Box, LevelOutput, NetworkRunner
from .tiling import DEFAULT_TILE_SIZE, WINDOW_TILE_SIZE, grow, level_tiles

__all__ = [
    "sample_at_levels", "describe", "refine_matches", "descriptor_windows", "dense_maps",
]


def sample_at_levels(
    runner: NetworkRunner,
    image: np.ndarray,
    xy: np.ndarray,
    sizes: np.ndarray,
    params: ExtractionParams,
    tile_size: int,
    centred: bool = False,
    margin: int = 1,
    upsample: float = 1.0,
    levels: Optional[List[Level]] = None,
) -> Iterator[Tuple[np.ndarray, Level, LevelOutput, np.ndarray, np.ndarray, Box]]:
    """Network outputs around points, each on the level its size picks.

    Yields, per level and tile holding some points: their indices, the level, the
    window's output, their (x, y) in the window's map pixels, and the window: the
    box of the tile's points (the pixels they and their right and lower neighbours
    lie on) grown by ``margin`` map pixels. ``centred`` maps image to
    map pixels with consistent pixel centres, (x + 0.5) w / W - 0.5, as sub-pixel
    keypoints are mapped; else as x w / W, the inverse of the reference's mapping.
    ``upsample`` > 1 walks :func:`upsampled_pyramid` (sizes stay in image pixels);
    ``levels``: that pyramid when the caller has it at hand (None: computed here).
    """
    height, width = image.shape[1:]
    if levels is None:
        levels = upsampled_pyramid(height, width, params, upsample)
    processed = [level for level in levels if level.processed]
    if not len(xy) or not processed:
        return
    choice = level_choice(sizes * np.float32(upsample), processed)
    shift = np.float32(0.5 if centred else 0)
    for index, (level, handle) in enumerate(walk_levels(runner, image, levels)):
        rows = np.flatnonzero(choice == index)
        if not len(rows):
            continue
        map_h, map_w = runner.output_size(level.height, level.width)
        mx = np.clip((xy[rows, 0] + shift) * np.float32(level.width / width) - shift, 0, map_w - 1)
        my = np.clip((xy[rows, 1] + shift) * np.float32(level.height / height) - shift, 0, map_h - 1)
        for core in level_tiles(runner, map_h, map_w, tile_size):
            inside = (my >= core[0]) & (my < core[1]) & (mx >= core[2]) & (mx < core[3])
            if not inside.any():
                continue
            # Only the part of the tile its points read: the maps inside any box are
            # the whole level's, so a smaller box changes nothing but the work.
            x0, y0 = np.floor(mx[inside].min()), np.floor(my[inside].min())
            x1, y1 = np.floor(mx[inside].max()) + 1, np.floor(my[inside].max()) + 1
            window = grow((int(y0), int(y1), int(x0), int(x1)), map_h, map_w, margin)
            output = runner.run(handle, window)
            yield (rows[inside], level, output, mx[inside] - np.float32(window[2]),
                   my[inside] - np.float32(window[0]), window)
            del output  # free this tile's maps before the next tile runs


def _grid_samples(
    output: LevelOutput, rows: np.ndarray, x: np.ndarray, y: np.ndarray,
    grid_x: np.ndarray, grid_y: np.ndarray, descriptor_size: int,
) -> Iterator[Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Descriptors on a grid of offsets around points, a chunk of points at a time.

    Args:
        output: a window's network output; rows: (n,) the points' indices; x, y: (n,)
            their positions in the window's map pixels; grid_x, grid_y: (G,) offsets.

    Yields:
        A chunk's indices (c,), x (c,), y (c,) and descriptors (c, G, dim), the chunks
        holding about 16 MB of samples each.
    """
    chunk = max(1, 2**22 // (max(len(grid_x), 1) * descriptor_size))
    for part in range(0, len(rows), chunk):
        px, py = x[part:part + chunk], y[part:part + chunk]
        samples = output.descriptors_at((px[:, None] + grid_x).reshape(-1),
                                        (py[:, None] + grid_y).reshape(-1))
        yield rows[part:part + chunk], px, py, samples.reshape(len(px), len(grid_x), -1)


def describe(
    runner: NetworkRunner,
    image: np.ndarray,
    xy: np.ndarray,
    sizes: np.ndarray,
    params: ExtractionParams,
    tile_size: int = DEFAULT_TILE_SIZE,
    levels: Optional[List[Level]] = None,
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
        levels: the image's pyramid (:func:`~cv2r2d2.pyramid.pyramid`) when the caller
            has it at hand; None computes it.

    Returns:
        descriptors (M, dim) float32 and the (M,) indices of the keypoints kept: those
        inside the image (0 <= x < W, 0 <= y < H); the others are dropped as
        OpenCV's ``compute`` drops them (all are, on an image with no pyramid step).
    """
    xy = np.asarray(xy, np.float32).reshape(-1, 2)
    sizes = np.asarray(sizes, np.float32).reshape(-1)
    kept = np.flatnonzero(inside_image(xy, *image.shape[1:]))
    if levels is None:
        levels = pyramid(*image.shape[1:], params)
    if not levels:  # too thin for the network: nothing to sample
        kept = kept[:0]
    descriptors = np.zeros((len(kept), runner.descriptor_size), np.float32)
    # One pixel more than the tile: bilinear sampling reads the next pixel too.
    for rows, _, output, x, y, _ in sample_at_levels(runner, image, xy[kept], sizes[kept], params,
                                                     tile_size, levels=levels):
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
    levels: Optional[List[Level]] = None,
) -> np.ndarray:
    """Move matched keypoints to where their partners' descriptors fit best.

    Around each keypoint, on its level, the dense descriptor map is sampled on a grid
    (+-``radius`` map pixels, spacing ``step``); the new position is the soft-argmax of
    the cosine similarity with the partner's descriptor (softmax at ``temperature``).

    Args:
        image: (3, H, W) normalised image the keypoints belong to.
        xy: (N, 2) matched keypoint positions in image pixels; sizes: (N,) their sizes.
        descriptors: (N, dim) the partners' L2-normalised descriptors, row for row.
        levels: the image's pyramid, as for :func:`describe`.

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
    margin = int(np.ceil(radius)) + 1
    for rows, level, output, x, y, window in sample_at_levels(
        runner, image, xy[kept], sizes[kept], params, tile_size, centred=True, margin=margin,
        levels=levels,
    ):
        map_h, map_w = runner.output_size(level.height, level.width)
        for r, px, py, samples in _grid_samples(output, rows, x, y, grid_x, grid_y,
                                                runner.descriptor_size):
            similarity = np.einsum("ngd,nd->ng", samples, descriptors[kept[r]].astype(np.float32))
            weights = np.exp((similarity - similarity.max(axis=1, keepdims=True)) / temperature)
            weights /= weights.sum(axis=1, keepdims=True)
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
    levels: Optional[List[Level]] = None,
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
        levels: that pyramid when the caller has it at hand; None computes it.

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
    if tile_size > 0:
        tile_size = min(tile_size, WINDOW_TILE_SIZE)
    for rows, level, output, x, y, _ in sample_at_levels(
        runner, image, xy, sizes, params, tile_size, centred=True, margin=margin,
        upsample=check_upsample(upsample), levels=levels,
    ):
        for r, _, _, samples in _grid_samples(output, rows, x, y, offsets[:, 0], offsets[:, 1],
                                              runner.descriptor_size):
            windows[r] = samples
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
