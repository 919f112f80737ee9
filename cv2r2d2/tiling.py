"""Tiling: the boxes a level's maps are computed in, so memory stays bounded.

A level larger than ``tile_size ** 2`` pixels runs on a grid of boxes (:func:`tiles`);
a runner computes each box's maps on a crop of its input grown by the network's
receptive field (:func:`halo_window`), so they equal the whole level's.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from .runner import Box, NetworkRunner

__all__ = [
    "DEFAULT_TILE_SIZE", "WINDOW_TILE_SIZE", "level_tiles", "grow",
]

# Default cap on the pixels of one network run (tile_size ** 2); larger levels are tiled.
# A run peaks at two 128-channel float32 maps of its tile (1 KB per pixel, <= 170 MB at 416):
# brooklyn's default extraction stays under 500 MB for ~4% more halo recomputation than 512.
DEFAULT_TILE_SIZE = 416
# Descriptor windows (keypoint refinement) run on tiles of at most this size, each cut to
# the box of its points: with the Sacre-Coeur tracks at twice the finest resolution, 256
# took 0.85x the time of 416 with PyTorch fp32 and 0.6x with an int8 ONNX export (192 and
# 128: no faster), as smaller boxes skip more of a level and fit the CPU's caches.
WINDOW_TILE_SIZE = 256


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


def level_tiles(runner: NetworkRunner, height: int, width: int, tile_size: int) -> List[Box]:
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


def grow(box: Box, height: int, width: int, margin: int = 1) -> Box:
    """``box`` grown by ``margin`` pixels on each side, within a height x width map."""
    y0, y1, x0, x1 = box
    return max(0, y0 - margin), min(height, y1 + margin), max(0, x0 - margin), min(width, x1 + margin)
