"""Running the extractor and the matcher over a photo collection, resuming a previous run.

:func:`extract_collection` writes the features of many images into a feature store,
:func:`match_collection` the mutual nearest-neighbour matches of many image pairs into a
match file (stores: :mod:`cv2r2d2.stores`); both skip what is already done unless told
to overwrite, and show a progress bar when asked (on a terminal). Both record the
settings they write with in the output and never add to an output of other settings
(:mod:`cv2r2d2.provenance`).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .params import Features
from .image import read_image
from .matching import DEFAULT_MAX_ELEMENTS, match_batch
from .provenance import check_reuse, features_record, matches_record
from .steerers import as_steerers, rotation_angles
from .stores import FeatureStore, H5Matches, ImageFeatures
from .utils import PathLike, progress, torch_device

if TYPE_CHECKING:
    from .feature2d import R2D2Feature

__all__ = [
    "ExtractionReport",
    "detect",
    "extract_collection",
    "MatchingReport",
    "match_collection",
    "matching_record",
    "prepare_output",
]

logger = logging.getLogger(__name__)


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


def matching_record(features: Optional[Dict[str, Any]], max_distance: Optional[float],
                    ratio: Optional[float], rotations: int) -> Dict[str, Any]:
    """The settings record of matches of features recorded as ``features`` (see
    :func:`cv2r2d2.provenance.matches_record`)."""
    return matches_record(features, dict(max_distance=max_distance, ratio=ratio,
                                         rotations=int(rotations)))


@dataclass
class MatchingReport:
    """What :func:`match_collection` did: pairs matched and pairs skipped (done before),
    with the number of matches of each matched pair."""

    matched: List[Tuple[str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    num_matches: List[int] = field(default_factory=list)


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
    max_distance: Optional[float] = None,
    ratio: Optional[float] = None,
    device: Optional[str] = None,
    overwrite: bool = False,
    show_progress: bool = False,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    rotations: int = 1,
    steerers: Any = None,
) -> MatchingReport:
    """Match image pairs of a feature store and write the matches, resuming a previous run.

    Pairs already in ``matches`` (in either order) are skipped unless ``overwrite``.
    Scores stored are ``1 - d^2 / 2``, the cosine similarity of unit descriptors (as
    hloc's nearest-neighbour matcher stores).

    Args:
        features: the feature store (:func:`cv2r2d2.stores.open_features`).
        pairs: (name0, name1) pairs, e.g. from :func:`parse_pairs`.
        matches: the writable match file.
        max_distance, ratio, device, max_elements: as :func:`~cv2r2d2.matching.match_batch`.
        rotations, steerers: as :func:`~cv2r2d2.matching.match_batch`; ``steerers`` must be
            those of the model that extracted ``features`` (the stores do not record it).
    """
    torch_device(device)  # before anything is written
    if rotation_angles(rotations) != (0,):
        steerers = as_steerers(steerers, rotations)  # fitted once, before any pair
    prepare_output(matches, matching_record(features.settings(), max_distance, ratio,
                                            rotations), overwrite)
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
            results = match_batch(descriptors, cv2.NORM_L2, max_distance, ratio, device,
                                  max_elements, rotations, steerers)
            for (a, b), (d_a, _), (indices, distances) in zip(group, descriptors, results):
                matches.write(a, b, indices, 1 - distances.astype(np.float32) ** 2 / 2, len(d_a))
                report.matched.append((a, b))
                report.num_matches.append(len(indices))
                yield a, b

    for _ in progress(matched(), len(todo), show_progress, "match", unit="pair"):
        pass
    return report
