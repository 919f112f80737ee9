"""Networks derived from the weights, built on first use and cached: the int8 network
that ``precision="int8"`` runs.

The first use quantises the model (:func:`cv2r2d2.onnx_export.export_int8`) on images
the package draws itself (:func:`cv2r2d2.steerer_fitting.procedural_images`), so it needs
nothing but the weights: no photos, no network access, no manual step; a progress bar
shows on a terminal, and later uses read the file. Measured on a 2-core Zen 4 shared
with other jobs (load 12-19): 594 s for r2d2_WASF_N16, 294 s for faster2d2_WASF_N16; the
calibration (16 forward passes at 512 px) is most of it, the accuracy report the rest.

Layout, in :func:`cv2r2d2.weights.cache_dir` (``$CV2R2D2_CACHE_DIR``, else
``~/.cache/cv2r2d2``)::

    int8/<model>-<key>.onnx   the int8 network
    int8/<model>-<key>.json   its report: what the key was made of, the .onnx file's
                              sha256 and size, and its accuracy against fp32
    int8/<model>-<key>.lock   held by the process that builds (left in place, empty)

``key`` is the first 16 hex digits of the sha256 of the weights file's sha256, the
calibration settings (:class:`Calibration`), the package's version and onnxruntime's
(the quantiser's output depends on it). Both files are written atomically (the report
last). A file whose checksum does not match its report, or without a report, is built
again, with a warning. Two processes asking at once: one builds under the lock, the
other waits and then reads it (without ``fcntl``, on Windows, both build and the last
complete file stays).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple, Union

from .precision import probe_cpu
from .steerer_fitting import procedural_images
from .utils import atomic_path, import_optional
from .version import __version__
from .weights import MODELS, cache_dir, resolve_weights, sha256sum

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["Calibration", "DEFAULT_CALIBRATION", "int8_model", "int8_report_file", "read_report"]

logger = logging.getLogger(__name__)

# The report's format (a field of the report; another value rebuilds).
REPORT_FORMAT = 1


@dataclass(frozen=True)
class Calibration:
    """The data an int8 network is calibrated and measured on: procedural textures.

    Attributes:
        images: calibration images (their activation ranges set the quantisation).
        size: their side, pixels.
        seed: the seed of :func:`~cv2r2d2.steerer_fitting.procedural_images`.
        evaluation_images: further images of the same seed, not calibrated on, on which
            the report measures the int8 network against fp32 (0: no report figures).
        evaluation_size: their side, pixels.
    """

    images: int = 16
    size: int = 512
    seed: int = 0
    evaluation_images: int = 2
    evaluation_size: int = 384

    def __post_init__(self) -> None:
        for name in ("images", "size", "evaluation_images", "evaluation_size", "seed"):
            value = getattr(self, name)
            least = 1 if name == "images" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Calibration.{name} must be an integer >= {least}, got {value!r}")
        for name in ("size", "evaluation_size"):
            if getattr(self, name) < 64:
                raise ValueError(f"Calibration.{name} must be >= 64 pixels, got {getattr(self, name)}")


# Chosen on r2d2_WASF_N16's MMA@3 on the 40 homography pairs of
# benchmarks/homography_pairs.py (bench_onnx.py --calibration-study; exact mode 0.831):
# procedural 16 x 512 px 0.830, 4 x 512 px 0.829, 32 x 256 px 0.828; ten real photos
# (Sacre-Coeur, 512 px) 0.826. The procedural textures calibrate at least as well as
# photos, and need none.
DEFAULT_CALIBRATION = Calibration()
"""The calibration of the int8 network ``precision="int8"`` builds."""


def _onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def cache_key(weights_sha256: str, calibration: Calibration) -> Tuple[str, Dict[str, Any]]:
    """The cache key of an int8 network, and what it is made of."""
    parts = {"weights_sha256": weights_sha256, "calibration": asdict(calibration),
             "source": "procedural", "cv2r2d2": __version__,
             "onnxruntime": _onnxruntime_version()}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return digest[:16], parts


def int8_report_file(network: Path) -> Path:
    """The report beside a cached network."""
    return network.with_suffix(".json")


def read_report(network: Union[str, os.PathLike]) -> Dict[str, Any]:
    """The report of a cached int8 network (see the module's docstring)."""
    return json.loads(int8_report_file(Path(network)).read_text())


def _problem(network: Path, parts: Dict[str, Any]) -> Optional[str]:
    """Why the cached ``network`` cannot be used ("missing" when it was never built),
    or None when it can."""
    report_file = int8_report_file(network)
    if not network.is_file() and not report_file.is_file():
        return "missing"
    if not network.is_file():
        return f"{network} is missing beside its report"
    try:
        report = json.loads(report_file.read_text())
    except FileNotFoundError:
        return f"{report_file} is missing"
    except (OSError, ValueError) as exc:
        return f"{report_file} is not readable ({exc})"
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT or \
            report.get("key") != parts:
        return f"{report_file} is not the report of this key"
    if report.get("onnx_sha256") != sha256sum(network):
        return f"{network} does not match the sha256 in its report (corrupted or truncated)"
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) for the block."""
    if fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that builds %s", path.with_suffix(".onnx"))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def int8_model(model: Union[str, os.PathLike], calibration: Optional[Calibration] = None,
               show_progress: bool = True) -> Path:
    """The int8 ONNX network of ``model``, built on first use into the cache.

    Args:
        model: a registry name or a checkpoint path (its weights file is hashed: a
            checkpoint rewritten in place gets a new network).
        calibration: the procedural images it is calibrated and measured on (None:
            :data:`DEFAULT_CALIBRATION`).
        show_progress: progress bars while building (on a terminal only).

    Returns:
        The cached ``.onnx`` file (its report: :func:`read_report`).

    Raises:
        cv2r2d2.utils.MissingDependencyError: building needs torch, onnx and onnxruntime
            (a cached network needs none of them here).
    """
    calibration = DEFAULT_CALIBRATION if calibration is None else calibration
    weights = resolve_weights(model)
    key, parts = cache_key(sha256sum(weights), calibration)
    name = os.fspath(model) if os.fspath(model) in MODELS else Path(weights).stem
    network = cache_dir() / "int8" / f"{name}-{key}.onnx"
    if _problem(network, parts) is None:
        return network
    with _locked(network.with_suffix(".lock")):
        problem = _problem(network, parts)  # another process may have built it meanwhile
        if problem is None:
            return network
        if problem != "missing":
            logger.warning("building the int8 network again: %s", problem)
        _build(os.fspath(model), network, parts, calibration, show_progress)
    return network


def _build(model: str, network: Path, parts: Dict[str, Any], calibration: Calibration,
           show_progress: bool) -> None:
    for module in ("onnxruntime", "onnx", "torch"):
        import_optional(module, "building the int8 network (precision='int8')", extra="onnx")
    from .onnx_export import export_int8

    logger.info("building the int8 network of %s once, calibrated on %d procedural images, "
                "into %s", model, calibration.images, network)
    start = time.perf_counter()
    images = procedural_images(calibration.images, calibration.size, calibration.seed)
    evaluation = procedural_images(calibration.images + calibration.evaluation_images,
                                   calibration.evaluation_size,
                                   calibration.seed)[calibration.images:]
    report = export_int8(model, network, images, evaluation, show_progress=show_progress)
    report.update(format=REPORT_FORMAT, key=parts, onnx_sha256=sha256sum(network),
                  build_seconds=round(time.perf_counter() - start, 1),
                  cpu=probe_cpu().describe())
    with atomic_path(int8_report_file(network)) as partial:
        partial.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    logger.info("int8 network built in %.0f s: %s", report["build_seconds"], network)
