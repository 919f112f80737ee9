"""Model registry, weight files (cache, download, sha256) and safe checkpoint loading.

This is the only module that knows about URLs and hashes. A model name resolves to a
file in this order: an explicit path; ``$CV2R2D2_WEIGHTS_DIR/<name>.pt``; the torch hub
cache (``torch.hub.get_dir()/checkpoints/<name>.pt``); a download from the public URL
into that cache, verified with sha256 before use.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import http.client
import logging
import os
import pickle
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

from .utils import atomic_path, progress_bar, torch_device

if TYPE_CHECKING:  # torch is imported only where a network is built
    import torch

    from .nets import R2D2Net

__all__ = [
    "ModelInfo",
    "MODELS",
    "DEFAULT_MODEL",
    "WEIGHTS_DIR_ENV",
    "CACHE_DIR_ENV",
    "LICENCE_LOGGER",
    "WeightsError",
    "UnknownModelError",
    "CheckpointError",
    "WeightsNotFoundError",
    "cache_dir",
    "find_onnx_model",
    "resolve_weights",
    "download_weights",
    "load_checkpoint",
    "load_model",
    "sha256sum",
]

logger = logging.getLogger(__name__)

WEIGHTS_DIR_ENV = "CV2R2D2_WEIGHTS_DIR"
"""The environment variable naming a folder of weights files, looked in before the caches."""
# The folder of derived files (see cache_dir).
CACHE_DIR_ENV = "CV2R2D2_CACHE_DIR"
# The logger of the once-per-cache licence notice of the official weights (a warning):
# logging.getLogger(LICENCE_LOGGER).setLevel(logging.ERROR) silences it, as `-q` does.
LICENCE_LOGGER = "cv2r2d2.licence"
_BASE_URL = "https://github.com/naver/r2d2/raw/master/models/"
_NAVER_LICENCE = "CC BY-NC-SA 3.0 (NAVER Corp.; non-commercial use only)"


@dataclass(frozen=True)
class ModelInfo:
    """One official R2D2 checkpoint."""

    name: str
    net: str
    sha256: str
    url: str
    licence: str
    description: str


def _official(name: str, net: str, sha256: str, description: str) -> ModelInfo:
    return ModelInfo(name, net, sha256, f"{_BASE_URL}{name}.pt", _NAVER_LICENCE, description)


MODELS: Dict[str, ModelInfo] = {
    m.name: m
    for m in (
        _official(
            "r2d2_WASF_N16", "Quad_L2Net_ConfCFS()",
            "9ae90e02a9a133d100ca7aeaa32f4d4d7736a6dd222a530a25c8f7da5e508528",
            "paper model: web images, Aachen, style transfer, flow; N=16 (HPatches MMA@3 0.721)",
        ),
        _official(
            "r2d2_WAF_N16", "Quad_L2Net_ConfCFS()",
            "27cebd6608317b35198a76f60f87492110dee3e88ca382586a729dadb1a16b90",
            "as r2d2_WASF_N16 without style transfer (MMA@3 0.686)",
        ),
        _official(
            "r2d2_WASF_N8_big", "Quad_L2Net_ConfCFS(mchan=6)",
            "597dc13998e211e827c550bdc8f76dbb4aca32747846f96962c9168586cec418",
            "wider network (mchan=6), N=8 (MMA@3 0.692 at 10k keypoints)",
        ),
        _official(
            "faster2d2_WASF_N16", "Fast_Quad_L2Net_ConfCFS()",
            "217daa3a166bfe9bf2b68c05c1607a09dd4d552ae1bbeda885479d504eefc14b",
            "faster variant working at half resolution in the middle layers",
        ),
    )
}
"""The official models by name."""
DEFAULT_MODEL = "r2d2_WASF_N16"
"""The model of the ``paper`` preset."""


class WeightsError(RuntimeError):
    """A weight file is missing, cannot be downloaded, or fails its checks.

    The common base of :class:`UnknownModelError`, :class:`CheckpointError` (both also
    ``ValueError``) and :class:`WeightsNotFoundError` (also ``FileNotFoundError``); a
    failed download is a plain ``WeightsError``.
    """


class UnknownModelError(WeightsError, ValueError):
    """A model argument that is neither a known model name nor an existing file."""


class CheckpointError(WeightsError, ValueError):
    """A weight file that is malformed, refused (an unknown architecture, unsafe
    content), or not the official file its name promises (sha256)."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """An official model whose weight file is not available locally, and may not be
    downloaded or exported here."""


def sha256sum(path: Union[str, Path]) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """The writable folder of every file the package derives (exported and int8
    networks, steerers...): ``$CV2R2D2_CACHE_DIR``, else the user cache folder's
    ``cv2r2d2`` (``$XDG_CACHE_HOME/cv2r2d2``, usually ``~/.cache/cv2r2d2``;
    ``%LOCALAPPDATA%\\cv2r2d2`` on Windows). Never the weights folder, which may be
    read-only."""
    explicit = os.environ.get(CACHE_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "cv2r2d2"
    user_cache = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.expanduser("~/.cache")
    return Path(user_cache).expanduser() / "cv2r2d2"


def _hub_dir() -> Path:
    """Where downloaded weights go: ``torch.hub.get_dir()/checkpoints``, found without
    importing torch."""
    if "torch" in sys.modules:
        return Path(sys.modules["torch"].hub.get_dir()) / "checkpoints"
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch"
    )
    return Path(torch_home).expanduser() / "hub" / "checkpoints"


def _where_to_put(info: ModelInfo) -> str:
    return (
        f"download {info.url} and either set {WEIGHTS_DIR_ENV} to the folder holding "
        f"{info.name}.pt or place it at {_hub_dir() / (info.name + '.pt')}"
    )


def _verified(path: Path, info: ModelInfo) -> Path:
    actual = sha256sum(path)
    if actual != info.sha256:
        raise CheckpointError(
            f"{path} does not hold the official {info.name} weights (sha256 {actual}, "
            f"expected {info.sha256}): the file is corrupted, truncated or another model. "
            f"Delete it, then {_where_to_put(info)}."
        )
    return path


def download_weights(info: ModelInfo, dest: Path, progress: bool = True, timeout: float = 60.0) -> Path:
    """Download ``info.url`` to ``dest``, checking its sha256; leaves no partial file.

    Raises:
        WeightsError: when the download fails or the checksum does not match.
    """
    logger.info("downloading %s weights from %s to %s", info.name, info.url, dest)
    digest = hashlib.sha256()
    try:
        with atomic_path(dest) as partial, urllib.request.urlopen(info.url, timeout=timeout) \
                as response, open(partial, "wb") as out:
            length = response.headers.get("Content-Length")
            bar = progress_bar(int(length) if length else None, progress, info.name, unit="B",
                               unit_scale=True)
            try:
                for block in iter(lambda: response.read(1 << 16), b""):
                    out.write(block)
                    digest.update(block)
                    if bar is not None:
                        bar.update(len(block))
            finally:
                if bar is not None:
                    bar.close()
            if digest.hexdigest() != info.sha256:
                raise WeightsError(
                    f"the file downloaded from {info.url} failed its sha256 check (got "
                    f"{digest.hexdigest()}, expected {info.sha256}); nothing was written to {dest}."
                )
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise WeightsError(
            f"could not download the {info.name} weights from {info.url} ({exc}). "
            f"To work offline, {_where_to_put(info)}."
        ) from exc
    return dest


def resolve_weights(
    name_or_path: Union[str, os.PathLike], download: bool = True, progress: bool = True
) -> Path:
    """Find (or fetch) the weight file of a model name or an explicit path.

    Args:
        name_or_path: a registry name (see ``MODELS``) or a path to a ``.pt`` file.
        download: allow downloading into the torch hub cache.
        progress: show a progress bar while downloading.

    Returns:
        Path of a file whose sha256 matches the registry for official names.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"model must be a model name or a path, got {type(name_or_path).__name__}"
        )
    text = os.fspath(name_or_path)
    info = MODELS.get(text)
    if info is None:
        path = Path(text).expanduser()
        if path.is_file():
            return path
        if isinstance(name_or_path, os.PathLike) or os.sep in text or path.suffix:
            raise WeightsNotFoundError(f"no such checkpoint file: {text!r} (the official "
                                       f"models are named {', '.join(MODELS)})")
        raise UnknownModelError(
            f"{text!r} is neither an existing file nor a known model name "
            f"(known: {', '.join(MODELS)})"
        )
    env_dir = os.environ.get(WEIGHTS_DIR_ENV)
    if env_dir:
        candidate = Path(env_dir).expanduser() / f"{info.name}.pt"
        if candidate.is_file():
            return _verified(candidate, info)
        logger.debug("%s not found in %s=%s", info.name, WEIGHTS_DIR_ENV, env_dir)
    cached = _hub_dir() / f"{info.name}.pt"
    if cached.is_file():
        return _verified(cached, info)
    if not download:
        raise WeightsNotFoundError(f"the {info.name} weights are not available locally; "
                           f"{_where_to_put(info)}.")
    return download_weights(info, cached, progress=progress)


def find_onnx_model(model: Union[str, os.PathLike]) -> Path:
    """The exported ``.onnx`` file of a path or a registry name.

    A registry name is looked up as ``<name>.onnx`` in ``$CV2R2D2_WEIGHTS_DIR``, then in
    :func:`cache_dir` (where :func:`cv2r2d2.backends.onnx_model_file` exports it once
    when neither holds it).

    Raises:
        UnknownModelError: neither an existing file nor a registry name.
        ValueError: an existing file that is not ``.onnx`` (a checkpoint to export).
        WeightsNotFoundError: a registry name without an exported file here; the
            message says how to export it.
    """
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a .onnx path or a model name, got {type(model).__name__}")
    text = os.fspath(model)
    info = MODELS.get(text)
    if info is None:
        path = Path(text).expanduser()
        if not path.is_file():
            raise UnknownModelError(
                f"{text!r} is neither an existing .onnx file nor a known model name "
                f"(known: {', '.join(MODELS)})"
            )
        if path.suffix.lower() != ".onnx":
            raise ValueError(
                f"the ONNX backends run an exported .onnx file, got {text!r}; export it with "
                f"`cv2r2d2 export-onnx --model {text} --output model.onnx`"
            )
        return path
    folders = [Path(os.environ[WEIGHTS_DIR_ENV]).expanduser()] if os.environ.get(WEIGHTS_DIR_ENV) else []
    folders.append(cache_dir())
    for folder in folders:
        candidate = folder / f"{info.name}.onnx"
        if candidate.is_file():
            return candidate
    target = cache_dir() / f"{info.name}.onnx"
    searched = " and ".join(str(f) for f in folders)
    raise WeightsNotFoundError(
        f"no {info.name}.onnx in {searched}. On a machine with torch, run `cv2r2d2 export-onnx "
        f"--model {info.name} --output {info.name}.onnx` and put the file in {WEIGHTS_DIR_ENV} "
        f"or at {target}, or pass its path as model."
    )


def _plain_dict(*args: Any, **kwargs: Any) -> dict:
    # Stands in for collections.defaultdict while unpickling: the weights-only
    # unpickler cannot fill a defaultdict, and its factory is never needed here.
    return dict()


def _torch_load(path: Path) -> Any:
    import torch

    allowed = [list, (_plain_dict, "collections.defaultdict")]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(path: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Load an R2D2 checkpoint safely (no arbitrary code runs).

    Returns:
        dict with ``net`` (architecture string) and ``state_dict`` (``module.`` prefix
        stripped, tensors on the CPU).
    """
    path = Path(path)
    try:
        checkpoint = _torch_load(path)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path} is not a loadable R2D2 checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'truncated or corrupted'})"
        ) from exc
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "net" not in checkpoint:
        raise CheckpointError(
            f"{path} is not an R2D2 checkpoint: expected a dict with 'net' and 'state_dict'"
        )
    state_dict = collections.OrderedDict(
        (key[len("module."):] if key.startswith("module.") else key, value)
        for key, value in checkpoint["state_dict"].items()
    )
    return dict(checkpoint, state_dict=state_dict)


# Marks in cache_dir() that the licence notice was shown (see _tell_licence).
LICENCE_MARKER = "naver-weights-licence-shown"


def _notice_licence() -> None:
    """Say that the official weights are NAVER's, and their licence: once per cache (a
    marker file in :func:`cache_dir` remembers it; a read-only cache: once per process),
    and only where it is seen (not with the licence logger silenced, as ``-q`` does)."""
    marker = cache_dir() / LICENCE_MARKER
    if not marker.is_file() and logging.getLogger(LICENCE_LOGGER).isEnabledFor(logging.WARNING):
        _tell_licence(marker)


@functools.lru_cache(maxsize=None)
def _tell_licence(marker: Path) -> None:
    logging.getLogger(LICENCE_LOGGER).warning(
        "Using the official R2D2 weights by NAVER Corp., licensed %s (said once).",
        _NAVER_LICENCE)
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        logger.debug("cannot write %s: the licence notice is said again next time", marker)


def load_model(
    name_or_path: Union[str, os.PathLike] = DEFAULT_MODEL,
    device: Optional[Union[str, "torch.device"]] = None,
) -> "R2D2Net":
    """Build an R2D2 network and load its weights, ready for inference.

    Args:
        name_or_path: a registry name (``r2d2_WASF_N16``, ...) or a checkpoint path,
            such as one written by ``cv2r2d2.train``.
        device: torch device; ``None`` picks CUDA when available, else the CPU.

    Returns:
        The network in eval mode with gradients disabled.

    Raises:
        ValueError: a device this machine does not have (the message lists those it has).
    """
    from .nets import build_net

    device = torch_device(device)  # before any work: a one-line error if it is absent
    path = resolve_weights(name_or_path)
    checkpoint = load_checkpoint(path)
    try:
        net = build_net(checkpoint["net"])
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    try:
        net.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path}: the weights do not fit the architecture {checkpoint['net']!r}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    if os.fspath(name_or_path) in MODELS:
        _notice_licence()
    net.name = os.fspath(name_or_path)
    net.requires_grad_(False)
    return net.eval().to(device)
