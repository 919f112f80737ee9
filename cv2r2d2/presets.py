"""Named settings: complete configurations chosen for one purpose, as hloc's confs.

A user picks a name (``R2D2Feature.create(preset="ratio")``, ``cv2r2d2 sfm --preset
paper``); explicit arguments override the preset's. Each preset holds the arguments of
``R2D2Feature.create`` that differ from the paper's (the extraction), the matching options
of the collection tools, and, for structure from motion, the keypoint refinement; its
``figures`` say what it was chosen on (``benchmarks/bench_presets.py`` measures them all).

This module holds data only; :class:`cv2r2d2.config.R2D2Config` validates a preset's
extraction arguments when it is built from them, and the tests build every preset.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

__all__ = ["Preset", "PRESETS", "DEFAULT_PRESET", "SFM_PRESET", "get_preset", "preset_names"]


@dataclass(frozen=True)
class Preset:
    """One named configuration.

    Attributes:
        name: what users type.
        purpose: one line: what it is for.
        figures: the measured figures it was chosen on, with the benchmark that gives them.
        extraction: ``R2D2Feature.create`` arguments that differ from the paper's.
        matching: options of the collection matcher (``ratio``, ``max_distance``) that
            differ from plain mutual nearest neighbours.
        refinement: None (no keypoint refinement in SfM), or the refinement's settings:
            ``upsample`` (``RefinementParams.upsampled``) and ``network``, the
            ``create()`` arguments of the network computing the refinement's
            descriptors that differ from the extraction's.
    """

    name: str
    purpose: str
    figures: str
    extraction: Mapping[str, Any] = field(default_factory=dict)
    matching: Mapping[str, Any] = field(default_factory=dict)
    refinement: Optional[Mapping[str, Any]] = None


DEFAULT_PRESET = "paper"
"""The preset of ``R2D2Feature.create()`` and of every command but ``sfm``."""
# What cv2r2d2 sfm and sfm.reconstruct() use when no preset (or extractor) is named.
SFM_PRESET = "sfm"

PRESETS: Dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "paper",
            "the original R2D2's output with the official weights (parity); R2D2Feature.create()'s "
            "default",
            "HPatches MMA@3 0.721 (the paper's); 40 homography pairs MMA@1 0.558, MMA@3 0.831 "
            "(bench_accuracy.py); Sacre-Coeur SfM 0.774 px (bench_sfm.py)",
        ),
        Preset(
            "ratio",
            "knnMatch + Lowe's ratio test: one keypoint per place across pyramid levels",
            "ratio-test correct matches at 1000 keypoints, 40 homography pairs: 429 per pair "
            "against paper's 396; at 5000, cross-level duplicates go: fewer keypoints, 1033 "
            "against 1787 (bench_presets.py)",
            extraction={"unique_radius": 2.0},
            matching={"ratio": 0.75},
        ),
        Preset(
            "accurate",
            "best single-image localisation for geometry (homographies, poses): sub-pixel "
            "keypoints refined on the descriptor map",
            "40 homography pairs MMA@1 0.710, MMA@3 0.837 against paper's 0.558, 0.831, for "
            "1.24-1.46 times the extraction time (bench_presets.py, bench_accuracy.py)",
            extraction={"subpixel": "descriptor"},
        ),
        Preset(
            "sfm",
            "structure from motion: accurate keypoints, then featuremetric refinement of the "
            "verified tracks with an int8 network on levels twice finer",
            "Sacre-Coeur (10 photos): 10 registered, 1713 points, 0.429 px mean reprojection "
            "error against paper's 0.774 and COLMAP SIFT's 0.323, cameras within 0.37% of "
            "SIFT's (bench_sfm.py)",
            extraction={"subpixel": "descriptor"},
            refinement={"upsample": 2.0, "network": {"precision": "int8"}},
        ),
        Preset(
            "fast",
            "speed on CPUs: the int8 network on ONNX Runtime, built and calibrated on first use",
            "brooklyn 1280 x 820 on a Zen 4 CPU with AVX512_VNNI: 3.91 times the original's "
            "way, 2.80 times the exact mode (bench_extract.py); 40 homography pairs MMA@3 "
            "0.830 against paper's 0.831 (bench_presets.py)",
            extraction={"precision": "int8"},
        ),
    )
}
"""Every preset by name, in the order ``cv2r2d2 presets`` lists them."""


def preset_names() -> Tuple[str, ...]:
    """The presets' names, in the order they are listed."""
    return tuple(PRESETS)


def get_preset(name: Any) -> Preset:
    """The preset called ``name``; ``ValueError`` listing the known ones otherwise."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; the presets are: {', '.join(PRESETS)}")
    return PRESETS[name]
