"""Homography image pairs made from ../shared/images, for the accuracy benchmarks.

Each sample image (scaled to at most 640 px) is paired with warped or relit copies of
itself, so the ground-truth homography is known exactly:

- viewpoint: rotation up to 30 degrees, scale 0.7-1.5 and a perspective tilt, about the
  image centre;
- illumination: gamma 0.5-2, contrast 0.6-1.4, brightness -30..30, colour gains
  0.75-1.25 per channel and Gaussian noise (sigma 2), identity homography.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Tuple

import cv2
import numpy as np

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images"
NAMES = ("boat.png", "peppers.png", "test.png", "brooklyn.png")
MAX_SIZE = 640


@dataclass
class Pair:
    """Image a, image b = image a warped by ``homography`` (a -> b pixels) or relit."""

    name: str
    kind: str  # "viewpoint" or "illumination"
    image_a: np.ndarray
    image_b: np.ndarray
    homography: np.ndarray


def load(name: str, max_size: int = MAX_SIZE) -> np.ndarray:
    image = cv2.imread(str(IMAGES / name))
    if image is None:
        raise FileNotFoundError(f"sample image {IMAGES / name} is missing")
    h, w = image.shape[:2]
    if max(h, w) > max_size:
        scale = max_size / max(h, w)
        image = cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
    return image


def viewpoint_homography(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """Rotation, scale and tilt about the image centre, (3, 3) float64."""
    angle = np.deg2rad(rng.uniform(-30, 30))
    scale = rng.uniform(0.7, 1.5)
    tilt = rng.uniform(-1, 1, 2) * 0.35 / np.array([width, height])
    centre = np.array([[1, 0, width / 2], [0, 1, height / 2], [0, 0, 1]])
    similarity = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 0],
                           [scale * np.sin(angle), scale * np.cos(angle), 0], [0, 0, 1]])
    perspective = np.array([[1, 0, 0], [0, 1, 0], [tilt[0], tilt[1], 1]])
    return centre @ similarity @ perspective @ np.linalg.inv(centre)


def relight(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    x = image.astype(np.float32) / 255
    x = x ** rng.uniform(0.5, 2.0)
    x = (x - 0.5) * rng.uniform(0.6, 1.4) + 0.5 + rng.uniform(-30, 30) / 255
    x = x * rng.uniform(0.75, 1.25, 3).astype(np.float32)
    x = x * 255 + rng.normal(0, 2, x.shape).astype(np.float32)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def make_pairs(per_image: int = 5, seed: int = 0) -> List[Pair]:
    """``per_image`` viewpoint and illumination pairs for each sample image."""
    rng = np.random.default_rng(seed)
    pairs = []
    for name in NAMES:
        image = load(name)
        h, w = image.shape[:2]
        for _ in range(per_image):
            H = viewpoint_homography(rng, w, h)
            pairs.append(Pair(name, "viewpoint", image, cv2.warpPerspective(image, H, (w, h)), H))
        for _ in range(per_image):
            pairs.append(Pair(name, "illumination", image, relight(rng, image), np.eye(3)))
    return pairs


def by_image(pairs: List[Pair]) -> Iterator[Tuple[np.ndarray, List[Pair]]]:
    """Group pairs by their shared image a (so it is extracted once)."""
    seen = {}
    for pair in pairs:
        seen.setdefault(pair.name, (pair.image_a, []))[1].append(pair)
    yield from seen.values()
