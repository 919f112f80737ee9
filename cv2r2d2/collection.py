"""Running the extractor and the matcher over a photo collection, resuming a previous run.

:func:`extract_collection` writes the features of many images into a feature store,
:func:`match_collection` the mutual nearest-neighbour matches of many image pairs into a
match file (stores: :mod:`cv2r2d2.stores`), as :class:`MatchingSettings` say; both skip
what is already done unless told to overwrite, and show a progress bar when asked (on a
terminal). Both record the settings they write with in the output and never add to an
output of other settings (:mod:`cv2r2d2.provenance`).

:class:`LocalExecutor` runs them on this machine, from and to files; its twin
:class:`cv2r2d2.distributed.RayExecutor` runs them on a Ray cluster with the same methods
and arguments, so a caller chooses where the work runs once, by the executor it makes.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .params import Features
from .image import read_image
from .matching import DEFAULT_MAX_ELEMENTS, match_batch
from .provenance import check_reuse, features_record, matches_record
from .steerers import as_steerers, rotation_angles
from .stores import FeatureStore, H5Matches, ImageFeatures, open_features
from .utils import PathLike, map_blocks_here, progress, torch_device

if TYPE_CHECKING:
    from .config import R2D2Config
    from .feature2d import R2D2Feature

__all__ = [
    "ExtractionReport",
    "detect",
    "extract_collection",
    "MatchingSettings",
    "MatchingReport",
    "match_collection",
    "LocalExecutor",
]

logger = logging.getLogger(__name__)


def _throughput(count: int, unit: str, seconds: float) -> str:
    rate = count / seconds if seconds > 0 else 0.0
    return f"{count} {unit}(s) in {seconds:.1f} s: {rate:.2f} {unit}s/s"


@dataclass
class ExtractionReport:
    """What an extraction did: names extracted, skipped (done before) and failed (name,
    reason), and the seconds spent extracting (the model loaded)."""

    extracted: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: List[Tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        """Images extracted per second of the extraction."""
        return len(self.extracted) / self.seconds if self.seconds > 0 else 0.0

    def throughput(self) -> str:
        """One line: images extracted, seconds, images per second."""
        return _throughput(len(self.extracted), "image", self.seconds)


def detect(feature: "R2D2Feature", image: np.ndarray) -> Features:
    """R2D2 features of one OpenCV image as arrays (no ``cv2.KeyPoint`` objects).

    Returns:
        :class:`~cv2r2d2.params.Features`, positions in pixels, best first.
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
    be read are logged, skipped and listed in the report's ``failed``. The store keeps
    the settings record of ``feature``: features of other settings in it raise
    :class:`~cv2r2d2.provenance.SettingsMismatchError`, or with ``overwrite`` are
    deleted first.

    Args:
        images: (name, path) pairs, e.g. from :func:`list_images`.
        store: where to write (:func:`open_features` with ``writable=True``).
        feature: the extractor, e.g. ``R2D2Feature.create(...)``.
    """
    prepare_output(store, features_record(feature.getConfig()), overwrite)
    report = ExtractionReport()
    start = time.perf_counter()
    for name, path in progress(images, len(images), show_progress, "extract", unit="image"):
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
    report.seconds = time.perf_counter() - start
    return report


def prepare_output(store: Any, record: Dict[str, Any], overwrite: bool) -> None:
    """Make ``store`` (a feature store or a match file) ready for results of ``record``:
    reused when its results are of the same settings, cleared first with ``overwrite``
    when not, refused otherwise (:func:`cv2r2d2.provenance.check_reuse`)."""
    entries = store.keys() if isinstance(store, H5Matches) else store.names()
    if check_reuse(store.settings(), record, bool(entries), store.path, overwrite):
        store.clear()
    if store.settings() != record:
        store.set_settings(record)


@dataclass(frozen=True)
class MatchingSettings:
    """How :func:`match_collection` matches, validated when made; the defaults are plain
    mutual nearest neighbours (``cv2.BFMatcher(NORM_L2, crossCheck=True)``'s pairs).

    Made once (the command line makes it from its options) and passed unchanged to
    whatever runs the matching, the Ray workers included.

    Attributes:
        max_distance: drop matches farther apart than this L2 distance (None: none).
        ratio: drop matches failing Lowe's ratio test at this ratio, both ways, in (0, 1]
            (None: no test).
        rotations: 1 matches the descriptors as they are; N > 1, a divisor of 360, matches
            each pair under the best of the steering angles k * 360 / N, with the
            extractor's steerers (:func:`cv2r2d2.matching.match_batch`).
        device: the matcher's torch device, e.g. ``"cpu"`` or ``"cuda:0"``; None: CUDA
            when available, else the CPU. Machine-specific: the executor checks it where
            the matching runs, before anything is written; not recorded.
    """

    max_distance: Optional[float] = None
    ratio: Optional[float] = None
    rotations: int = 1
    device: Optional[str] = None

    def __post_init__(self) -> None:
        if self.max_distance is not None and not self.max_distance >= 0:
            raise ValueError(f"max_distance must be >= 0 or None, got {self.max_distance!r}")
        if self.ratio is not None and not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must lie in (0, 1] or be None, got {self.ratio!r}")
        rotation_angles(self.rotations)
        object.__setattr__(self, "rotations", int(self.rotations))
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(f"device must be None or a string such as 'cpu' or 'cuda:0', "
                            f"got {self.device!r}")

    def record(self, features: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """The settings record of matches of features recorded as ``features`` (see
        :func:`cv2r2d2.provenance.matches_record`); the device is not part of it."""
        return matches_record(features, dict(max_distance=self.max_distance, ratio=self.ratio,
                                             rotations=self.rotations))


@dataclass
class MatchingReport:
    """What a matching did: pairs matched and pairs skipped (done before), with the
    number of matches of each matched pair; pairs that failed (pair, reason: on a Ray
    cluster, their worker died; none on one machine); the seconds spent matching."""

    matched: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    num_matches: List[int] = field(default_factory=list)
    failed: List[Tuple[Tuple[str, str], str]] = field(default_factory=list)
    seconds: float = 0.0

    def throughput(self) -> str:
        """One line: pairs matched, seconds, pairs per second."""
        return _throughput(len(self.matched), "pair", self.seconds)


class _DescriptorCache:
    """The descriptors of the most recently used images (pairs reuse their images)."""

    def __init__(self, store: FeatureStore, capacity: int) -> None:
        self._store = store
        self._capacity = capacity
        self._items: "OrderedDict[str, np.ndarray]" = OrderedDict()

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._items:
            self._items.move_to_end(name)
        else:
            self._items[name] = self._store.read(name).descriptors
            if len(self._items) > self._capacity:
                self._items.popitem(last=False)
        return self._items[name]


def match_collection(
    features: FeatureStore,
    pairs: Sequence[Tuple[str, str]],
    matches: H5Matches,
    settings: Optional[MatchingSettings] = None,
    steerers: Any = None,
    overwrite: bool = False,
    show_progress: bool = False,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> MatchingReport:
    """Match image pairs of a feature store and write the matches, resuming a previous run.

    Pairs already in ``matches`` (in either order) are skipped unless ``overwrite``.
    Scores stored are ``1 - d^2 / 2``, the cosine similarity of unit descriptors (as
    hloc's nearest-neighbour matcher stores).

    Args:
        features: the feature store (:func:`cv2r2d2.stores.open_features`).
        pairs: (name0, name1) pairs, e.g. from :func:`cv2r2d2.pairs.parse_pairs`.
        matches: the writable match file.
        settings: how to match (None: ``MatchingSettings()``, plain mutual nearest
            neighbours); its device is used as it is (:meth:`LocalExecutor.match` checks
            it before opening the output).
        steerers: with ``settings.rotations`` > 1, the ``R2D2Feature`` that extracted
            ``features`` (its model's steerers; the stores do not record the model) or
            its ``getSteerers(rotations)``.
        max_elements: as :func:`~cv2r2d2.matching.match_batch`.
    """
    settings = _matching_settings(settings)
    if settings.rotations > 1:
        steerers = as_steerers(steerers, settings.rotations)  # fitted once, before any pair
    prepare_output(matches, settings.record(features.settings()), overwrite)
    start = time.perf_counter()
    report = MatchingReport()
    todo = []
    for pair in pairs:
        if not overwrite and pair in matches:
            report.skipped.append(pair)
        else:
            todo.append(pair)
    cache = _DescriptorCache(features, capacity=64)

    def matched() -> Iterator[Tuple[str, str]]:
        # One batch of pairs at a time, each written (and flushed) when computed.
        chunk = 32
        for start in range(0, len(todo), chunk):
            group = todo[start : start + chunk]
            descriptors = [(cache[a], cache[b]) for a, b in group]
            results = match_batch(descriptors, cv2.NORM_L2, settings.max_distance,
                                  settings.ratio, settings.device, max_elements,
                                  settings.rotations, steerers)
            for (a, b), (d_a, _), (indices, distances) in zip(group, descriptors, results):
                matches.write(a, b, indices, 1 - distances.astype(np.float32) ** 2 / 2, len(d_a))
                report.matched.append((a, b))
                report.num_matches.append(len(indices))
                yield a, b

    for _ in progress(matched(), len(todo), show_progress, "match", unit="pair"):
        pass
    report.seconds = time.perf_counter() - start
    return report


def _matching_settings(settings: Optional[MatchingSettings]) -> MatchingSettings:
    """``settings``, or the defaults for None; a TypeError for anything else."""
    if settings is None:
        return MatchingSettings()
    if not isinstance(settings, MatchingSettings):
        raise TypeError(f"settings must be a MatchingSettings, got {type(settings).__name__}")
    return settings


@dataclass(frozen=True)
class LocalExecutor:
    """Extraction and matching of a collection on this machine, from and to files.

    :class:`cv2r2d2.distributed.RayExecutor` has the same methods, arguments and
    outputs, on a Ray cluster: code that takes either runs anywhere
    (``cv2r2d2 extract`` and ``match`` make one from ``--ray`` and its options).
    """

    def extract(
        self,
        images: Sequence[Tuple[str, PathLike]],
        output: PathLike,
        config: Optional["R2D2Config"] = None,
        format: str = "auto",
        overwrite: bool = False,
        show_progress: bool = False,
    ) -> ExtractionReport:
        """Extract the features of ``images`` into ``output``, resuming a previous run
        (:func:`extract_collection`, with an ``R2D2Feature`` of ``config``).

        Args:
            images: (name, path) pairs, e.g. from :func:`cv2r2d2.image.list_images`.
            output: an ``.h5`` file or a folder of ``.r2d2`` files, as
                :func:`cv2r2d2.stores.open_features` takes.
            config: the extractor's configuration (None: the paper's settings).
            format: ``"auto"`` (by the suffix), ``"h5"`` or ``"r2d2"``.
        """
        from .feature2d import R2D2Feature

        feature = R2D2Feature(config)  # the model and its device before the output opens
        with open_features(output, format, writable=True) as store:
            return extract_collection(images, store, feature, overwrite, show_progress)

    def map_blocks(self, worker: Callable[[], Any], work: Callable[[Any, List[Any]], List[Any]],
                   items: Sequence[Any], show_progress: bool = False, desc: str = "",
                   unit: str = "it", device: Optional[str] = None) -> List[Any]:
        """``work(state, block)`` over ``items`` with ``state = worker()`` made once (a
        model, an open file...): the results in the order of ``items``. The work of
        :func:`cv2r2d2.localization.localize` and of the retrieval index; on Ray, each
        actor makes its own state (``worker`` and ``work`` must then be picklable).
        ``device`` matters on Ray only (where the actors' GPUs come from)."""
        return map_blocks_here(worker, work, items, show_progress, desc, unit)

    def match(
        self,
        features: PathLike,
        pairs: Sequence[Tuple[str, str]],
        output: PathLike,
        settings: Optional[MatchingSettings] = None,
        steerers: Any = None,
        overwrite: bool = False,
        show_progress: bool = False,
    ) -> MatchingReport:
        """Match ``pairs`` of the features in ``features`` into the matches file
        ``output``, resuming a previous run (:func:`match_collection`).

        Args:
            features: a feature file or ``.r2d2`` folder (:func:`cv2r2d2.stores.open_features`).
            pairs: (name0, name1) pairs, e.g. from :func:`cv2r2d2.pairs.parse_pairs`.
            output: the matches ``.h5`` file.
            settings: as :func:`match_collection`; a device this machine lacks is a
                ValueError before the output is opened.
            steerers: as :func:`match_collection`.
        """
        settings = _matching_settings(settings)
        torch_device(settings.device)
        with open_features(features) as store, H5Matches(output, writable=True) as matches:
            return match_collection(store, pairs, matches, settings, steerers, overwrite,
                                    show_progress)
