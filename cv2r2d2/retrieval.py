"""Image retrieval from stored local features: which images of a collection look alike.

Each image is summarised by a bag of visual words (Sivic and Zisserman, ICCV 2003) of its
stored local descriptors: every descriptor is assigned to its most similar word of a
codebook, learned by spherical k-means on a sample of the collection's own descriptors
(the same for the same seed; no network is involved); the image's term frequencies
(the share of its descriptors on each word) are raised to ``power`` (0.5, the square
root, tempers the bursts of repeated structure: windows, leaves), weighted by each word's
inverse document frequency over the N indexed images (``log((N + 1) / images using
it)``) and normalised to unit length. Two images' similarity is the dot product of their
vectors, in [0, 1].

Measured on the three scenes of ../shared/images mixed into one collection of 44
photos (``benchmarks/bench_retrieval.py``): with K = 10 it selects 0.83 of the pairs
that exhaustive matching verifies with 50 or more inliers (choosing each photo's 10 pairs
of most inliers would select 0.89; K = 15: 0.95) and ranks every photo's same-scene
photos first, where VLAD vectors (16 or 64 words, square-root power law,
intra-normalised) select 0.73-0.74 and rank them first for 52-68% of the photos, 256
words 0.77, and 2048 words 0.82 for twice the time; a codebook learned on one of the
scenes alone, standing for a generic one, selects 0.72-0.75.

The vectors (and the codebook, with the settings that made it) are stored beside the
features, in ``<features>.retrieval.h5`` (:func:`index_path`), and a later run reuses
them: images added to the store since are described and appended (a killed run keeps
the blocks it finished), while features that changed or vanished, or a settings record
(``FeatureStore.settings()``) that differs, make the whole index be built again, with a
warning, never silently reused. The term frequencies are stored and the document
frequencies counted from them when the index is opened, so appended images weigh in.

Public API (used by the ``pairs`` command, ``--pairs retrieval:K`` and localisation):

- :meth:`RetrievalIndex.build` (build or update the index of a store),
  :meth:`RetrievalIndex.load` (open a built one), :meth:`RetrievalIndex.query` (the k
  images most similar to a query image's descriptors), :meth:`RetrievalIndex.pairs`
  (each image with its k most similar others);
- :func:`retrieval_pairs` (the last in one call); the top-k search in blocks is
  :func:`cv2r2d2.neighbours.top_k_neighbours`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .checks import check_count, check_executor
from .neighbours import top_k_neighbours
from .utils import PathLike, atomic_path, import_optional, map_blocks_here

if TYPE_CHECKING:
    from .stores import FeatureStore

__all__ = [
    "RetrievalSettings",
    "RetrievalIndex",
    "index_path",
    "retrieval_pairs",
]

logger = logging.getLogger(__name__)

FORMAT = "cv2r2d2-retrieval-bow/1"
INDEX_SUFFIX = ".retrieval.h5"
_BLOCK_IMAGES = 256  # images described per appended block (the unit a killed run keeps)
_READ_ROWS = 65536  # index rows read at once outside top_k_neighbours


@dataclass(frozen=True)
class RetrievalSettings:
    """How image vectors are made; stored with the index, which a change rebuilds.

    Attributes:
        num_words: visual words of the codebook (values per image vector).
        power: exponent on the term frequencies (0.5: square root; 1: plain tf-idf).
        sample_images: at most this many images (chosen at random) give the sample
            the codebook is learned on.
        sample_descriptors: at most this many descriptors in that sample, spread evenly
            over its images.
        iterations: at most this many k-means iterations (it stops earlier when no
            assignment changes).
        seed: of the random sample and the k-means start.
    """

    num_words: int = 1024
    power: float = 0.5
    sample_images: int = 1000
    sample_descriptors: int = 100_000
    iterations: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_words", "sample_images", "sample_descriptors", "iterations"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RetrievalSettings.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool):
            raise ValueError(f"RetrievalSettings.seed must be an integer, got {self.seed!r}")
        if not isinstance(self.power, (int, float)) or not 0 < self.power <= 1:
            raise ValueError(f"RetrievalSettings.power must be in (0, 1], got {self.power!r}")

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def index_path(features: PathLike) -> Path:
    """Where the index of a features file or folder is kept: beside it, its name with
    ``.retrieval.h5`` in place of an ``.h5``/``.hdf5`` suffix (``features.h5`` ->
    ``features.retrieval.h5``; a folder ``feats`` -> ``feats.retrieval.h5``)."""
    path = Path(features)
    stem = path.stem if path.suffix.lower() in (".h5", ".hdf5") else path.name
    return path.with_name(stem + INDEX_SUFFIX)


# --- vectors -----------------------------------------------------------------------


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _check_descriptors(descriptors: Any, dimension: Optional[int] = None) -> np.ndarray:
    if not isinstance(descriptors, np.ndarray):
        raise TypeError(f"descriptors must be a numpy array, got {type(descriptors).__name__}")
    if descriptors.ndim != 2 or (dimension is not None and descriptors.shape[1] != dimension):
        expected = f"(N, {dimension})" if dimension is not None else "(N, D)"
        raise ValueError(f"descriptors must be {expected}, got shape {descriptors.shape}")
    if not np.issubdtype(descriptors.dtype, np.floating):
        raise TypeError(f"descriptors must be float32 (or another float type), got "
                        f"{descriptors.dtype}")
    descriptors = descriptors.astype(np.float32, copy=False)
    if not np.isfinite(descriptors).all():
        raise ValueError("descriptors hold NaN or infinite values")
    return descriptors


def _assign(descriptors: np.ndarray, words: np.ndarray, block: int = 16384) -> np.ndarray:
    """(N,) index of each unit row's most similar word (rows of ``words``)."""
    labels = np.empty(len(descriptors), np.int64)
    for start in range(0, len(descriptors), block):
        labels[start:start + block] = np.argmax(descriptors[start:start + block] @ words.T, axis=1)
    return labels


def _term_frequencies(descriptors: np.ndarray, codebook: np.ndarray, power: float
                      ) -> np.ndarray:
    """(W,) float32: the share of the (N, D) descriptors on each of the W words,
    raised to ``power``; zeros without descriptors."""
    descriptors = _check_descriptors(descriptors, codebook.shape[1])
    counts = np.bincount(_assign(_unit_rows(descriptors), codebook), minlength=len(codebook))
    return (counts / max(len(descriptors), 1)).astype(np.float32) ** power


def _spherical_kmeans(samples: np.ndarray, num_words: int, iterations: int,
                      rng: np.random.Generator) -> np.ndarray:
    """(num_words, D) unit centres of unit ``samples``: started on distinct samples
    (k-means++ took 10 times as long as the iterations here, for no better retrieval),
    cosine assignment, centres the normalised sums; an emptied word is re-seeded at
    the sample worst served."""
    words = samples[np.sort(rng.choice(len(samples), num_words, replace=False))]
    labels = None
    for _ in range(iterations):
        new = _assign(samples, words)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        sums = np.zeros_like(words)
        _add_rows(sums, labels, samples)
        counts = np.bincount(labels, minlength=num_words)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            similarity = np.einsum("nd,nd->n", samples, words[labels])
            sums[empty] = samples[np.argsort(similarity)[:len(empty)]]
        words = _unit_rows(sums).astype(np.float32)
    return words


def _add_rows(sums: np.ndarray, labels: np.ndarray, rows: np.ndarray) -> None:
    """``sums[labels[i]] += rows[i]`` for all i (a sort and a segmented sum:
    ``np.add.at`` is several times slower)."""
    order = np.argsort(labels, kind="stable")
    used, starts = np.unique(labels[order], return_index=True)
    if len(used):
        sums[used] += np.add.reduceat(rows[order], starts, axis=0)


# --- the index ---------------------------------------------------------------------


def _digest(features: Any) -> int:
    """A 64-bit fingerprint of one image's stored features."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.asarray(features.image_size, np.int64).tobytes())
    digest.update(np.ascontiguousarray(features.keypoints, np.float32).tobytes())
    digest.update(np.ascontiguousarray(features.descriptors, np.float32).tobytes())
    return int.from_bytes(digest.digest(), "little")


def _stamp(path: Path) -> str:
    """Size and modification time of a features file; "" for a folder, whose files
    may change without its own time changing. When the stamp differs from the one
    recorded (opening an h5 file for writing changes it), every indexed image's
    features are read again and compared with their fingerprints."""
    if not path.is_file():
        return ""
    stat = path.stat()
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _store_settings(store: "FeatureStore") -> Optional[Dict[str, Any]]:
    settings = getattr(store, "settings", None)
    return settings() if callable(settings) else None


def _as_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _names(dataset: Any, count: int) -> List[str]:
    return [n.decode() if isinstance(n, bytes) else n for n in dataset[:count]]


class _Weighted:
    """Rows of stored term frequencies read as unit tf-idf vectors (for
    :func:`~cv2r2d2.neighbours.top_k_neighbours`)."""

    def __init__(self, frequencies: Any, count: int, idf: np.ndarray) -> None:
        self.frequencies, self.count, self.idf = frequencies, count, idf

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.count)
        block = np.asarray(self.frequencies[start:stop], np.float32) * self.idf
        return _unit_rows(block)


class _StoreWorker:
    """The feature store images are described from: this process's open one, or
    (pickled to a Ray actor) one of its kind opened there, read-only, from its path."""

    def __init__(self, store: "FeatureStore") -> None:
        self.kind, self.path, self.opened = type(store), os.fspath(store.path), store

    def __getstate__(self) -> Dict[str, Any]:
        return dict(kind=self.kind, path=self.path, opened=None)

    def __call__(self) -> "FeatureStore":
        return self.opened if self.opened is not None else self.kind(self.path)


@dataclass(frozen=True)
class _Describe:
    """(term frequencies as float16, digest) of each image of a block (picklable)."""

    codebook: np.ndarray
    power: float

    def __call__(self, store: "FeatureStore", names: List[str]) -> List[Tuple[np.ndarray, int]]:
        rows = []
        for name in names:
            features = store.read(name)
            rows.append((_term_frequencies(features.descriptors, self.codebook, self.power)
                         .astype(np.float16), _digest(features)))
        return rows


class RetrievalIndex:
    """The bag-of-words vectors of a feature store's images, and the codebook.

    Build (or bring up to date) with :meth:`build`, open a built one with :meth:`load`.
    The vectors stay in the file and are read block by block, so memory does not grow
    with the collection but for the names (2 bytes per word and image on disk).

    Attributes:
        path: the index file.
        settings: the :class:`RetrievalSettings` it was made with.
        codebook: (W, D) float32 unit visual words.
        names: the indexed images, in the order of their rows (sorted when built at
            once; images added later follow).
        idf: (W,) float32 inverse document frequency of each word over those images.
    """

    def __init__(self, path: Path, settings: RetrievalSettings, codebook: np.ndarray,
                 names: List[str], idf: np.ndarray) -> None:
        self.path = path
        self.settings = settings
        self.codebook = codebook
        self.names = names
        self.idf = idf

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (f"RetrievalIndex({str(self.path)!r}, {len(self)} images, "
                f"{len(self.codebook)} words)")

    # --- building ---------------------------------------------------------------

    @classmethod
    def build(cls, store: "FeatureStore", path: Optional[PathLike] = None,
              settings: Optional[RetrievalSettings] = None, overwrite: bool = False,
              show_progress: bool = False, executor: Any = None) -> "RetrievalIndex":
        """The index of every image of ``store``, made or brought up to date.

        An index already at ``path`` made with the same settings is reused: images the
        store gained since are described and appended. One whose features changed or
        vanished, or whose settings (or the store's settings record) differ, is built
        again, with a warning.

        Args:
            store: an open feature store (:func:`cv2r2d2.stores.open_features`).
            path: the index file (None: :func:`index_path` of the store's path).
            settings: how vectors are made (None: :class:`RetrievalSettings` defaults).
            overwrite: build it again whatever is there.
            show_progress: a progress bar (on a terminal).
            executor: where the images are described: None, this process; a
                :class:`~cv2r2d2.distributed.RayExecutor` (or any executor with its
                ``map_blocks``), its actors, which read the store's path (readable on
                every node). The codebook is learned here; the index is the same.

        Raises:
            ValueError: the store holds no features, or no descriptors to learn from.
        """
        executor = check_executor(executor)
        h5py = import_optional("h5py", "retrieval indexes")
        settings = RetrievalSettings() if settings is None else settings
        if not isinstance(settings, RetrievalSettings):
            raise TypeError(f"settings must be RetrievalSettings, got {type(settings).__name__}")
        path = index_path(store.path) if path is None else Path(path)
        names = store.names()
        if not names:
            raise ValueError(f"{store.path} holds no features to index")
        source = {"features": Path(store.path).name, "settings": _store_settings(store)}
        if overwrite or not path.exists():
            cls._create(path, h5py, store, names, settings, source)
        else:
            reason = cls._stale(path, h5py, store, names, settings, source)
            if reason is not None:
                logger.warning("building the retrieval index %s again: %s", path, reason)
                cls._create(path, h5py, store, names, settings, source)
        cls._append(path, h5py, store, names, show_progress, executor)
        return cls.load(path)

    @staticmethod
    def _stale(path: Path, h5py: Any, store: "FeatureStore", names: Sequence[str],
               settings: RetrievalSettings, source: Dict[str, Any]) -> Optional[str]:
        """Why the index at ``path`` cannot be extended to ``names`` (None: it can)."""
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    return f"it is not a {FORMAT} index"
                if f.attrs["settings"] != _as_json(settings.as_dict()):
                    return f"made with {f.attrs['settings']}, now {_as_json(settings.as_dict())}"
                if json.loads(f.attrs["source"]).get("settings") != \
                        json.loads(_as_json(source["settings"])):
                    return "the features' settings record differs from the one it was made from"
                count = int(f.attrs["count"])
                indexed = _names(f["names"], count)
                digests = f["digests"][:count]
                stamp = f.attrs["stamp"]
        except (OSError, KeyError, ValueError) as exc:
            return f"it cannot be read ({exc})"
        vanished = sorted(set(indexed) - set(names))
        if vanished:
            return f"{len(vanished)} indexed image(s) have no features any more ({vanished[0]}...)"
        if stamp and stamp == _stamp(Path(store.path)):
            return None
        for name, digest in zip(indexed, digests):
            if _digest(store.read(name)) != int(digest):
                return f"the features of {name} (at least) changed since"
        return None

    @staticmethod
    def _create(path: Path, h5py: Any, store: "FeatureStore", names: Sequence[str],
                settings: RetrievalSettings, source: Dict[str, Any]) -> None:
        """Learn the codebook and write an index without vectors (atomically)."""
        start = time.perf_counter()
        rng = np.random.default_rng(settings.seed)
        chosen = sorted(rng.choice(len(names), min(len(names), settings.sample_images),
                                   replace=False))
        per_image = math.ceil(settings.sample_descriptors / len(chosen))
        sample = []
        for i in chosen:
            descriptors = _check_descriptors(store.read(names[i]).descriptors)
            if len(descriptors) > per_image:
                descriptors = descriptors[np.sort(rng.choice(len(descriptors), per_image,
                                                             replace=False))]
            sample.append(descriptors)
        samples = _unit_rows(np.concatenate(sample))
        if not len(samples):
            raise ValueError(f"the images of {store.path} have no descriptors to learn a "
                             "codebook from")
        num_words = min(settings.num_words, len(samples))
        if num_words < settings.num_words:
            logger.warning("only %d descriptors to learn %d visual words from: learning %d",
                           len(samples), settings.num_words, num_words)
        codebook = _spherical_kmeans(samples, num_words, settings.iterations, rng)
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["settings"] = _as_json(settings.as_dict())
            f.attrs["source"] = _as_json(source)
            f.attrs["stamp"] = ""
            f.attrs["count"] = 0
            f.create_dataset("codebook", data=codebook)
            f.create_dataset("names", shape=(0,), maxshape=(None,),
                             dtype=h5py.string_dtype(), chunks=(1024,))
            f.create_dataset("digests", shape=(0,), maxshape=(None,), dtype=np.uint64,
                             chunks=(1024,))
            f.create_dataset("frequencies", shape=(0, num_words), maxshape=(None, num_words),
                             dtype=np.float16, chunks=(max(1, 2 ** 19 // num_words), num_words))
        logger.info("learned %d visual words from %d descriptors of %d image(s) in %.1f s",
                    num_words, len(samples), len(chosen), time.perf_counter() - start)

    @staticmethod
    def _append(path: Path, h5py: Any, store: "FeatureStore", names: Sequence[str],
                show_progress: bool, executor: Any = None) -> None:
        """Describe the images of ``names`` the index lacks, block by block."""
        stamp = _stamp(Path(store.path))
        # On an executor, larger blocks: each is one run of its actors.
        block_images = _BLOCK_IMAGES if executor is None else 16 * _BLOCK_IMAGES
        with h5py.File(path, "a") as f:
            count = int(f.attrs["count"])
            done = set(_names(f["names"], count))
            todo = [name for name in names if name not in done]
            if todo:
                describe = _Describe(f["codebook"][()], json.loads(f.attrs["settings"])["power"])
                worker = _StoreWorker(store)
                start = time.perf_counter()
                for first in range(0, len(todo), block_images):
                    block = todo[first:first + block_images]
                    if executor is None:
                        rows = map_blocks_here(worker, describe, block, show_progress,
                                               "describing images", "image")
                    else:
                        rows = executor.map_blocks(worker, describe, block, show_progress,
                                                   "describing images", "image")
                    end = count + len(block)
                    for key, data in (("frequencies", np.stack([r[0] for r in rows])),
                                      ("digests", np.asarray([r[1] for r in rows], np.uint64)),
                                      ("names", np.asarray(block, object))):
                        f[key].resize(end, axis=0)
                        f[key][count:end] = data
                    # Written last: the rows below "count" are complete.
                    f.attrs["count"] = count = end
                    f.flush()
                seconds = time.perf_counter() - start
                logger.info("described %d image(s) in %.1f s (%.1f ms each) into %s", len(todo),
                            seconds, 1000 * seconds / len(todo), path)
            f.attrs["stamp"] = stamp

    # --- use ----------------------------------------------------------------------

    @classmethod
    def load(cls, path: PathLike) -> "RetrievalIndex":
        """A built index (see :meth:`build`, which checks it against its store; this
        does not).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file is not a retrieval index.
        """
        h5py = import_optional("h5py", "retrieval indexes")
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such retrieval index: {path}")
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != FORMAT:
                    raise ValueError(f"{path} is not a retrieval index ({FORMAT})")
                settings = RetrievalSettings(**json.loads(f.attrs["settings"]))
                count = int(f.attrs["count"])
                names = _names(f["names"], count)
                codebook = f["codebook"][()]
                used = np.zeros(len(codebook), np.int64)
                for start in range(0, count, _READ_ROWS):
                    used += (f["frequencies"][start:min(start + _READ_ROWS, count)] > 0).sum(0)
        except (OSError, KeyError) as exc:
            raise ValueError(f"{path} is not a readable retrieval index ({exc}); delete it "
                             "and build it again") from exc
        # log((N + 1) / n) rather than log(N / n): the same retrieval here, and an index
        # of one image (or words in every image) still weighs something.
        idf = np.log((count + 1) / np.maximum(used, 1)).astype(np.float32)
        return cls(path, settings, codebook, names, idf)

    def describe(self, descriptors: np.ndarray) -> np.ndarray:
        """The (W,) float32 unit tf-idf vector of an image's (N, D) local descriptors
        (zeros without descriptors)."""
        frequencies = _term_frequencies(descriptors, self.codebook, self.settings.power)
        return _unit_rows(frequencies * self.idf)

    def query(self, descriptors: np.ndarray, k: int) -> List[Tuple[str, float]]:
        """The k indexed images most similar to an image of local ``descriptors``.

        Args:
            descriptors: (N, D) float32 local descriptors of the query image, made with
                the settings of the indexed features.
            k: images to return (at most the index's size).

        Returns:
            (name, similarity in [0, 1]) pairs, most similar first (equal ones in index
            order); empty when the query has no descriptors (nothing to compare).
        """
        check_count(k, "k")
        vector = self.describe(descriptors)
        if not len(descriptors) or not len(self):
            return []
        h5py = import_optional("h5py", "retrieval indexes")
        with h5py.File(self.path, "r") as f:
            vectors = _Weighted(f["frequencies"], len(self), self.idf)
            scores = np.concatenate([vectors[start:start + _READ_ROWS] @ vector
                                     for start in range(0, len(self), _READ_ROWS)])
        best = np.lexsort((np.arange(len(scores)), -scores))[:min(k, len(self))]
        return [(self.names[i], float(scores[i])) for i in best]

    def pairs(self, k: int, names: Optional[Sequence[str]] = None,
              block_size: int = 2048) -> List[Tuple[str, str]]:
        """Each image with its k most similar others, each unordered pair once.

        Args:
            k: neighbours per image (all others when the collection is smaller).
            names: only these images, with neighbours among them (None: all).
            block_size: images compared at once (see
                :func:`~cv2r2d2.neighbours.top_k_neighbours`).

        Returns:
            (name0, name1) pairs: images in index order, each followed by its
            neighbours best first, a pair already listed the other way round left out.

        Raises:
            KeyError: a name the index does not hold.
        """
        check_count(k, "k")
        position = {name: i for i, name in enumerate(self.names)}
        if names is None:
            rows = np.arange(len(self))
        else:
            missing = [name for name in names if name not in position]
            if missing:
                raise KeyError(f"{self.path} has no vector for {missing[0]!r}"
                               + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
            rows = np.unique(np.asarray([position[name] for name in names], np.int64))
        if k >= len(rows) > 1:
            logger.info("k = %d >= the %d other images: every pair", k, len(rows) - 1)
        h5py = import_optional("h5py", "retrieval indexes")
        with h5py.File(self.path, "r") as f:
            vectors = _Weighted(f["frequencies"], len(self), self.idf)
            neighbours, _ = top_k_neighbours(vectors, k, rows, block_size)
        seen = set()
        pairs = []
        for row, others in zip(rows, neighbours):
            for other in others:
                key = (min(row, other), max(row, other))
                if key not in seen:
                    seen.add(key)
                    pairs.append((self.names[row], self.names[other]))
        return pairs


def retrieval_pairs(store: "FeatureStore", k: int, names: Optional[Sequence[str]] = None,
                    settings: Optional[RetrievalSettings] = None,
                    show_progress: bool = False) -> List[Tuple[str, str]]:
    """Each image of ``store`` (or of ``names``) with its k most similar others, each
    pair once: :meth:`RetrievalIndex.pairs` of the store's index, built or brought up to
    date beside it first (:meth:`RetrievalIndex.build`)."""
    check_count(k, "k")
    index = RetrievalIndex.build(store, settings=settings, show_progress=show_progress)
    return index.pairs(k, names)
