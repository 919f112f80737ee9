"""COLMAP through pycolmap (>= 4.2): the database, two-view verification and mapping.

The only module that speaks pycolmap's database and pipeline API: it writes a database
of stored features and matches (:func:`write_database`), runs COLMAP's geometric
verification (:func:`verify_matches`) and incremental mapping
(:func:`incremental_mapping`, with pycolmap's mapper options), reads back the verified
matches with their keypoints and descriptors (:func:`read_verified_edges`) and replaces
keypoints in place (:func:`update_keypoints`). :mod:`cv2r2d2.sfm` runs them in order.

Keypoints are COLMAP's pixel convention in the database (the top-left pixel's centre at
(0.5, 0.5)) and OpenCV's everywhere else (at (0, 0)): the functions here convert.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import (
    TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple,
)

import numpy as np

from .utils import MissingDependencyError, PathLike, atomic_dir, import_optional

if TYPE_CHECKING:
    import pycolmap

    from .stores import FeatureStore, H5Matches

__all__ = [
    "CAMERA_MODES",
    "VerifiedEdges",
    "import_pycolmap",
    "check_camera_mode",
    "write_database",
    "verified_matches",
    "verify_matches",
    "read_verified_edges",
    "update_keypoints",
    "most_inliers",
    "pipeline_options",
    "incremental_mapping",
]

logger = logging.getLogger(__name__)

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


@contextlib.contextmanager
def _open(database_path: PathLike) -> Iterator["pycolmap.Database"]:
    """An open database, closed afterwards."""
    database = import_pycolmap().Database.open(os.fspath(database_path))
    try:
        yield database
    finally:
        database.close()


def check_camera_mode(camera_mode: Any) -> str:
    """``camera_mode`` if it is one of :data:`CAMERA_MODES`, else a ValueError naming them."""
    if camera_mode not in CAMERA_MODES:
        raise ValueError(f"camera_mode must be one of {', '.join(CAMERA_MODES)}, got {camera_mode!r}")
    return camera_mode


# --- the database ------------------------------------------------------------------------


def write_database(
    database_path: PathLike,
    image_dir: PathLike,
    features: "FeatureStore",
    matches: "H5Matches",
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
    check_camera_mode(camera_mode)
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
    with _open(database_path) as database:
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
    return {name: ids[name] for name in names if name in ids}


def _check_shared_sizes(features: "FeatureStore", names: Sequence[str], camera_mode: str) -> None:
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


# --- two-view verification ---------------------------------------------------------------


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
    with _open(database_path) as database:
        cameras = {camera.camera_id: camera for camera in database.read_all_cameras()}
        users = collections.Counter(image.camera_id for image in database.read_all_images())
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
    with _open(database_path) as database:
        return len(verified_matches(database))


def most_inliers(database_path: PathLike) -> int:
    """The largest inlier match count of a verified pair of the database (0: none)."""
    with _open(database_path) as database:
        return max((len(geometry.inlier_matches) for *_, geometry in verified_matches(database)),
                   default=0)


# --- reading verified matches back, updating keypoints -----------------------------------


@dataclass
class VerifiedEdges:
    """A verified database's images and the inlier matches between them, image by image
    in image id order.

    Attributes:
        names: the image names; image_ids: their COLMAP ids.
        image_sizes: (width, height) of each image's camera, pixels.
        keypoints: (N_i, 2) float32 keypoint positions of each image, OpenCV's pixel
            convention (the database's minus 0.5).
        sizes: the keypoint scales the database holds for each image ((N_i,) float32),
            or None for an image stored with bare (x, y).
        edges: (M, 4) int64 inlier matches, (image index, keypoint, image index,
            keypoint), the indices into the lists above.
        similarities: (M,) float32 cosine similarity of each match's two descriptors,
            or None when the database holds none.
    """

    names: List[str]
    image_ids: List[int]
    image_sizes: List[Tuple[int, int]]
    keypoints: List[np.ndarray]
    sizes: List[Optional[np.ndarray]]
    edges: np.ndarray
    similarities: Optional[np.ndarray]


def read_verified_edges(database_path: PathLike, min_inliers: int = 1) -> VerifiedEdges:
    """The inlier matches of the pairs of a database that passed geometric verification
    with ``min_inliers`` or more (watermark pairs left out), and what they join.

    Args:
        database_path: a COLMAP database after :func:`verify_matches`.
        min_inliers: fewest inlier matches of a pair whose matches are kept.
    """
    watermark = import_pycolmap().TwoViewGeometryConfiguration.WATERMARK
    with _open(database_path) as database:
        images = sorted(database.read_all_images(), key=lambda image: image.image_id)
        cameras = {camera.camera_id: camera for camera in database.read_all_cameras()}
        index = {image.image_id: i for i, image in enumerate(images)}
        stored = [database.read_keypoints(image.image_id) for image in images]
        edges = [
            np.column_stack([np.full(len(inliers), index[id1]), inliers[:, 0],
                             np.full(len(inliers), index[id2]), inliers[:, 1]])
            for id1, id2, geometry in verified_matches(database)
            for inliers in [np.asarray(geometry.inlier_matches, np.int64)]
            if len(inliers) >= min_inliers and geometry.config != watermark
        ]
        edges = np.concatenate(edges) if edges else np.zeros((0, 4), np.int64)
        # Each end's descriptor, an image at a time: never all of a collection's at once.
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
    return VerifiedEdges(
        names=[image.name for image in images],
        image_ids=[image.image_id for image in images],
        image_sizes=[(cameras[image.camera_id].width, cameras[image.camera_id].height)
                     for image in images],
        keypoints=[points[:, :2] - 0.5 for points in stored],
        sizes=[_stored_sizes(points) for points in stored],
        edges=edges,
        similarities=(ends[0] * ends[1]).sum(axis=1) if ends.shape[2] else None,
    )


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


def update_keypoints(database_path: PathLike, keypoints: Mapping[int, np.ndarray]) -> None:
    """Move the database's keypoints, in place; matches and two-view geometries stay.

    Args:
        keypoints: (N, 2) positions in OpenCV's pixel convention per COLMAP image id, one
            per keypoint the image holds; the other columns of the database's rows
            (scale, orientation or affine shape) are kept. Images whose keypoints are
            already there are not written.
    """
    with _open(database_path) as database:
        for image_id, new in keypoints.items():
            points = database.read_keypoints(image_id)
            if not np.array_equal(points[:, :2] - 0.5, new):
                points = points.copy()
                points[:, :2] = new + 0.5
                database.update_keypoints(image_id, points)


# --- mapping -----------------------------------------------------------------------------


def pipeline_options(
    options: Optional[Mapping[str, Any]] = None,
) -> "pycolmap.IncrementalPipelineOptions":
    """pycolmap's ``IncrementalPipelineOptions`` with ``options`` applied, as hloc's
    ``mapper_options``: ``{"min_model_size": 3, "mapper": {"init_min_num_inliers": 50}}``
    (a nested dict for a nested options object; ``pycolmap.IncrementalPipelineOptions()
    .summary()`` lists them all).

    Raises:
        ValueError: a key that is no such option, or a value of the wrong type.
    """
    pipeline = import_pycolmap().IncrementalPipelineOptions()
    if options is not None:
        _apply_options(pipeline, options, "mapper_options")
    return pipeline


def _apply_options(target: Any, options: Mapping[str, Any], where: str) -> None:
    if not isinstance(options, Mapping):
        raise TypeError(f"{where} must be a dict of option names to values, got "
                        f"{type(options).__name__}")
    known = target.todict()
    for key, value in options.items():
        if key not in known:
            raise ValueError(f"{where}: {type(target).__name__} has no option {key!r}; its "
                             f"options are {', '.join(sorted(known))}")
        current = getattr(target, key)
        if isinstance(value, Mapping) and hasattr(current, "todict"):
            _apply_options(current, value, f"{where}[{key!r}]")
            continue
        try:
            setattr(target, key, value)
        except TypeError:
            raise ValueError(f"{where}: option {key!r} takes {type(current).__name__} values "
                             f"(default {current!r}), got {value!r}") from None


def incremental_mapping(
    database_path: PathLike, image_dir: PathLike, output_dir: PathLike, verbose: bool = False,
    mapper_options: Optional[Mapping[str, Any]] = None,
) -> List[Tuple[Path, "pycolmap.Reconstruction"]]:
    """COLMAP's incremental mapping; models are written to ``output_dir/0``, ``/1``...

    An existing ``output_dir`` is replaced once mapping has finished; when COLMAP makes
    no model, it is removed (it would hold the models of other matches).

    Args:
        mapper_options: pycolmap's mapper options to change (see :func:`pipeline_options`).

    Returns:
        (folder, reconstruction) of each model, largest (most registered images) first;
        empty when COLMAP made none.
    """
    pycolmap = import_pycolmap()
    options = pipeline_options(mapper_options)
    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as work, _colmap_log_level(pycolmap, verbose):
        models = pycolmap.incremental_mapping(
            os.fspath(database_path), os.fspath(image_dir), os.fspath(work), options=options,
        )
    if not models:
        shutil.rmtree(output_dir, ignore_errors=True)
        return []
    found = [(output_dir / str(index), model) for index, model in models.items()]
    return sorted(found, key=lambda item: -item[1].num_reg_images())
