"""Feature and match files for photo collections, written so that runs resume.

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

An HDF5 file cannot be replaced atomically per entry, so the h5 writers flush after
each entry and an entry counts as done only when all its datasets are there with
consistent shapes; a resumed run rewrites the incomplete ones.

Positions are in pixels, OpenCV's convention (the centre of the top-left pixel is
(0, 0)), as in hloc.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import (
    TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union,
)

import cv2
import numpy as np

from .extractor import Features

if TYPE_CHECKING:
    from .feature2d import R2D2Feature

__all__ = [
    "IMAGE_SUFFIXES",
    "MissingDependencyError",
    "import_optional",
    "progress",
    "atomic_path",
    "list_images",
    "read_image",
    "check_image_suffix",
    "write_image",
    "ImageFeatures",
    "FeatureStore",
    "R2D2Folder",
    "H5Features",
    "feature_format",
    "open_features",
    "pair_key",
    "H5Matches",
    "read_pairs",
    "write_pairs",
    "ExtractionReport",
    "detect",
    "extract_collection",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp",
                  ".tif", ".tiff", ".webp", ".jp2")
R2D2_SUFFIX = ".r2d2"
H5_SUFFIXES = (".h5", ".hdf5")


# --- optional dependencies and progress -------------------------------------------


class MissingDependencyError(ImportError):
    """An optional dependency (an extra of the package) is not installed."""


def import_optional(module: str, purpose: str, extra: str = "sfm") -> ModuleType:
    """Import an optional dependency, or raise an error naming the pip command.

    Args:
        module: the module (and PyPI package) name: ``h5py``, ``pycolmap``, ``tqdm``,
            ``matplotlib``, ``ray``.
        purpose: what needs it, for the message (e.g. ``"HDF5 feature files"``).
        extra: the package extra that installs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is needed for {purpose} but is not installed: "
            f"pip install {module} (or pip install 'cv2r2d2[{extra}]')"
        ) from exc


def progress(iterable: Iterable, total: Optional[int] = None, enabled: bool = True,
             desc: str = "", unit: str = "it") -> Iterable:
    """Wrap ``iterable`` in a tqdm progress bar when enabled and stderr is a terminal.

    The bar counts ``unit`` items (rate per second and time left included).

    Without tqdm the iterable is returned unchanged (a progress bar is no reason to
    fail), after a log message naming the pip command.
    """
    if not enabled or not _stderr_is_terminal():
        return iterable
    try:
        tqdm = import_optional("tqdm", "progress bars")
    except MissingDependencyError as exc:
        logger.info("%s", exc)
        return iterable
    return tqdm.tqdm(iterable, total=total, desc=desc, unit=unit, leave=False)


def _stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


# --- atomic files ------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


# --- images ------------------------------------------------------------------------


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def list_images(inputs: Sequence[PathLike]) -> List[Tuple[str, Path]]:
    """The images named by files, folders (searched recursively) and ``.txt`` lists.

    Each image is named by its path relative to the folder it was found in: the folder
    argument, the list file's folder (list lines are paths relative to it, or absolute
    ones, named by their file name), or, for an image given directly, its own folder.

    Returns:
        (name, path) pairs, in argument order, names sorted within a folder.

    Raises:
        FileNotFoundError: an argument that does not exist.
        ValueError: no image found, or two images with the same name.
    """
    found: List[Tuple[str, Path]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image(p))
            found += [(p.relative_to(path).as_posix(), p) for p in files]
        elif path.is_file() and path.suffix.lower() == ".txt":
            for line in path.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    listed = Path(line)
                    # A name must stay inside an output folder: no absolute path, no "..".
                    outside = listed.is_absolute() or ".." in listed.parts
                    found.append((listed.name if outside else listed.as_posix(),
                                  path.parent / listed))
        elif path.is_file():
            found.append((path.name, path))
        else:
            raise FileNotFoundError(f"no such image, folder or list file: {os.fspath(item)!r}")
    if not found:
        raise ValueError(
            f"no images found in {', '.join(map(os.fspath, inputs))} "
            f"(looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    seen: Dict[str, Path] = {}
    for name, path in found:
        if name in seen and seen[name] != path:
            raise ValueError(f"two images have the name {name!r}: {seen[name]} and {path}")
        seen[name] = path
    return list(seen.items())


def read_image(path: PathLike) -> np.ndarray:
    """Read an image as OpenCV does (8-bit BGR), from any path, including non-ASCII ones.

    Raises:
        OSError: the file cannot be read or decoded.
    """
    data = np.fromfile(os.fspath(path), np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise OSError(f"cannot decode {os.fspath(path)} as an image")
    return image


def check_image_suffix(path: PathLike) -> None:
    """Raise a ValueError unless OpenCV can write an image in the format of the path's
    suffix (checked before a long computation, not after it)."""
    suffix = Path(path).suffix
    if not cv2.haveImageWriter(f"image{suffix}"):
        raise ValueError(f"cannot write {os.fspath(path)}: OpenCV has no encoder for "
                         f"{suffix or 'a name without suffix'!r} (use .png or .jpg)")


def write_image(path: PathLike, image: np.ndarray) -> None:
    """Write an image as ``cv2.imwrite`` does, in the format of the path's suffix, to any
    path (non-ASCII included), atomically.

    Raises:
        ValueError: OpenCV has no encoder for the suffix.
    """
    check_image_suffix(path)
    suffix = Path(path).suffix
    ok, data = cv2.imencode(suffix, image)
    if not ok:
        raise OSError(f"cannot encode the image as {suffix}")
    with atomic_path(path) as tmp:
        data.tofile(tmp)


# --- features ----------------------------------------------------------------------


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
    """A context manager that closes itself."""

    def close(self) -> None:
        """Release the file, if any."""

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


def read_pairs(path: PathLike) -> List[Tuple[str, str]]:
    """Image pairs from a text file, one ``name0 name1`` per line (hloc's format).

    Blank lines and lines starting with ``#`` are ignored.
    """
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'name0 name1', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def write_pairs(path: PathLike, pairs: Iterable[Tuple[str, str]]) -> None:
    """Write image pairs in :func:`read_pairs`' format, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{a} {b}\n" for a, b in pairs), encoding="utf-8")


# --- extraction over a collection ---------------------------------------------------


@dataclass
class ExtractionReport:
    """What :func:`extract_collection` did: names extracted, skipped (done before) and
    failed (name, reason)."""

    extracted: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)


def detect(feature: "R2D2Feature", image: np.ndarray) -> Features:
    """R2D2 features of one OpenCV image as arrays (no ``cv2.KeyPoint`` objects).

    Returns:
        :class:`~cv2r2d2.extractor.Features`, positions in pixels, best first.
    """
    return feature.detectFeatures(image)


def extract_collection(
    images: Sequence[Tuple[str, PathLike]],
    store: FeatureStore,
    feature: "R2D2Feature",
    overwrite: bool = False,
    show_progress: bool = False,
) -> ExtractionReport:
    """Extract and store the features of many images, resuming a previous run.

    Images already in ``store`` are skipped unless ``overwrite``; images that cannot
    be read are logged, skipped and listed in the report's ``failed``.

    Args:
        images: (name, path) pairs, e.g. from :func:`list_images`.
        store: where to write (:func:`open_features` with ``writable=True``).
        feature: the extractor, e.g. ``R2D2Feature.create(...)``.
    """
    report = ExtractionReport()
    for name, path in progress(images, len(images), show_progress, "extract"):
        if not overwrite and name in store:
            report.skipped.append(name)
            continue
        try:
            image = read_image(path)
        except OSError as exc:
            logger.warning("skipping %s: %s", name, exc)
            report.failed.append((name, str(exc)))
            continue
        features = detect(feature, image)
        store.write(name, ImageFeatures.from_features(features, image.shape[1::-1]))
        logger.debug("wrote %d features of %s", len(features), name)
        report.extracted.append(name)
    return report
