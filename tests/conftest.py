"""Shared fixtures: the official weights, the sample images and the reference outputs.

Weights come from ``$CV2R2D2_WEIGHTS_DIR``; images and reference files from
``../shared`` beside the project root. Outside CI a test that lacks them skips with a
message saying what is missing; in CI (``CI=true``) it fails instead.
"""
from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGES = SHARED / "images"
REFERENCE = SHARED / "reference"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def missing(what: str) -> None:
    """Skip (locally) or fail (in CI) because a fixture file is missing."""
    message = f"missing test data: {what}"
    if IN_CI:
        pytest.fail(message + " (CI must provide it)", pytrace=False)
    pytest.skip(message)


def weights_dir() -> Path:
    env = os.environ.get("CV2R2D2_WEIGHTS_DIR")
    if not env:
        missing("CV2R2D2_WEIGHTS_DIR is not set (point it at ../shared/weights)")
    path = Path(env).resolve()
    if not path.is_dir():
        missing(f"CV2R2D2_WEIGHTS_DIR={env} is not a folder")
    return path


def weights_file(name: str) -> Path:
    path = weights_dir() / f"{name}.pt"
    if not path.is_file():
        missing(f"weights {path}")
    return path


def image_path(name: str) -> Path:
    path = IMAGES / name
    if not path.is_file():
        missing(f"sample image {path}")
    return path


def read_image(name: str) -> np.ndarray:
    return cv2.imread(str(image_path(name)))


def reference_file(name: str) -> Path:
    path = REFERENCE / name
    if not path.is_file():
        missing(f"reference output {path}")
    return path


@pytest.fixture(scope="session")
def r2d2():
    """The default extractor (r2d2_WASF_N16, paper settings), created once."""
    weights_dir()
    import cv2r2d2

    return cv2r2d2.R2D2Feature.create(device="cpu")


@pytest.fixture(scope="session")
def quarter_steerers(r2d2):
    """r2d2's steerers for 90, 180 (and so 270) degrees, fitted on two 128 px procedural
    images (not cached): enough to match exact quarter turns."""
    from cv2r2d2.steerer_fitting import FitSettings, fit_steerers

    return fit_steerers(r2d2, [90, 180], FitSettings(image_size=128, num_images=2),
                        show_progress=False)


@pytest.fixture(scope="session")
def boat() -> np.ndarray:
    return read_image("boat.png")


@pytest.fixture(scope="session")
def peppers() -> np.ndarray:
    return read_image("peppers.png")


def record_progress(monkeypatch, module) -> list:
    """Record the progress bars ``module`` makes: [desc, unit, total, items counted]."""
    bars = []

    def progress(iterable, total=None, enabled=True, desc="", unit="it"):
        bar = [desc, unit, total, 0]
        bars.append(bar)
        for item in iterable:
            bar[3] += 1
            yield item

    monkeypatch.setattr(module, "progress", progress)
    return bars
