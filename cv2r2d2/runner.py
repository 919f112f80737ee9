"""The seam between the extraction and a network backend.

The extraction (:mod:`cv2r2d2.extractor`, :mod:`cv2r2d2.sampling`) is numpy code written
against :class:`NetworkRunner`; a backend (:mod:`cv2r2d2.torch_runner`,
:mod:`cv2r2d2.onnx_runner`) implements it and gives a :class:`LevelOutput` per run.
"""
from __future__ import annotations

from typing import Any, Optional, Protocol, Tuple

import numpy as np

__all__ = ["Box", "LevelOutput", "NetworkRunner"]

# (y0, y1, x0, x1) in a level's map pixels, end excluded.
Box = Tuple[int, int, int, int]


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
