"""The steerer cache: each model's steerers fitted once, kept in the package's cache.

Steerers depend on the model: :func:`load_steerers` fits them on first use per model
file (:func:`cv2r2d2.steerer_fitting.fit_steerers`) and caches them in the package's
cache folder (:func:`cv2r2d2.weights.cache_dir`,
``<weights stem>.steerers-<sha256[:16]>.npz``), keyed by the file's sha256; never in
the weights folder, which may be read-only. A cache file placed beside the weights is
read too (first). Angles asked for later are fitted and added to the cache.
``SteererSource`` (package internal) keeps one extractor's steerers between its calls.
"""
from __future__ import annotations

import json
import logging
import time
import zipfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .steerer_fitting import DEFAULT_SETTINGS, DenseDescriber, FitSettings, fit_steerers
from .steerers import Steerers, fitted_angle
from .utils import PathLike, atomic_path
from .weights import cache_dir, sha256sum

__all__ = [
    "cache_file",
    "read_cache",
    "load_steerers",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1


def _cache_name(model_file: Path, sha256: str) -> str:
    return f"{model_file.stem}.steerers-{sha256[:16]}.npz"


def cache_file(model_file: PathLike, sha256: str) -> Path:
    """Where the steerers of a model file are cached: in the package's cache folder
    (:func:`cv2r2d2.weights.cache_dir`), never beside the weights."""
    return cache_dir() / _cache_name(Path(model_file), sha256)


def _read_any_cache(model_file: Path, sha256: str, descriptor_size: int) -> Optional[Steerers]:
    """The cached steerers beside the model file (a read-only folder may hold them too),
    else those in the user cache folder."""
    for folder in (model_file.parent, cache_dir()):
        steerers = read_cache(folder / _cache_name(model_file, sha256), sha256, descriptor_size)
        if steerers is not None:
            return steerers
    return None


def _write_cache(path: Path, steerers: Steerers) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, format=np.int64(CACHE_FORMAT), sha256=np.str_(steerers.sha256),
                 angles=np.asarray(steerers.angles, np.float64), matrices=steerers.matrices,
                 cosines=steerers.cosines, settings=np.str_(json.dumps(steerers.settings,
                                                                        sort_keys=True)))


def read_cache(path: PathLike, sha256: str, descriptor_size: Optional[int] = None) -> Optional[Steerers]:
    """The steerers cached in ``path`` for a model file of this sha256, or None.

    A missing file gives None; an unreadable, corrupted or foreign one (another
    sha256, format or descriptor size, matrices not orthogonal) a warning, and None.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != CACHE_FORMAT or str(data["sha256"]) != sha256:
                raise ValueError("written for another model file or format")
            steerers = Steerers(
                angles=tuple(float(a) for a in data["angles"]),
                matrices=np.asarray(data["matrices"], np.float32),
                cosines=np.asarray(data["cosines"], np.float64),
                sha256=sha256, settings=json.loads(str(data["settings"])),
            )
        dim = steerers.descriptor_size
        if descriptor_size is not None and dim != descriptor_size:
            raise ValueError(f"{dim}-dimensional, the model's descriptors are {descriptor_size}")
        gram = np.einsum("kij,kil->kjl", steerers.matrices.astype(np.float64),
                         steerers.matrices.astype(np.float64))
        if not np.allclose(gram, np.eye(dim)[None], atol=1e-4):
            raise ValueError("matrices not orthogonal")
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("ignoring the steerer cache %s (%s: %s); fitting the steerers again",
                       path, type(exc).__name__, exc)
        return None
    return steerers


def load_steerers(
    feature: DenseDescriber,
    model_file: PathLike,
    angles: Sequence[float],
    settings: Optional[FitSettings] = None,
    known: Optional[Steerers] = None,
    show_progress: bool = True,
) -> Steerers:
    """The steerers of a model for ``angles``: from the cache, fitting those missing.

    Args:
        feature: the model's extractor (used to fit).
        model_file: its weights (``.pt``) or ``.onnx`` file; the cache is keyed by its
            sha256 (:func:`cache_file`).
        angles: degrees.
        settings: fit with these and replace the cache; None: use the cached steerers
            and fit the missing angles as the cached ones were (with the default
            settings when none are cached, or when their image folder is gone).
        known: steerers already at hand for this file (used when the sha256 matches).
        show_progress: a progress bar on a terminal while fitting.
    """
    model_file = Path(model_file)
    sha256 = sha256sum(model_file)
    dim = int(feature.descriptorSize())
    steerers: Optional[Steerers] = None
    if settings is None:
        if known is not None and known.sha256 == sha256:
            steerers = known
        else:
            steerers = _read_any_cache(model_file, sha256, dim)
        settings = _settings_like(steerers)
        if steerers is not None and asdict(settings) != steerers.settings:
            steerers = None  # their images are gone: fit all alike
    if steerers is not None and steerers.has(angles):
        return steerers
    if steerers is None:
        steerers = Steerers((), np.zeros((0, dim, dim), np.float32), np.zeros((0, 2)), sha256,
                            asdict(settings))
    fitted = {fitted_angle(a) for a in steerers.angles}
    wanted = sorted({fitted_angle(a) for a in angles} - {0.0} - fitted)
    source = f"the images of {settings.images}" if settings.images else \
        f"{settings.num_images} procedural {settings.image_size} px images"
    logger.info("fitting the steerers of %s for %s degrees on %s (once per model file)",
                model_file.name, ", ".join(f"{a:g}" for a in wanted), source)
    start = time.perf_counter()
    new = fit_steerers(feature, wanted, settings, show_progress=show_progress)
    steerers = steerers.merged(replace(new, sha256=sha256))
    target = cache_file(model_file, sha256)
    try:
        _write_cache(target, steerers)
    except OSError as exc:
        logger.warning("could not cache the steerers in %s (%s); they are fitted again "
                       "next time", target, exc)
    else:
        logger.info("fitted %d steerer(s) in %.1f s; cached in %s", len(wanted),
                    time.perf_counter() - start, target)
    return steerers


def _settings_like(steerers: Optional[Steerers]) -> FitSettings:
    """The settings of cached steerers, if their images are still there; else defaults."""
    if steerers is None:
        return DEFAULT_SETTINGS
    try:
        settings = FitSettings(**steerers.settings)
    except (TypeError, ValueError):
        return DEFAULT_SETTINGS
    if settings.images and not Path(settings.images).is_dir():
        logger.warning("the steerers were fitted on %s, which is gone; fitting on "
                       "procedural images instead", settings.images)
        return DEFAULT_SETTINGS
    return settings


class SteererSource:
    """One extractor's steerers, kept between its calls: read from the cache or fitted
    (:func:`load_steerers`) when an angle is first asked for.

    The extractor passes itself (used to fit) and how to find its model file (the cache
    key; called only when steerers are loaded) with each call: kept here, they would tie
    the extractor, and its network, into a reference cycle.
    """

    def __init__(self) -> None:
        self._steerers: Optional[Steerers] = None

    def get(self, feature: DenseDescriber, model_file: Callable[[], Path],
            angles: Sequence[float]) -> Steerers:
        """Steerers for at least ``angles`` (degrees): those kept, else loaded or fitted."""
        if self._steerers is None or not self._steerers.has(angles):
            self._steerers = load_steerers(feature, model_file(), angles, known=self._steerers)
        return self._steerers

    def fit(self, feature: DenseDescriber, model_file: Callable[[], Path],
            angles: Sequence[float], settings: FitSettings) -> Steerers:
        """Steerers for ``angles`` fitted now with ``settings``, replacing the cached ones."""
        self._steerers = load_steerers(feature, model_file(), angles, settings=settings)
        return self._steerers

    def forget(self) -> None:
        """Drop the steerers kept: the extractor's network changed."""
        self._steerers = None
