"""Structure from motion with R2D2 features and COLMAP (through pycolmap >= 4.2).

:func:`reconstruct` runs the whole chain on a folder of photos: R2D2 extraction into
``features.h5``, mutual nearest-neighbour matching into ``matches.h5`` (both resumable,
see :mod:`cv2r2d2.collection`), a COLMAP database (cameras from the image size, or the EXIF
focal length when present; keypoints; descriptors; matches), COLMAP's geometric
verification and incremental mapping into ``sparse/``. Each step is also a function
of its own, for users who run COLMAP themselves.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import (
    TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union,
)

import numpy as np

from .collection import extract_collection, match_collection
from .config import R2D2Config
from .presets import SFM_PRESET, get_preset
from .image import list_images
from .pairs import parse_pairs
from .stores import FeatureStore, H5Features, H5Matches
from .utils import MissingDependencyError, atomic_dir, atomic_path, import_optional, torch_device
from .steerers import rotation_angles
from .refinement import RefinementParams, RefinementReport, refine_keypoints

if TYPE_CHECKING:
    import pycolmap

    from .feature2d import R2D2Feature

__all__ = [
    "CAMERA_MODES",
    "SfMResult",
    "import_pycolmap",
    "write_database",
    "verify_matches",
    "verified_matches",
    "refine_database",
    "incremental_mapping",
    "reconstruct",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CAMERA_MODES = ("auto", "single", "per_folder", "per_image")
"""``camera_mode`` values: COLMAP's choice, one camera, one per folder, one per image."""
PYCOLMAP_MIN = (4, 2)


def import_pycolmap() -> Any:
    """Import pycolmap, or raise an error naming the pip command (it must be >= 4.2)."""
    pycolmap = import_optional("pycolmap", "COLMAP reconstruction")
    version = tuple(int(p) for p in pycolmap.__version__.split(".")[:2] if p.isdigit())
    if version < PYCOLMAP_MIN:
        raise MissingDependencyError(
            f"COLMAP reconstruction needs pycolmap >= {'.'.join(map(str, PYCOLMAP_MIN))}, "
            f"found {pycolmap.__version__}: pip install -U pycolmap"
        )
    return pycolmap


@contextlib.contextmanager
def _colmap_log_level(pycolmap: Any, verbose: bool) -> Iterator[None]:
    """COLMAP's own log (glog, on stderr) only when verbose (its errors too: the package
    says what failed in its own words); restored afterwards."""
    level = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = level if verbose else max(level, 3)
    try:
        yield
    finally:
        pycolmap.logging.minloglevel = level


def write_database(
    database_path: PathLike,
    image_dir: PathLike,
    features: FeatureStore,
    matches: H5Matches,
    pairs: Sequence[Tuple[str, str]],
    camera_model: str = "SIMPLE_RADIAL",
    camera_mode: str = "auto",
) -> Dict[str, int]:
    """Write a new COLMAP database with cameras, images, keypoints, descriptors, matches.

    COLMAP reads each image's size and EXIF focal length (without EXIF, the focal
    length prior is 1.2 x the longer side). Keypoints are stored in COLMAP's pixel
    convention (+0.5); descriptors as their float32 bytes (N x 512 uint8 blobs, feature
    type UNDEFINED), for reference: COLMAP's matchers do not use them, the matches
    come from ``matches``.

    Args:
        database_path: the database file to create (it must not exist, or be empty).
        image_dir: the folder the image names are relative to.
        features: the images' features; every name in it is imported.
        matches: the match file holding every pair of ``pairs``.
        pairs: (name0, name1) pairs to import.
        camera_model: a COLMAP camera model (``SIMPLE_RADIAL``, ``PINHOLE``, ...).
        camera_mode: ``auto`` (a camera per image unless EXIF says otherwise),
            ``single``, ``per_folder`` or ``per_image``.

    Returns:
        The COLMAP image id of each imported name.
    """
    pycolmap = import_pycolmap()
    if camera_mode not in CAMERA_MODES:
        raise ValueError(f"camera_mode must be one of {', '.join(CAMERA_MODES)}, got {camera_mode!r}")
    database_path = Path(database_path)
    # An empty file (atomic_path's placeholder) is an empty SQLite database.
    if database_path.exists() and database_path.stat().st_size:
        raise FileExistsError(f"{database_path} exists; write the database to a new file")
    names = features.names()
    if camera_mode in ("single", "per_folder"):
        _check_shared_sizes(features, names, camera_mode)
    pycolmap.Database.open(str(database_path)).close()
    try:
        pycolmap.import_images(
            str(database_path), str(image_dir),
            camera_mode=getattr(pycolmap.CameraMode, camera_mode.upper()),
            image_names=names,
            options=pycolmap.ImageReaderOptions(camera_model=camera_model),
        )
    except ValueError as exc:
        raise ValueError(f"COLMAP could not import the images of {image_dir}: {exc}") from exc
    database = pycolmap.Database.open(str(database_path))
    try:
        ids = {image.name: image.image_id for image in database.read_all_images()}
        for name in names:
            if name not in ids:
                logger.warning("COLMAP could not read %s; it is left out", name)
                continue
            stored = features.read(name)
            database.write_keypoints(ids[name], stored.keypoints.astype(np.float32) + 0.5)
            database.write_descriptors(ids[name], pycolmap.FeatureDescriptors(
                pycolmap.FeatureExtractorType.UNDEFINED,
                np.ascontiguousarray(stored.descriptors, np.float32).view(np.uint8),
            ))
        for name0, name1 in pairs:
            if name0 in ids and name1 in ids:
                indices, _ = matches.read(name0, name1)
                database.write_matches(ids[name0], ids[name1], indices.astype(np.uint32))
    finally:
        database.close()
    return {name: ids[name] for name in names if name in ids}


def _check_shared_sizes(features: FeatureStore, names: Sequence[str], camera_mode: str) -> None:
    """Images that share a camera must have one size: COLMAP leaves the others out
    (CAMERA_SINGLE_DIM_ERROR), which would surface as unreadable images."""
    first: Dict[str, Tuple[str, Tuple[int, int]]] = {}
    for name in names:
        group = name.rpartition("/")[0] if camera_mode == "per_folder" else ""
        size = tuple(features.read(name).image_size)
        seen = first.setdefault(group, (name, size))
        if seen[1] != size:
            where = f" of folder {group!r}" if camera_mode == "per_folder" else ""
            raise ValueError(
                f"camera_mode={camera_mode!r} gives the images{where} one camera, so they "
                f"must have one size, but {seen[0]} is {seen[1][0]}x{seen[1][1]} and {name} is "
                f"{size[0]}x{size[1]} pixels; use camera_mode='auto' or 'per_image' (a "
                "camera per image), or photos of one size"
            )


def verified_matches(database: "pycolmap.Database") -> List[Tuple[int, int, Any]]:
    """The image pairs of an open database that passed geometric verification.

    pycolmap's ``num_verified_image_pairs`` counts every two-view geometry, those of
    pairs that failed too; these are the ones with inlier matches.

    Returns:
        (image_id1, image_id2, two-view geometry) per verified pair.
    """
    pycolmap = import_pycolmap()
    failed = (pycolmap.TwoViewGeometryConfiguration.UNDEFINED,
              pycolmap.TwoViewGeometryConfiguration.DEGENERATE)
    found = []
    for pair_id, geometry in zip(*database.read_two_view_geometries()):
        if geometry.config not in failed and len(geometry.inlier_matches):
            found.append((*pycolmap.pair_id_to_image_pair(pair_id), geometry))
    return found


def verify_matches(database_path: PathLike, num_threads: int = -1, verbose: bool = False) -> int:
    """COLMAP's geometric verification of all the database's matched pairs.

    Args:
        num_threads: worker threads (-1: all cores).

    Returns:
        The number of image pairs that passed (see :func:`verified_matches`).
    """
    pycolmap = import_pycolmap()
    database = pycolmap.Database.open(os.fspath(database_path))
    try:
        cameras = {camera.camera_id: camera for camera in database.read_all_cameras()}
        users = collections.Counter(image.camera_id for image in database.read_all_images())
    finally:
        database.close()
    # pycolmap 4.2's shared-focal 6-point solver, used for pairs of one camera without
    # a focal-length prior, crashes the process when run in parallel (seen on
    # about half of the runs); it is stable on one thread.
    if any(count > 1 and not cameras[camera].has_prior_focal_length
           for camera, count in users.items()):
        num_threads = 1
    with _colmap_log_level(pycolmap, verbose):
        pycolmap.geometric_verification(
            os.fspath(database_path),
            pycolmap.GeometricVerifierOptions(num_threads=num_threads),
        )
    database = pycolmap.Database.open(os.fspath(database_path))
    try:
        return len(verified_matches(database))
    finally:
        database.close()


def _fingerprint(feature: "R2D2Feature", params: RefinementParams, names: Sequence[str],
                 arrays: Sequence[np.ndarray]) -> str:
    """sha256 of everything a refinement's result depends on."""
    digest = hashlib.sha256(json.dumps({
        "model": feature.getModel(), "extraction": feature.getParams().as_dict(),
        "refinement": asdict(params), "names": list(names),
    }, sort_keys=True).encode())
    for array in arrays:
        digest.update(str(array.dtype).encode() + str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _read_refined(path: Path, fingerprint: str, names: Sequence[str]) -> Optional[List[np.ndarray]]:
    """Keypoints cached by an earlier refinement of the same inputs, or None."""
    if not path.is_file():
        return None
    try:
        with np.load(path) as data:
            if str(data["fingerprint"]) != fingerprint or list(data["names"]) != list(names):
                return None
            return np.split(data["keypoints"], np.cumsum(data["counts"])[:-1])
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("ignoring the unreadable refinement cache %s: %s", path, exc)
        return None


def _write_refined(path: Path, fingerprint: str, names: Sequence[str],
                   keypoints: Sequence[np.ndarray]) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, fingerprint=np.array(fingerprint), names=np.array(list(names)),
                 counts=np.array([len(k) for k in keypoints], np.int64),
                 keypoints=np.concatenate(keypoints).astype(np.float32))


def _unit_descriptors(descriptors: Any) -> np.ndarray:
    """A database's descriptors as unit float32 rows: cv2r2d2 stores float32 bytes
    (type UNDEFINED), COLMAP's SIFT uint8 values."""
    pycolmap = import_pycolmap()
    data = np.asarray(descriptors.data)
    if descriptors.type == pycolmap.FeatureExtractorType.UNDEFINED and data.dtype == np.uint8 \
            and data.shape[1] % 4 == 0:
        data = np.ascontiguousarray(data).view(np.float32)
    data = data.astype(np.float32)
    return data / np.maximum(np.linalg.norm(data, axis=1, keepdims=True), 1e-12)


def _stored_sizes(keypoints: np.ndarray) -> Optional[np.ndarray]:
    """Keypoint scales of COLMAP's keypoint rows: (x, y, scale, orientation) or the
    affine shape (x, y, a11, a12, a21, a22); None for bare (x, y)."""
    if keypoints.shape[1] == 4:
        return keypoints[:, 2].astype(np.float32)
    if keypoints.shape[1] == 6:
        return np.sqrt(np.abs(keypoints[:, 2] * keypoints[:, 5]
                              - keypoints[:, 3] * keypoints[:, 4])).astype(np.float32)
    return None


def refine_database(
    database_path: PathLike,
    image_dir: PathLike,
    feature: "R2D2Feature",
    params: Optional[RefinementParams] = None,
    sizes: Optional[Mapping[str, np.ndarray]] = None,
    cache: Optional[PathLike] = None,
    overwrite: bool = False,
    show_progress: bool = False,
) -> RefinementReport:
    """Featuremetric refinement of a verified database's keypoints, in place.

    Tracks are built from the inlier matches of the pairs that passed geometric
    verification (with at least ``params.min_inliers`` of them), joined best descriptor
    similarity first; the keypoints of each track are adjusted with
    :func:`cv2r2d2.refinement.refine_keypoints`, and the database's keypoints are
    replaced by the refined ones (matches and two-view geometries stay). Any
    detector's keypoints can be refined this way (COLMAP's SIFT too).

    Args:
        database_path: a COLMAP database after :func:`verify_matches`.
        image_dir: the folder its image names are relative to.
        feature: the R2D2 extractor whose dense descriptors guide the refinement.
        params: refinement settings (None: the defaults).
        sizes: detected keypoint sizes per image name, which choose scale-matched levels
            (:func:`cv2r2d2.refinement.scale_matched_sizes`); None: the database's
            keypoint scales where it has them, else the finest level for all.
        cache: a file keeping the refined keypoints (written atomically): a later call
            on the same inputs (keypoints, sizes, matches, settings, model) reads them
            instead of running the network again, unless ``overwrite``.
    """
    pycolmap = import_pycolmap()
    params = params if params is not None else RefinementParams()
    watermark = pycolmap.TwoViewGeometryConfiguration.WATERMARK
    database = pycolmap.Database.open(os.fspath(database_path))
    try:
        images = sorted(database.read_all_images(), key=lambda image: image.image_id)
        cameras = {camera.camera_id: camera for camera in database.read_all_cameras()}
        index = {image.image_id: i for i, image in enumerate(images)}
        stored = [database.read_keypoints(image.image_id) for image in images]
        edges = [
            np.column_stack([np.full(len(inliers), index[id1]), inliers[:, 0],
                             np.full(len(inliers), index[id2]), inliers[:, 1]])
            for id1, id2, geometry in verified_matches(database)
            for inliers in [np.asarray(geometry.inlier_matches, np.int64)]
            if len(inliers) >= params.min_inliers and geometry.config != watermark
        ]
        edges = np.concatenate(edges) if edges else np.zeros((0, 4), np.int64)
        # Each end's descriptor, an image at a time: joins go best similarity first.
        ends = np.zeros((2, len(edges), 0), np.float32)
        for i, image in enumerate(images):
            for side in (0, 1):
                rows = np.flatnonzero(edges[:, 2 * side] == i)
                if not len(rows):
                    continue
                vectors = _unit_descriptors(database.read_descriptors(image.image_id))
                if ends.shape[2] != vectors.shape[1]:
                    ends = np.zeros((2, len(edges), vectors.shape[1]), np.float32)
                ends[side, rows] = vectors[edges[rows, 2 * side + 1]]
    finally:
        database.close()
    names = [image.name for image in images]
    image_sizes = [(cameras[image.camera_id].width, cameras[image.camera_id].height)
                   for image in images]
    # COLMAP's pixel convention puts the top-left pixel's centre at (0.5, 0.5).
    keypoints = [points[:, :2] - 0.5 for points in stored]
    if sizes is not None:
        detected = [np.asarray(sizes[name], np.float32) for name in names]
    else:
        detected = [_stored_sizes(points) for points in stored]
        detected = None if any(d is None for d in detected) else detected
    scores = (ends[0] * ends[1]).sum(axis=1) if ends.shape[2] else None
    fingerprint = _fingerprint(feature, params, names, [
        *keypoints, *(detected or []), edges, np.asarray(image_sizes, np.int64)])
    refined = None
    if cache is not None and not overwrite:
        refined = _read_refined(Path(cache), fingerprint, names)
    if refined is not None:
        logger.info("refined keypoints read from %s", cache)
        report = RefinementReport(cached=True)
    else:
        refined, report = refine_keypoints(
            feature, [Path(image_dir) / name for name in names], keypoints, edges,
            sizes=detected, image_sizes=image_sizes, scores=scores, params=params,
            show_progress=show_progress)
        if cache is not None:
            _write_refined(Path(cache), fingerprint, names, refined)
    database = pycolmap.Database.open(os.fspath(database_path))
    try:
        for image, points, new in zip(images, stored, refined):
            if not np.array_equal(points[:, :2] - 0.5, new):
                points = points.copy()
                points[:, :2] = new + 0.5
                database.update_keypoints(image.image_id, points)
    finally:
        database.close()
    return report


def incremental_mapping(
    database_path: PathLike, image_dir: PathLike, output_dir: PathLike, verbose: bool = False,
) -> List[Tuple[Path, "pycolmap.Reconstruction"]]:
    """COLMAP's incremental mapping; models are written to ``output_dir/0``, ``/1``...

    An existing ``output_dir`` is replaced once mapping has finished; when COLMAP makes
    no model, it is removed (it would hold the models of other matches).

    Returns:
        (folder, reconstruction) of each model, largest (most registered images) first;
        empty when COLMAP made none.
    """
    pycolmap = import_pycolmap()
    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as work, _colmap_log_level(pycolmap, verbose):
        models = pycolmap.incremental_mapping(
            os.fspath(database_path), os.fspath(image_dir), os.fspath(work),
        )
    if not models:
        shutil.rmtree(output_dir, ignore_errors=True)
        return []
    found = [(output_dir / str(index), model) for index, model in models.items()]
    return sorted(found, key=lambda item: -item[1].num_reg_images())


def _sizes(features: FeatureStore) -> Optional[Dict[str, np.ndarray]]:
    """The stored keypoint sizes by image name; None if some image lacks them."""
    sizes = {name: features.read(name).sizes for name in features.names()}
    missing = [name for name, value in sizes.items() if value is None]
    if missing:
        logger.warning("%s has no keypoint sizes for %s (written by an older version or "
                       "another tool): keypoints are refined on the finest pyramid level; "
                       "run with overwrite to extract them again", features.path, missing[0])
        return None
    return sizes


@dataclass
class SfMResult:
    """The outcome of :func:`reconstruct`.

    Attributes:
        num_images: images found; ``failed`` lists those that could not be read.
        num_registered: images with a pose in the largest model (0 with database_only).
        num_points3D, mean_track_length, mean_reprojection_error (pixels): of the
            largest model.
        num_models: the number of models COLMAP made.
        database: the COLMAP database; model: the largest model's folder (or None).
        reconstruction: the largest ``pycolmap.Reconstruction`` (or None).
        num_pairs, num_verified_pairs: image pairs matched, and those that passed
            geometric verification.
        refinement: what the keypoint refinement did (None without it).
        seconds: wall time of each stage run (``extract``, ``match``, ``database``,
            ``verify``, ``refine``, ``map``).
        failure: None, or why COLMAP made no model and what to try.
    """

    num_images: int
    database: Path
    num_pairs: int = 0
    num_verified_pairs: int = 0
    refinement: Optional[RefinementReport] = None
    seconds: Dict[str, float] = field(default_factory=dict)
    num_registered: int = 0
    num_points3D: int = 0
    mean_track_length: float = 0.0
    mean_reprojection_error: float = 0.0
    num_models: int = 0
    model: Optional[Path] = None
    reconstruction: Any = None
    failed: List[Tuple[str, str]] = field(default_factory=list)
    failure: Optional[str] = None

    def summary(self) -> str:
        """A few lines for people."""
        lines = [f"images:                {self.num_images} ({len(self.failed)} unreadable)",
                 f"verified image pairs:  {self.num_verified_pairs} / {self.num_pairs}",
                 f"database:              {self.database}"]
        if self.refinement is not None:
            report = self.refinement
            lines.append("refined keypoints:     " + (
                "read from the cache" if report.cached else
                f"{report.num_observations} in {report.num_tracks} tracks "
                f"(median move {report.median_displacement:.2f} px"
                + (f", {report.num_outside} outside their image left unrefined"
                   if report.num_outside else "") + ")"))
        if self.model is not None:
            lines += [
                f"registered images:     {self.num_registered} / {self.num_images - len(self.failed)}",
                f"3-D points:            {self.num_points3D}",
                f"mean track length:     {self.mean_track_length:.2f}",
                f"mean reprojection err: {self.mean_reprojection_error:.3f} px",
                f"models:                {self.num_models} (largest in {self.model})",
            ]
        if self.seconds:
            lines.append("time:                  " + ", ".join(
                f"{stage} {seconds:.1f} s" for stage, seconds in self.seconds.items()))
        return "\n".join(lines)


def reconstruct(
    image_dir: PathLike,
    output_dir: PathLike,
    feature: Optional["R2D2Feature"] = None,
    pairs: str = "exhaustive",
    camera_model: str = "SIMPLE_RADIAL",
    camera_mode: str = "auto",
    max_distance: Optional[float] = None,
    ratio: Optional[float] = None,
    device: Optional[str] = None,
    database_only: bool = False,
    overwrite: bool = False,
    show_progress: bool = False,
    verbose: bool = False,
    rotations: int = 1,
    refine: Optional[bool] = None,
    refine_params: Optional[RefinementParams] = None,
    refine_feature: Optional["R2D2Feature"] = None,
    preset: Optional[str] = None,
) -> SfMResult:
    """Photos in, sparse COLMAP model out.

    Writes ``features.h5``, ``matches.h5`` (reused by a later run of the same settings
    unless ``overwrite``; other settings stop with
    :class:`~cv2r2d2.provenance.SettingsMismatchError`), ``database.db`` and, unless
    ``database_only``, ``sparse/<k>`` in ``output_dir``; with refinement,
    ``refined_keypoints.npz`` too (reused likewise). When COLMAP makes no model, the
    result's ``failure`` says at which stage and what to try, and no ``sparse/`` is left.

    Args:
        image_dir: the photos (searched recursively).
        output_dir: where to write.
        feature: the extractor; None: ``preset``'s (``"sfm"`` by default) on ``device``.
        pairs: ``exhaustive``, ``sequential[:k]``, ``retrieval:k`` or a pairs file (see
            :func:`cv2r2d2.pairs.parse_pairs`).
        camera_model, camera_mode: as :func:`write_database`.
        max_distance, ratio: as :func:`cv2r2d2.matching.match_batch`; None: the preset's.
        device: the torch device of the matching (and of the extractor made here).
        database_only: stop after the database and its geometric verification.
        overwrite: extract and match again instead of reusing earlier results.
        show_progress: progress bars (on a terminal).
        verbose: COLMAP's own log on stderr.
        rotations: as :func:`cv2r2d2.matching.match_batch`, with ``feature``'s steerers
            (views that may be rotated in the image plane).
        refine: featuremetric keypoint refinement of the verified tracks before
            mapping (:func:`refine_database`); None: as the preset does.
        refine_params: its settings (None: the preset's, else the defaults).
        refine_feature: the extractor whose network computes the refinement's
            descriptors (None: the preset's refinement network, else ``feature``).
        preset: the name of the settings (:data:`cv2r2d2.presets.PRESETS`) of the
            matching and the refinement, and of the extraction when ``feature`` is None;
            None: ``feature``'s preset, or ``"sfm"`` without a feature.
    """
    import_pycolmap()
    if refine_feature is not None and not hasattr(refine_feature, "computeDescriptorWindows"):
        raise TypeError(f"refine_feature must be an R2D2Feature, got "
                        f"{type(refine_feature).__name__}")
    if refine is not None and not isinstance(refine, (bool, np.bool_)):
        raise TypeError(f"refine must be None, True or False, got {refine!r}")
    if preset is not None:
        get_preset(preset)
    rotation_angles(rotations)  # a bad value fails before the extraction, not after it
    image_dir, output_dir = Path(image_dir), Path(output_dir)
    if not image_dir.is_dir():
        raise NotADirectoryError(f"no such image folder: '{image_dir}'")
    torch_device(device)  # the matcher's: checked before the extraction
    from .feature2d import R2D2Feature

    if feature is not None and not isinstance(feature, R2D2Feature):
        raise TypeError(f"feature must be an R2D2Feature (R2D2Feature.create(...)), got "
                        f"{type(feature).__name__}")
    if feature is None:
        feature = R2D2Feature(R2D2Config.from_arguments(preset=preset or SFM_PRESET,
                                                        device=device))
    chosen = get_preset(preset or feature.getPreset())
    matching = dict(dict(max_distance=None, ratio=None), **chosen.matching)
    matching.update({k: v for k, v in dict(max_distance=max_distance, ratio=ratio).items()
                     if v is not None})
    if refine is None:
        refine = chosen.refinement is not None
    if refine and chosen.refinement is not None:
        if refine_params is None and chosen.refinement.get("upsample", 1.0) != 1.0:
            refine_params = RefinementParams.upsampled(chosen.refinement["upsample"])
        if refine_feature is None and chosen.refinement.get("network"):
            refine_feature = R2D2Feature(feature.getConfig().replace(
                **chosen.refinement["network"]))
    images = list_images([image_dir])
    output_dir.mkdir(parents=True, exist_ok=True)
    seconds: Dict[str, float] = {}
    clock = [time.perf_counter()]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        seconds[stage] = now - clock[0]
        clock[0] = now

    refinement = None
    with H5Features(output_dir / "features.h5", writable=True) as features:
        extraction = extract_collection(images, features, feature, overwrite, show_progress)
        lap("extract")
        names = sorted(set(features.names()) & {name for name, _ in images})
        pair_list = parse_pairs(pairs, names, features, show_progress)
        with H5Matches(output_dir / "matches.h5", writable=True) as matches:
            match_collection(features, pair_list, matches, matching["max_distance"],
                             matching["ratio"], device, overwrite, show_progress,
                             rotations=rotations, steerers=feature)
            lap("match")
            database = output_dir / "database.db"
            with atomic_path(database) as tmp:
                write_database(tmp, image_dir, features, matches, pair_list, camera_model,
                               camera_mode)
                lap("database")
                verified = verify_matches(tmp, verbose=verbose)
                lap("verify")
                if refine and verified:
                    refinement = refine_database(
                        tmp, image_dir, refine_feature or feature, refine_params, _sizes(features),
                        cache=output_dir / "refined_keypoints.npz", overwrite=overwrite,
                        show_progress=show_progress)
                    lap("refine")
    result = SfMResult(num_images=len(images), database=database, failed=extraction.failed,
                       num_pairs=len(pair_list), num_verified_pairs=verified,
                       refinement=refinement, seconds=seconds)
    if not verified:
        result.failure = _failure(
            image_dir, f"no image pair passed COLMAP's geometric verification (of "
                       f"{len(pair_list)} pair(s) matched)", rotations)
        # A model of earlier matches would not be this run's.
        shutil.rmtree(output_dir / "sparse", ignore_errors=True)
        return result
    if database_only:
        return result
    models = incremental_mapping(database, image_dir, output_dir / "sparse", verbose)
    lap("map")
    if not models:
        result.failure = _failure(
            image_dir, "COLMAP found no initial image pair to start a model from "
                       f"({verified} of {len(pair_list)} pair(s) verified, the best with "
                       f"{_most_inliers(database)} inlier matches)", rotations)
        return result
    result.model, best = models[0]
    result.reconstruction = best
    result.num_models = len(models)
    result.num_registered = best.num_reg_images()
    result.num_points3D = best.num_points3D()
    result.mean_track_length = float(best.compute_mean_track_length())
    result.mean_reprojection_error = float(best.compute_mean_reprojection_error())
    readable = len(images) - len(extraction.failed)
    if result.num_registered < readable:
        logger.warning("%d of %d images have no pose in the largest model (%d model(s) "
                       "made): they overlap too little with the others, or need "
                       "--rotations 12 if they are turned in the image plane",
                       readable - result.num_registered, readable, len(models))
    return result


def _failure(image_dir: Path, stage: str, rotations: int) -> str:
    """What failed and what to try, for a reconstruction of ``image_dir`` that made no model."""
    hints = ["photos that overlap more (each scene part seen by three or more photos)",
             "--camera-mode single if one camera took them all"]
    if rotations == 1:
        hints.append("--rotations 12 if some are turned in the image plane")
    hints.append("another preset (--preset accurate or paper)")
    return (f"COLMAP could not reconstruct anything from '{image_dir}': {stage}. Try "
            + "; ".join(hints) + ". COLMAP's own log: -v.")


def _most_inliers(database_path: Path) -> int:
    """The largest inlier match count of a verified pair of the database."""
    pycolmap = import_pycolmap()
    database = pycolmap.Database.open(os.fspath(database_path))
    try:
        return max((len(geometry.inlier_matches) for *_, geometry in verified_matches(database)),
                   default=0)
    finally:
        database.close()
