"""The image pyramid: which levels an extraction walks, and walking them.

The levels are the reference's, with the image processed at its own size where the
reference would find nothing (:func:`pyramid`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, List, Optional, Tuple

import numpy as np

from .params import ExtractionParams
from .runner import NetworkRunner

__all__ = [
    "PATCH_SIZE", "MIN_SIDE", "Level", "pyramid", "upsampled_pyramid", "walk_levels",
    "level_choice",
]

# Keypoint size (patch diameter, pixels) at pyramid scale 1, as in the reference.
PATCH_SIZE = 32.0
# The smallest image side, pixels, the networks run on (the faster one pools by 2).
MIN_SIDE = 2


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


def pyramid(height: int, width: int, params: ExtractionParams,
            on_own_size: Optional[Callable[[], None]] = None) -> List[Level]:
    """The pyramid steps the extraction walks for an image of ``height`` x ``width``.

    Those of the reference (:func:`reference_pyramid`); but where the reference
    processes no step at all (an image whose longer side is under ``min_size``, say,
    where it finds nothing), one step at scale 1: the image is processed at its own
    size, and ``on_own_size`` (when given) is called, for the caller to say so. An
    image with a side under ``MIN_SIDE`` px gets no step.
    """
    steps = reference_pyramid(height, width, params)
    if not steps and min(height, width) >= MIN_SIDE:
        if on_own_size is not None:
            on_own_size()
        return [Level(0, 1.0, height, width)]
    return steps


def upsampled_pyramid(height: int, width: int, params: ExtractionParams,
                      upsample: float = 1.0,
                      on_own_size: Optional[Callable[[], None]] = None) -> List[Level]:
    """The extraction's pyramid extended by finer levels: that of the image upsampled by
    ``upsample`` with ``max_size`` scaled alike, so its finest level has ``upsample``
    times the resolution of the extraction's finest (2: twice) and its coarsest is
    about the extraction's. Level sizes and scales are those of the upsampled image: a
    level's keypoint size in original-image pixels is ``level.size / upsample``.
    ``upsample`` 1: the extraction's pyramid. ``on_own_size``: as for :func:`pyramid`."""
    if upsample == 1:
        return pyramid(height, width, params, on_own_size)
    scaled = replace(params, max_size=params.max_size * upsample)
    return pyramid(round(height * upsample), round(width * upsample), scaled, on_own_size)


def walk_levels(runner: NetworkRunner, image: np.ndarray, steps: List[Level]) -> Iterator[Tuple[Level, Any]]:
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


def level_choice(sizes: np.ndarray, levels: List[Level]) -> np.ndarray:
    """Index of the level whose keypoint size is closest (by ratio) to each size."""
    level_sizes = np.log([level.size for level in levels])
    with np.errstate(divide="ignore", invalid="ignore"):
        log_sizes = np.where(sizes > 0, np.log(np.maximum(sizes, 1e-30)), -np.inf)
    return np.abs(log_sizes[:, None] - level_sizes[None, :]).argmin(axis=1)
