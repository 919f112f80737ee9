"""Feature and match stores of photo collections (hloc's h5 layouts, the original
``.r2d2`` files), written so that runs resume.

Feature files, keyed by image name (the image's path relative to the folder it was
found in, with ``/`` separators):

- ``.r2d2``, the original R2D2 format: a folder holding ``<name>.r2d2`` per image, a
  numpy ``.npz`` archive with ``imsize`` (W, H), ``keypoints`` N x 3 (x, y, size),
  ``descriptors`` N x 128 and ``scores`` N. Each file is written to a temporary file
  first and moved into place, so a killed run leaves whole files or none.
- hloc's ``features.h5``: one group per image name with ``keypoints`` N x 2 (x, y),
  ``descriptors`` 128 x N, ``scores`` N and ``image_size`` (W, H), plus ``sizes`` N
  (keypoint diameters, pixels; hloc ignores it) when the features have them.

Matches are stored in hloc's ``matches.h5`` layout: a group per pair (see
:func:`pair_key`) with ``matches0`` (index in the second image of each keypoint of
the first, -1 if unmatched) and ``matching_scores0``.

Each store also keeps the settings record of what made it (see :mod:`cv2r2d2.provenance`):
a JSON root attribute ``cv2r2d2_settings`` of an h5 file (hloc ignores it), a
``cv2r2d2_settings.json`` file in a ``.r2d2`` folder.

An HDF5 file cannot be replaced atomically per entry, so the h5 writers flush after
each entry and an entry counts as done only when all its datasets are there with
consistent shapes; a resumed run rewrites the incomplete ones.

Positions are in image pixels, as the extractor gives them (see
:class:`cv2r2d2.params.Features`): in OpenCV's and hloc's convention (the centre of
the top-left pixel at (0, 0)) with ``subpixel=True``, and for keypoints of the scale-1
level in any mode. By default they are the original R2D2's, ``x * W / w`` for column
``x`` of a level ``w`` pixels wide (rows alike): on a level at scale s < 1 that lies
``0.5 * (W / w - 1)`` px (about 0.5 (1/s - 1): 0.5 px at s = 0.5) up and left of the
level pixel's centre.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from .params import Features
from .utils import PathLike, atomic_path, import_optional

__all__ = [
    "ImageFeatures",
    "FeatureStore",
    "R2D2Folder",
    "H5Features",
    "feature_format",
    "open_features",
    "pair_key",
    "H5Matches",
]

logger = logging.getLogger(__name__)

R2D2_SUFFIX = ".r2d2"
H5_SUFFIXES = (".h5", ".hdf5")
# Where a store keeps its settings record: an h5 root attribute, a file of a .r2d2 folder.
SETTINGS_ATTRIBUTE = "cv2r2d2_settings"
SETTINGS_FILE = "cv2r2d2_settings.json"


def _parse_record(text: Any, where: Any) -> Optional[Dict[str, Any]]:
    """A stored settings record (JSON text) as a dict; a broken one is reported and
    treated as absent (the output's settings are then unknown)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    try:
        record = json.loads(text)
    except (TypeError, ValueError):
        record = None
    if not isinstance(record, dict):
        logger.warning("ignoring the unreadable settings record of %s", where)
        return None
    return record


@dataclass
class ImageFeatures:
    """The features of one image as the files store them.

    Attributes:
        keypoints: (N, 2) float32 x, y in pixels.
        descriptors: (N, D) float32.
        scores: (N,) float32, best first.
        image_size: (width, height) in pixels.
        sizes: (N,) float32 keypoint diameters in pixels, or None (unknown: h5 files
            of other tools lack them).
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    scores: np.ndarray
    image_size: Tuple[int, int]
    sizes: Optional[np.ndarray] = None

    def __post_init__(self) -> None:
        n = len(self.keypoints)
        if self.keypoints.shape != (n, 2) or self.descriptors.ndim != 2 \
                or len(self.descriptors) != n or self.scores.shape != (n,) \
                or (self.sizes is not None and self.sizes.shape != (n,)):
            raise ValueError(
                f"inconsistent feature arrays: keypoints {self.keypoints.shape}, descriptors "
                f"{self.descriptors.shape}, scores {self.scores.shape}"
                + ("" if self.sizes is None else f", sizes {self.sizes.shape}")
            )

    def __len__(self) -> int:
        return len(self.keypoints)

    @classmethod
    def from_features(cls, features: Features, image_size: Tuple[int, int]) -> "ImageFeatures":
        """From the extractor's output and the image's (width, height)."""
        return cls(features.xy, features.descriptors, features.scores,
                   (int(image_size[0]), int(image_size[1])), features.sizes)


class _Closable:
    """A context manager that closes itself, with a settings record."""

    def close(self) -> None:
        """Release the file, if any."""

    def settings(self) -> Optional[Dict[str, Any]]:
        """The settings record of what made the stored results (None: none stored)."""
        raise NotImplementedError

    def set_settings(self, record: Mapping[str, Any]) -> None:
        """Store the settings record (JSON-serialisable) of the results written next."""
        raise NotImplementedError

    def clear(self) -> None:
        """Delete every stored entry and the settings record."""
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FeatureStore(_Closable):
    """Features of many images, keyed by name; a context manager."""

    path: Path

    def __contains__(self, name: str) -> bool:
        raise NotImplementedError

    def names(self) -> List[str]:
        """The names of the complete entries, sorted."""
        raise NotImplementedError

    def read(self, name: str) -> ImageFeatures:
        raise NotImplementedError

    def write(self, name: str, features: ImageFeatures) -> None:
        """Store (or replace) one image's features, completely or not at all."""
        raise NotImplementedError


def _missing(store: FeatureStore, name: str) -> KeyError:
    return KeyError(f"no features for {name!r} in {store.path}")


class R2D2Folder(FeatureStore):
    """A folder of ``<name>.r2d2`` files (the original R2D2 format)."""

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path} is a file; .r2d2 features go in a folder")

    def _file(self, name: str) -> Path:
        return self.path / (name + R2D2_SUFFIX)

    def settings(self) -> Optional[Dict[str, Any]]:
        record = self.path / SETTINGS_FILE
        return _parse_record(record.read_text(encoding="utf-8"), record) \
            if record.is_file() else None

    def set_settings(self, record: Mapping[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path / SETTINGS_FILE) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=1, sort_keys=True), encoding="utf-8")

    def clear(self) -> None:
        for name in self.names():
            self._file(name).unlink()
        (self.path / SETTINGS_FILE).unlink(missing_ok=True)

    def __contains__(self, name: str) -> bool:
        return self._file(name).is_file()

    def names(self) -> List[str]:
        if not self.path.is_dir():
            return []
        return sorted(p.relative_to(self.path).as_posix()[: -len(R2D2_SUFFIX)]
                      for p in self.path.rglob("*" + R2D2_SUFFIX) if p.is_file())

    def read(self, name: str) -> ImageFeatures:
        if name not in self:
            raise _missing(self, name)
        with np.load(self._file(name)) as data:
            keypoints = np.asarray(data["keypoints"], np.float32).reshape(-1, 3)
            width, height = (int(v) for v in data["imsize"])
            return ImageFeatures(
                keypoints=keypoints[:, :2].copy(),
                descriptors=np.asarray(data["descriptors"], np.float32),
                scores=np.asarray(data["scores"], np.float32),
                image_size=(width, height),
                sizes=keypoints[:, 2].copy(),
            )

    def write(self, name: str, features: ImageFeatures) -> None:
        sizes = features.sizes
        if sizes is None:
            raise ValueError(".r2d2 files need keypoint sizes (features.sizes is None)")
        keypoints = np.concatenate([features.keypoints, sizes[:, None]], axis=1)
        with atomic_path(self._file(name)) as tmp, open(tmp, "wb") as f:
            np.savez(f, imsize=np.asarray(features.image_size, np.int64),
                     keypoints=keypoints.astype(np.float32),
                     descriptors=features.descriptors.astype(np.float32),
                     scores=features.scores.astype(np.float32))


_H5_FEATURE_KEYS = ("keypoints", "descriptors", "scores", "image_size")


def _walk(group: Any, h5py: ModuleType, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(path, object) of every object under ``group``, following external links (which
    ``visititems`` does not: a sharded file's master is made of them); dangling links
    are left out."""
    for key in group:
        item = group.get(key)
        if item is None:
            continue
        yield prefix + key, item
        if isinstance(item, h5py.Group):
            yield from _walk(item, h5py, prefix + key + "/")


class _H5File(_Closable):
    """An HDF5 file opened read-only or for appending, with clear errors."""

    def __init__(self, path: PathLike, writable: bool, purpose: str) -> None:
        self.path = Path(path)
        self._h5py = import_optional("h5py", purpose)
        if not writable and not self.path.is_file():
            raise FileNotFoundError(f"no such file: {self.path}")
        mode = "a" if writable else "r"
        if writable:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # An empty file (atomic_path's placeholder) is a new file, not a broken one.
            if self.path.is_file() and self.path.stat().st_size == 0:
                mode = "w"
        try:
            self._file = self._h5py.File(self.path, mode)
        except OSError as exc:
            raise ValueError(
                f"{self.path} is not a readable HDF5 file ({exc}); if a run was killed "
                "while writing it, delete it and run again"
            ) from exc

    def _replace_group(self, key: str) -> Any:
        if key in self._file:
            del self._file[key]
        return self._file.create_group(key)

    def settings(self) -> Optional[Dict[str, Any]]:
        text = self._file.attrs.get(SETTINGS_ATTRIBUTE)
        return None if text is None else _parse_record(text, self.path)

    def set_settings(self, record: Mapping[str, Any]) -> None:
        self._file.attrs[SETTINGS_ATTRIBUTE] = json.dumps(record, sort_keys=True)
        self._file.flush()

    def clear(self) -> None:
        for key in list(self._file.keys()):
            del self._file[key]
        self._file.attrs.pop(SETTINGS_ATTRIBUTE, None)
        self._file.flush()

    def close(self) -> None:
        if self._file.id.valid:
            self._file.close()


class H5Features(_H5File, FeatureStore):
    """hloc's ``features.h5`` layout."""

    def __init__(self, path: PathLike, writable: bool = False) -> None:
        super().__init__(path, writable, "HDF5 feature files")

    def _complete(self, group: Any) -> bool:
        if not all(isinstance(group.get(k), self._h5py.Dataset) for k in _H5_FEATURE_KEYS):
            return False
        n = group["keypoints"].shape[0]
        return (group["keypoints"].shape == (n, 2) and group["descriptors"].ndim == 2
                and group["descriptors"].shape[1] == n and group["scores"].shape == (n,)
                and group["image_size"].shape == (2,))

    def __contains__(self, name: str) -> bool:
        group = self._file.get(name)
        return isinstance(group, self._h5py.Group) and self._complete(group)

    def names(self) -> List[str]:
        names = [key for key, item in _walk(self._file, self._h5py)
                 if isinstance(item, self._h5py.Group) and self._complete(item)]
        return sorted(names)

    def read(self, name: str) -> ImageFeatures:
        if name not in self:
            raise _missing(self, name)
        group = self._file[name]
        width, height = (int(v) for v in group["image_size"][()])
        sizes = group.get("sizes")
        keypoints = np.asarray(group["keypoints"][()], np.float32)
        valid = isinstance(sizes, self._h5py.Dataset) and sizes.shape == (len(keypoints),)
        return ImageFeatures(
            keypoints=keypoints,
            descriptors=np.ascontiguousarray(np.asarray(group["descriptors"][()], np.float32).T),
            scores=np.asarray(group["scores"][()], np.float32),
            image_size=(width, height),
            sizes=np.asarray(sizes[()], np.float32) if valid else None,
        )

    def write(self, name: str, features: ImageFeatures) -> None:
        group = self._replace_group(name)
        group.create_dataset("keypoints", data=features.keypoints.astype(np.float32))
        group.create_dataset("descriptors", data=features.descriptors.T.astype(np.float32))
        group.create_dataset("scores", data=features.scores.astype(np.float32))
        if features.sizes is not None:
            group.create_dataset("sizes", data=features.sizes.astype(np.float32))
        # Written last: its presence marks the entry complete.
        group.create_dataset("image_size", data=np.asarray(features.image_size, np.int64))
        self._file.flush()


def feature_format(path: PathLike, format: str = "auto") -> str:
    """``"h5"`` or ``"r2d2"``: the format of a feature output, from ``format`` or, for
    ``"auto"``, the suffix of ``path``."""
    if format not in ("auto", "r2d2", "h5"):
        raise ValueError(f"format must be 'auto', 'r2d2' or 'h5', got {format!r}")
    if format != "auto":
        return format
    return "h5" if Path(path).suffix.lower() in H5_SUFFIXES else "r2d2"


def open_features(path: PathLike, format: str = "auto", writable: bool = False) -> FeatureStore:
    """Open a feature store: an ``.h5``/``.hdf5`` file, or a folder of ``.r2d2`` files.

    Args:
        path: the file or folder.
        format: ``"auto"`` (by the suffix), ``"h5"`` or ``"r2d2"``.
        writable: open for writing (the file or folder is created if needed).
    """
    path = Path(path)
    if feature_format(path, format) == "h5":
        return H5Features(path, writable)
    if not writable and not path.is_dir():
        raise FileNotFoundError(f"no such feature file or folder: {path}")
    return R2D2Folder(path)


# --- matches -----------------------------------------------------------------------


def pair_key(name0: str, name1: str) -> str:
    """hloc's h5 key of an image pair: ``name0/name1``, with ``/`` in names as ``-``."""
    return "/".join((name0.replace("/", "-"), name1.replace("/", "-")))


class H5Matches(_H5File):
    """Matches between image pairs in hloc's ``matches.h5`` layout."""

    def __init__(self, path: PathLike, writable: bool = False) -> None:
        super().__init__(path, writable, "HDF5 match files")

    def _group(self, name0: str, name1: str) -> Tuple[Optional[Any], bool]:
        """The stored group of the pair and whether it is stored the other way round."""
        for key, swapped in ((pair_key(name0, name1), False), (pair_key(name1, name0), True)):
            group = self._file.get(key)
            if self._complete(group):
                return group, swapped
        return None, False

    def _complete(self, group: Any) -> bool:
        return isinstance(group, self._h5py.Group) and \
            isinstance(group.get("matching_scores0"), self._h5py.Dataset) and \
            isinstance(group.get("matches0"), self._h5py.Dataset)

    def __contains__(self, pair: Tuple[str, str]) -> bool:
        return self._group(*pair)[0] is not None

    def keys(self) -> List[str]:
        """The h5 keys (:func:`pair_key`) of the complete pairs, sorted."""
        return sorted(key for key, item in _walk(self._file, self._h5py)
                      if key.count("/") == 1 and self._complete(item))

    def read(self, name0: str, name1: str) -> Tuple[np.ndarray, np.ndarray]:
        """The matches of a pair, in either stored order.

        Returns:
            (M, 2) int64 keypoint indices (in name0, in name1) and (M,) float32 scores.
        """
        group, swapped = self._group(name0, name1)
        if group is None:
            raise KeyError(f"no matches for ({name0!r}, {name1!r}) in {self.path}")
        matches0 = np.asarray(group["matches0"][()], np.int64)
        scores0 = np.asarray(group["matching_scores0"][()], np.float32)
        first = np.flatnonzero(matches0 >= 0)
        indices = np.stack([first, matches0[first]], axis=1)
        return (indices[:, ::-1].copy() if swapped else indices), scores0[first]

    def write(self, name0: str, name1: str, indices: np.ndarray, scores: np.ndarray,
              num_keypoints0: int) -> None:
        """Store (or replace) one pair's matches.

        Args:
            indices: (M, 2) keypoint indices (in name0, in name1).
            scores: (M,) match scores (higher is better).
            num_keypoints0: N0, the number of keypoints of name0.
        """
        indices = np.asarray(indices, np.int64).reshape(-1, 2)
        matches0 = np.full(num_keypoints0, -1, np.int32)
        matches0[indices[:, 0]] = indices[:, 1]
        scores0 = np.zeros(num_keypoints0, np.float32)
        scores0[indices[:, 0]] = scores
        other, _ = self._group(name1, name0)
        if other is not None:
            del self._file[other.name]
        group = self._replace_group(pair_key(name0, name1))
        group.create_dataset("matches0", data=matches0)
        # Written last: its presence marks the entry complete.
        group.create_dataset("matching_scores0", data=scores0)
        self._file.flush()
