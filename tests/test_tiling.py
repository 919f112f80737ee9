"""Tiles cover a level's map once, each grown tile within the size asked."""
from __future__ import annotations

import numpy as np

from cv2r2d2.tiling import tiles


def test_tiles_cover_the_map_with_least_overlap():
    assert tiles(100, 200, 0, 27) == [(0, 100, 0, 200)]
    assert tiles(100, 200, 512, 27) == [(0, 100, 0, 200)]
    # The inner box carries a halo on both sides, the end ones on one: it is 2 x 27 px
    # narrower, so that the three grown boxes are equal (338, 337, 338 px wide).
    boxes = tiles(580, 905, 512, 27)
    assert boxes == [(0, 580, 0, 311), (0, 580, 311, 594), (0, 580, 594, 905)]
    for height, width, halo in [(300, 410, 10), (97, 1000, 27)]:
        for tile_size in (64, 200, 333):
            boxes = tiles(height, width, tile_size, halo)
            covered = np.zeros((height, width), int)
            for y0, y1, x0, x1 in boxes:
                covered[y0:y1, x0:x1] += 1
                grown_h = y1 - y0 + halo * ((y0 > 0) + (y1 < height))
                grown_w = x1 - x0 + halo * ((x0 > 0) + (x1 < width))
                assert grown_h * grown_w <= tile_size**2
            assert np.all(covered == 1)
