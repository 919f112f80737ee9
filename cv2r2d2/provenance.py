"""What an output was made with: the settings records of feature and match files.

Every features file (``.h5``, a folder of ``.r2d2`` files) and matches file the package
writes stores a record of the settings that made it: the model and its weights' sha256,
every extraction (or matching) setting, the preset and the package version. A run that
would reuse an output compares the records first: the same settings reuse it, different
ones stop with :class:`SettingsMismatchError`, which names the settings that differ and
the ways out. Files written without a record (by cv2r2d2 before records were kept, or
by another tool such as hloc) are never reused silently either: the settings that made
them cannot be checked.

Settings that do not change the output are recorded but not compared: the device, the
thread count, the tile size (tiles give the same output) and the package version.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .config import TORCH_BACKENDS, R2D2Config
from .version import __version__
from .weights import find_onnx_model, resolve_weights, sha256sum

__all__ = [
    "SettingsMismatchError",
    "model_file",
    "features_record",
    "matches_record",
    "differences",
    "check_reuse",
]

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
# create() arguments recorded but not compared: they do not change the output.
_NOT_COMPARED = ("device", "num_threads", "tile_size", "model", "preset")
# Record keys that are information, not settings.
_INFORMATION = ("cv2r2d2", "model", "preset", "record")


class SettingsMismatchError(ValueError):
    """An output holds results of other settings than the run's (or of unknown ones)."""


def model_file(config: R2D2Config) -> Path:
    """The file the configuration's network comes from: the checkpoint (torch backends)
    or the ``.onnx`` export (ONNX backends)."""
    if config.backend in TORCH_BACKENDS:
        return resolve_weights(config.model)
    return find_onnx_model(config.model)


def features_record(config: R2D2Config) -> Dict[str, Any]:
    """The settings record of features extracted with ``config`` (JSON-serialisable):
    ``kind``, ``model`` (as given), ``weights_sha256`` (of :func:`model_file`),
    ``preset``, ``settings`` (every ``create()`` argument but the device) and ``cv2r2d2``
    (the package version)."""
    settings = {name: value for name, value in config.arguments().items()
                if name not in ("device", "model", "preset")}
    return {
        "kind": "features",
        "record": RECORD_VERSION,
        "cv2r2d2": __version__,
        "model": config.model,
        "weights_sha256": sha256sum(model_file(config)),
        "preset": config.preset,
        "settings": settings,
    }


def matches_record(features: Optional[Mapping[str, Any]], matching: Mapping[str, Any]
                   ) -> Dict[str, Any]:
    """The settings record of matches of features recorded as ``features`` (None: a
    features file without a record) made with the matching options ``matching``
    (``max_distance``, ``ratio``, ``rotations``...)."""
    return {
        "kind": "matches",
        "record": RECORD_VERSION,
        "cv2r2d2": __version__,
        "features": None if features is None else dict(_compared(features),
                                                          model=features.get("model")),
        "settings": dict(matching),
    }


def _compared(record: Mapping[str, Any]) -> Dict[str, Any]:
    """The part of a record that decides the output, flattened to ``name: value``."""
    flat: Dict[str, Any] = {}
    for key, value in record.items():
        if key in _INFORMATION:
            continue
        if key == "settings":
            flat.update({k: v for k, v in value.items() if k not in _NOT_COMPARED})
        elif key == "features" and isinstance(value, Mapping):
            flat.update({f"features.{k}": v for k, v in value.items() if k != "model"})
        else:
            flat[key] = value
    return flat


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """``"name: stored X, now Y"`` for each compared setting that differs (empty: the
    records give the same output)."""
    old, new = _compared(stored), _compared(current)
    found = []
    for name in sorted(set(old) | set(new)):
        if old.get(name) == new.get(name):
            continue
        if name.endswith("weights_sha256"):  # name the models, not only their hashes
            model = name.replace("weights_sha256", "model")
            found.append(f"{model}: stored {_model_of(stored, model)} (weights sha256 "
                         f"{str(old.get(name))[:12]}...), now {_model_of(current, model)} "
                         f"({str(new.get(name))[:12]}...)")
        else:
            found.append(f"{name}: stored {old.get(name, '(absent)')!r}, now "
                         f"{new.get(name, '(absent)')!r}")
    return found


def _model_of(record: Mapping[str, Any], key: str) -> str:
    """The model name of a record (``features.model``: of the features it matched)."""
    if key.startswith("features."):
        record = record.get("features") or {}
        key = key[len("features."):]
    return repr(record.get(key, "(unknown)"))


def check_reuse(stored: Optional[Mapping[str, Any]], current: Mapping[str, Any],
                has_entries: bool, path: Any, overwrite: bool) -> bool:
    """Whether an output must be started again before this run writes into it.

    Args:
        stored: the output's record (None: it has none).
        current: the run's record.
        has_entries: whether the output holds results.
        path: the output, for the message.
        overwrite: the run redoes what is there (``--overwrite``).

    Returns:
        True when the output holds results of other (or unknown) settings and
        ``overwrite`` is set: the caller clears it. False when it can be reused or is
        empty.

    Raises:
        SettingsMismatchError: other or unknown settings, without ``overwrite``.
    """
    if not has_entries:
        return False
    if stored is not None and not differences(stored, current):
        return False
    kind = current["kind"]
    if stored is None:
        reason = (f"{path} holds {kind} written without a record of their settings (by "
                  "cv2r2d2 before records were kept, or by another tool), so they cannot "
                  "be checked against this run's")
    else:
        reason = (f"{path} holds {kind} made with other settings than this run's ("
                  + "; ".join(differences(stored, current)) + ")")
    if not overwrite:
        raise SettingsMismatchError(
            f"{reason}. Run again with --overwrite (overwrite=True) to replace them, or "
            "write to another output.")
    logger.warning("%s: starting it again (overwrite)", reason)
    return True
