"""Localising query photos against a model built by :func:`cv2r2d2.sfm.reconstruct`.

For each query photo, as hloc's ``localize_sfm`` does with R2D2's own features:

1. its features, extracted with the settings the model's ``features.h5`` records (other
   settings would make descriptors the model's cannot be matched with: they are refused);
2. the K most similar images of the model, by the bag-of-words vectors of
   :mod:`cv2r2d2.retrieval` (kept beside the features, ``features.retrieval.h5``);
3. mutual nearest-neighbour matches to those images (with the matching settings the
   model's ``matches.h5`` records), kept where the image's keypoint observes a 3-D point of
   the model: 2D-3D correspondences through its tracks (a COLMAP image's ``points2D[i]``
   is keypoint ``i`` of its features);
4. an absolute pose by LO-RANSAC and its non-linear refinement
   (``pycolmap.estimate_and_refine_absolute_pose``), with the camera of the photo's EXIF
   focal length and size, or given intrinsics (:mod:`cv2r2d2.queries`: the query photos
   and their cameras).

A query is localised when the pose has at least ``min_inliers`` inlier correspondences:
30 by default, the bar COLMAP's incremental mapper sets to register an image in a model
(``abs_pose_min_num_inliers``). Below it the query is reported as not localised, with
the reason, never with a pose.

Poses are COLMAP's ``cam_from_world`` (world to camera: ``x_cam = R x_world + t``), in the
model's frame. :func:`cv2r2d2.queries.write_results` writes hloc's results format.
"""
from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .checks import check_executor
from .collection import LocalExecutor, detect
from .colmap import import_pycolmap
from .config import R2D2Config
from .image import read_image
from .matching import match_batch
from .presets import get_preset
from .provenance import SettingsMismatchError, differences, features_record
from .queries import (
    CAMERA_MODEL, Query, QueryResult, check_camera_model, given_camera, query_camera,
    read_queries,
)
from .retrieval import RetrievalIndex
from .stores import H5Features, H5Matches
from .utils import PathLike

if TYPE_CHECKING:
    import pycolmap

    from .feature2d import R2D2Feature

__all__ = [
    "MIN_INLIERS",
    "MAX_ERROR",
    "NUM_RETRIEVED",
    "LocalizationModel",
    "recorded_config",
    "localize",
]

logger = logging.getLogger(__name__)

# COLMAP's incremental mapper registers an image with at least this many inliers.
MIN_INLIERS = 30
# RANSAC inlier threshold, pixels: COLMAP's (abs_pose_max_error) and hloc's.
MAX_ERROR = 12.0
NUM_RETRIEVED = 10
"""Model images each query is matched with by default (``--retrieval``)."""
# A refined camera outside these bounds is no camera (COLMAP's mapper's bounds).
_FOCAL_RATIO = (0.1, 10.0)
_MAX_EXTRA_PARAM = 1.0
# Database images whose descriptors and 3-D points are kept between queries.
_CACHED_IMAGES = 64


# --- the model ---------------------------------------------------------------------------


def recorded_config(record: Dict[str, Any], device: Optional[str] = None) -> R2D2Config:
    """The extractor configuration a features settings record describes (see
    :func:`cv2r2d2.provenance.features_record`), on ``device``."""
    try:
        return R2D2Config.from_arguments(preset=record["preset"], model=record["model"],
                                         device=device, **record["settings"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SettingsMismatchError(f"the features' settings record cannot be read back "
                                    f"into an extractor ({exc}): {record!r}") from exc


@dataclass
class _DatabaseImage:
    """What a query is matched with: (N, D) descriptors, and per keypoint the row of its
    3-D point in ``point3D_ids`` / ``xyz`` (-1: none)."""

    descriptors: np.ndarray
    rows: np.ndarray
    point3D_ids: np.ndarray
    xyz: np.ndarray


class LocalizationModel:
    """An ``sfm`` output folder opened for localisation: the largest model of
    ``sparse/``, ``features.h5`` and its settings record, the matching settings of
    ``matches.h5``, and the retrieval index of the features (built or brought up to
    date beside them on first use).

    Attributes:
        folder: the sfm output folder.
        reconstruction: the ``pycolmap.Reconstruction`` (the most registered images).
        model_path: its folder (``sparse/<k>``).
        record: the features' settings record (None: they have none).
        matching: ``max_distance``, ``ratio``, ``rotations`` of the model's matches.
        index: the :class:`~cv2r2d2.retrieval.RetrievalIndex` of the features (a property).
    """

    def __init__(self, folder: PathLike, show_progress: bool = False) -> None:
        pycolmap = import_pycolmap()
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise NotADirectoryError(f"no such model folder: '{self.folder}'")
        features = self.folder / "features.h5"
        if not features.is_file():
            raise FileNotFoundError(f"{self.folder} holds no features.h5: it is not a "
                                    "'cv2r2d2 sfm' output folder")
        models = sorted(p for p in (self.folder / "sparse").glob("*")
                        if (p / "images.bin").is_file() or (p / "images.txt").is_file())
        if not models:
            raise FileNotFoundError(f"{self.folder} holds no model (no sparse/<k>/ folder "
                                    "with images.bin): 'cv2r2d2 sfm' made none there, or "
                                    "was run with --database-only")
        loaded = [(path, pycolmap.Reconstruction(os.fspath(path))) for path in models]
        self.model_path, self.reconstruction = max(
            loaded, key=lambda item: item[1].num_reg_images())
        self._features = H5Features(features)
        self.record = self._features.settings()
        self._by_name = {}
        for image_id in self.reconstruction.reg_image_ids():
            image = self.reconstruction.image(image_id)
            if image.num_points3D > 0:
                self._by_name[image.name] = image
        if not self._by_name:
            raise ValueError(f"the model {self.model_path} has no image with 3-D points")
        missing = sorted(set(self._by_name) - set(self._features.names()))
        if missing:
            raise ValueError(f"{features} has no features for {len(missing)} image(s) of the "
                             f"model {self.model_path} ({missing[0]}...): the model was not "
                             "made from these features")
        self.matching = self._matching_settings()
        self._show_progress = show_progress
        self._index: Optional[RetrievalIndex] = None
        self._cache: "OrderedDict[str, _DatabaseImage]" = OrderedDict()
        logger.info("model %s: %d images with 3-D points, %d 3-D points", self.model_path,
                    len(self._by_name), self.reconstruction.num_points3D())

    def _matching_settings(self) -> Dict[str, Any]:
        """The matching settings of the model's matches.h5, else of its features' preset."""
        matches = self.folder / "matches.h5"
        record = None
        if matches.is_file():
            with H5Matches(matches) as store:
                record = store.settings()
        if record is not None and isinstance(record.get("settings"), dict):
            settings = record["settings"]
        else:
            preset = (self.record or {}).get("preset", "paper")
            settings = dict(get_preset(preset).matching)
            logger.info("no matching settings recorded in %s: matching as the preset %r "
                        "does", matches, preset)
        return {"max_distance": settings.get("max_distance"), "ratio": settings.get("ratio"),
                "rotations": int(settings.get("rotations", 1))}

    def close(self) -> None:
        self._features.close()

    def __enter__(self) -> "LocalizationModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def index(self) -> RetrievalIndex:
        """The retrieval index of the features, built or brought up to date beside them
        on first use."""
        if self._index is None:
            self._index = RetrievalIndex.build(self._features,
                                               show_progress=self._show_progress)
        return self._index

    @property
    def names(self) -> List[str]:
        """The model's images that observe 3-D points (those a query can be matched with)."""
        return sorted(self._by_name)

    def retrieve(self, descriptors: np.ndarray, k: int) -> List[Tuple[str, float]]:
        """The k model images most similar to a query of (N, D) ``descriptors``:
        (name, similarity), best first."""
        ranked = self.index.query(descriptors, len(self.index))
        return [(name, score) for name, score in ranked if name in self._by_name][:k]

    def database_image(self, name: str) -> _DatabaseImage:
        """The descriptors and 3-D points of one model image (kept for later queries)."""
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        image = self._by_name[name]
        stored = self._features.read(name)
        if len(stored) != image.num_points2D():
            raise ValueError(f"the model's image {name} has {image.num_points2D()} keypoints "
                             f"but {self._features.path} holds {len(stored)}: the model was "
                             "not made from these features")
        observed = np.asarray(image.get_observation_point2D_idxs(), np.int64)
        ids = np.array([image.points2D[i].point3D_id for i in observed], np.int64)
        xyz = np.array([self.reconstruction.point3D(i).xyz for i in ids], np.float64)
        rows = np.full(len(stored), -1, np.int64)
        rows[observed] = np.arange(len(observed))
        item = _DatabaseImage(stored.descriptors, rows, ids, xyz.reshape(-1, 3))
        self._cache[name] = item
        if len(self._cache) > _CACHED_IMAGES:
            self._cache.popitem(last=False)
        return item


# --- localisation ------------------------------------------------------------------------


def _extractor(record: Optional[Dict[str, Any]], feature: Any, device: Optional[str],
               features_path: Path) -> "R2D2Feature":
    """The extractor of the queries: the model's recorded one, or ``feature`` when it
    has the same settings."""
    from .feature2d import R2D2Feature

    if feature is not None and not isinstance(feature, (R2D2Feature, R2D2Config)):
        raise TypeError(f"feature must be None, an R2D2Feature or an R2D2Config, got "
                        f"{type(feature).__name__}")
    if record is None:
        if feature is None:
            raise SettingsMismatchError(
                f"{features_path} holds features written without a record of their settings "
                "(by cv2r2d2 before records were kept, or by another tool), so the queries "
                "cannot be described as the model's images were: pass the extractor that "
                "made them (feature=...), or make the model again with 'cv2r2d2 sfm'")
        logger.warning("%s has no settings record: the queries are described with the "
                       "extractor given, unchecked against the model's", features_path)
        return feature if isinstance(feature, R2D2Feature) else R2D2Feature(feature)
    if feature is None:
        config = recorded_config(record, device)
    else:
        config = feature.getConfig() if isinstance(feature, R2D2Feature) else feature
    found = differences(record, features_record(config))
    if found:
        whose = "the extractor given" if feature is not None else "the recorded extractor now"
        raise SettingsMismatchError(
            f"the queries must be described with the settings of the model's features "
            f"({features_path}), but {whose} differs: " + "; ".join(found) + ". Localise "
            "with feature=None (the recorded settings), or make the model again with these "
            "settings")
    if isinstance(feature, R2D2Feature):
        return feature
    return R2D2Feature(config)


def _check_readable(queries: Sequence[Query]) -> None:
    """Decode every query once before any work: an unreadable one stops the run."""
    failed = []
    for query in queries:
        try:
            read_image(query.path)
        except OSError as exc:
            failed.append(f"{query.name} ({exc})")
    if failed:
        raise OSError(f"{len(failed)} query image(s) cannot be read: {'; '.join(failed)}; "
                      "nothing was localised")


def _check_positive(value: Any, name: str, integer: bool) -> None:
    kinds = (int, np.integer) if integer else (int, float, np.integer, np.floating)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        kind = "an integer >= 1" if integer else "a number > 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def localize(
    model_dir: PathLike,
    queries: Union[PathLike, Sequence[PathLike], Sequence[Query]],
    feature: Union[None, "R2D2Feature", R2D2Config] = None,
    num_retrieved: int = NUM_RETRIEVED,
    camera_model: str = CAMERA_MODEL,
    camera_params: Optional[Sequence[float]] = None,
    min_inliers: int = MIN_INLIERS,
    max_error: float = MAX_ERROR,
    device: Optional[str] = None,
    seed: int = 0,
    show_progress: bool = False,
    executor: Any = None,
) -> List[QueryResult]:
    """Localise query photos against the model of an ``sfm`` output folder.

    Args:
        model_dir: the folder :func:`cv2r2d2.sfm.reconstruct` wrote (``features.h5``,
            ``matches.h5``, ``sparse/<k>``); the retrieval index is written beside the
            features when missing or out of date.
        queries: an image, a folder, a ``.txt`` list (see
            :func:`cv2r2d2.queries.read_queries`), several of them, or
            :class:`~cv2r2d2.queries.Query` objects.
        feature: None (the extractor the features record), or an extractor / config,
            which must have the recorded settings (required when there is no record).
        num_retrieved: model images (K) each query is matched with.
        camera_model: the COLMAP camera model of the queries without listed intrinsics.
        camera_params: that model's parameters for all of them (pixels); None: the EXIF
            focal length (else 1.2 x the longer side, then estimated by the solver) and
            the image centre, refined with the pose.
        min_inliers: fewest inliers of a localised query.
        max_error: RANSAC inlier threshold, pixels.
        device: torch device of the extraction (with ``feature=None``) and the matching.
        seed: of RANSAC's sampling (the same results for the same inputs).
        show_progress: a progress bar over the queries (on a terminal).
        executor: where the queries run: None or a
            :class:`~cv2r2d2.collection.LocalExecutor`, this process; a
            :class:`~cv2r2d2.distributed.RayExecutor`, its actors, each with the model
            and an extractor of its own (the model folder and the query photos must be
            readable on every node). The results are the same.

    Returns:
        One :class:`QueryResult` per query, in order.

    Raises:
        FileNotFoundError, NotADirectoryError: no such folder, no features or model in it,
            no such query.
        SettingsMismatchError: ``feature`` differs from the recorded settings, or the
            features have no record and no ``feature`` is given.
        OSError: a query image that cannot be read (checked before any work).
    """
    pycolmap = import_pycolmap()
    _check_positive(num_retrieved, "num_retrieved", integer=True)
    _check_positive(min_inliers, "min_inliers", integer=True)
    _check_positive(max_error, "max_error", integer=False)
    check_camera_model(camera_model)
    if not isinstance(queries, (str, os.PathLike)) and queries \
            and all(isinstance(q, Query) for q in queries):
        query_list = list(queries)  # type: ignore[arg-type]
    else:
        query_list = read_queries(queries)  # type: ignore[arg-type]
    if camera_params is not None:
        given_camera(camera_model, camera_params, 1, 1, "camera_params")
    if check_executor(executor) is None:
        executor = LocalExecutor()
    with LocalizationModel(model_dir, show_progress) as model:
        extractor = _extractor(model.record, feature, device, model.folder / "features.h5")
        _check_readable(query_list)
        logger.debug("retrieval: %r", model.index)  # built now, not in a query's time
        step = _LocalizeStep(num_retrieved, camera_model, camera_params, min_inliers,
                             max_error, device, seed)
        worker = _QueryWorker(os.fspath(model.folder), extractor.getConfig(),
                              opened=(model, extractor, pycolmap))
        return executor.map_blocks(worker, step, query_list, show_progress, "localize",
                                   unit="query", device=device)


class _QueryWorker:
    """What localises queries: the model, an extractor of the recorded settings and
    pycolmap; those of this process where it runs, else (pickled to a Ray actor) opened
    there from the model folder and the configuration."""

    def __init__(self, model_dir: str, config: R2D2Config, opened: Optional[tuple] = None
                 ) -> None:
        self.model_dir, self.config, self.opened = model_dir, config, opened

    def __getstate__(self) -> Dict[str, Any]:
        return dict(model_dir=self.model_dir, config=self.config, opened=None)

    def __call__(self) -> tuple:
        if self.opened is not None:
            return self.opened
        from .feature2d import R2D2Feature

        return (LocalizationModel(self.model_dir), R2D2Feature(self.config),
                import_pycolmap())


@dataclass(frozen=True)
class _LocalizeStep:
    """Localise a block of queries with a worker's state (picklable, for Ray)."""

    num_retrieved: int
    camera_model: str
    camera_params: Optional[Sequence[float]]
    min_inliers: int
    max_error: float
    device: Optional[str]
    seed: int

    def __call__(self, state: tuple, queries: List[Query]) -> List[QueryResult]:
        model, extractor, pycolmap = state
        results = []
        for query in queries:
            result = _localize_one(model, extractor, query, self.num_retrieved,
                                   self.camera_model, self.camera_params, self.min_inliers,
                                   self.max_error, self.device, self.seed, pycolmap)
            if result.success:
                logger.info("%s: localised, %d inliers of %d 2D-3D correspondences (%d "
                            "images)", result.name, result.num_inliers,
                            result.num_correspondences, len(result.database_images))
            else:
                logger.warning("%s: not localised: %s", result.name, result.reason)
            results.append(result)
        return results


def _localize_one(model: LocalizationModel, extractor: "R2D2Feature", query: Query,
                  num_retrieved: int, camera_model: str,
                  camera_params: Optional[Sequence[float]], min_inliers: int,
                  max_error: float, device: Optional[str], seed: int,
                  pycolmap: Any) -> QueryResult:
    clock = [time.perf_counter()]
    seconds: Dict[str, float] = {}

    def lap(stage: str) -> None:
        now = time.perf_counter()
        seconds[stage] = now - clock[0]
        clock[0] = now

    image = read_image(query.path)
    features = detect(extractor, image)
    lap("extract")
    result = QueryResult(query.name, False, seconds=seconds)
    camera, source = query_camera(query, (image.shape[1], image.shape[0]), camera_model,
                                  camera_params)
    result.camera = _camera_dict(camera, source)
    if not len(features):
        result.reason = "no keypoints"
        return result
    retrieved = model.retrieve(features.descriptors, num_retrieved)
    result.database_images = [name for name, _ in retrieved]
    lap("retrieve")
    database = [model.database_image(name) for name in result.database_images]
    found = _correspondences(features.descriptors, database, model.matching, device,
                             extractor)
    result.num_correspondences = len(found.first)
    lap("match")
    result.inliers_per_image = [0] * len(database)
    if len(found.first) < max(min_inliers, 4):
        result.reason = (f"{len(found.first)} 2D-3D correspondences through "
                         f"{len(database)} model image(s), fewer than the {min_inliers} "
                         "inliers a pose needs")
        return result
    # COLMAP's pixel convention: the centre of the top-left pixel at (0.5, 0.5).
    points2D = features.xy[found.keypoints[found.first]].astype(np.float64) + 0.5
    pose = _absolute_pose(pycolmap, points2D, found.xyz[found.first], camera, source,
                          max_error, seed)
    lap("pose")
    if pose is None:
        result.reason = f"RANSAC found no pose from {len(found.first)} 2D-3D correspondences"
        return result
    inliers = np.asarray(pose["inlier_mask"], bool)
    result.num_inliers = int(pose["num_inliers"])
    result.inliers_per_image = np.bincount(found.images[inliers[found.inverse]],
                                           minlength=len(database)).tolist()
    result.camera = _camera_dict(camera, source)
    if result.num_inliers < min_inliers:
        result.reason = (f"{result.num_inliers} inliers of {len(found.first)} 2D-3D "
                         f"correspondences, fewer than {min_inliers}")
    elif camera.has_bogus_params(*_FOCAL_RATIO, _MAX_EXTRA_PARAM):
        result.reason = (f"the refined camera is implausible ({camera.params_to_string()}), "
                         f"with {result.num_inliers} inliers")
    else:
        result.qvec, result.tvec = _quaternion_and_translation(pose["cam_from_world"])
        result.success = True
    return result


@dataclass
class _Correspondences:
    """A query's matches with model keypoints that observe 3-D points.

    Attributes:
        keypoints: (M,) the query keypoint of each match.
        xyz: (M, 3) the 3-D point of each match.
        images: (M,) the retrieved image each match comes from.
        first: one match per distinct (query keypoint, 3-D point), whichever images
            gave it: the 2D-3D correspondences.
        inverse: (M,) each match's correspondence (an index into ``first``).
    """

    keypoints: np.ndarray
    xyz: np.ndarray
    images: np.ndarray
    first: np.ndarray
    inverse: np.ndarray


def _correspondences(descriptors: np.ndarray, database: Sequence[_DatabaseImage],
                     matching: Dict[str, Any], device: Optional[str],
                     extractor: "R2D2Feature") -> _Correspondences:
    """The query's (N, D) ``descriptors`` matched with the retrieved model images'."""
    matched = match_batch([(descriptors, item.descriptors) for item in database],
                          cv2.NORM_L2, matching["max_distance"], matching["ratio"], device,
                          rotations=matching["rotations"],
                          steerers=extractor if matching["rotations"] > 1 else None)
    keypoints, point_ids, xyz, images = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], \
        [np.zeros((0, 3))], [np.zeros(0, np.int64)]
    for k, (item, (indices, _)) in enumerate(zip(database, matched)):
        rows = item.rows[indices[:, 1]]
        keep = rows >= 0
        keypoints.append(indices[keep, 0])
        point_ids.append(item.point3D_ids[rows[keep]])
        xyz.append(item.xyz[rows[keep]])
        images.append(np.full(int(keep.sum()), k))
    keypoints_all, ids_all = np.concatenate(keypoints), np.concatenate(point_ids)
    _, first, inverse = np.unique(np.stack([keypoints_all, ids_all], axis=1), axis=0,
                                  return_index=True, return_inverse=True)
    return _Correspondences(keypoints_all, np.concatenate(xyz), np.concatenate(images),
                            first, inverse.reshape(-1))


def _absolute_pose(pycolmap: Any, points2D: np.ndarray, points3D: np.ndarray, camera: Any,
                   source: str, max_error: float, seed: int) -> Optional[Dict[str, Any]]:
    """pycolmap's LO-RANSAC pose and its refinement (``camera`` refined in place), or None."""
    estimation = pycolmap.AbsolutePoseEstimationOptions()
    estimation.ransac.max_error = float(max_error)
    estimation.ransac.random_seed = int(seed)
    # As COLMAP's mapper registers an image: the focal length estimated without a
    # prior, focal length and distortion refined unless they were given.
    estimation.estimate_focal_length = source == "guess"
    refinement = pycolmap.AbsolutePoseRefinementOptions()
    refinement.refine_focal_length = source != "given"
    refinement.refine_extra_params = source != "given"
    return pycolmap.estimate_and_refine_absolute_pose(points2D, points3D, camera, estimation,
                                                      refinement)


def _quaternion_and_translation(pose: Any) -> Tuple[Tuple[float, float, float, float],
                                                    Tuple[float, float, float]]:
    """(w, x, y, z) and (x, y, z) of a ``pycolmap.Rigid3d``, w >= 0 as COLMAP writes them
    (one of the two quaternions of a rotation)."""
    x, y, z, w = (float(v) for v in pose.rotation.quat)
    if w < 0:
        w, x, y, z = -w, -x, -y, -z
    tx, ty, tz = (float(v) for v in pose.translation)
    return (w, x, y, z), (tx, ty, tz)


def _camera_dict(camera: Any, source: str) -> Dict[str, Any]:
    return {"model": camera.model_name, "width": int(camera.width),
            "height": int(camera.height), "params": [float(p) for p in camera.params],
            "focal_length_from": source}
