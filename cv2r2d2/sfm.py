"""Structure from motion with R2D2 features and COLMAP (through pycolmap >= 4.2).

:func:`reconstruct` runs the whole chain on a folder of photos: R2D2 extraction into
``features.h5``, mutual nearest-neighbour matching into ``matches.h5`` (both resumable,
see :mod:`cv2r2d2.io`), a COLMAP database (cameras from the image size, or the EXIF
focal length when present; keypoints; descriptors; matches), COLMAP's geometric
verification and incremental mapping into ``sparse/``. Each step is also a function
of its own, for users who run COLMAP themselves.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .collection import extract_collection, match_collection
from .image import list_images
from .pairs import parse_pairs
from .stores import FeatureStore, H5Features, H5Matches
from .utils import MissingDependencyError, atomic_dir, atomic_path, import_optional, torch_device
from .steerers import rotation_angles

if TYPE_CHECKING:
    import pycolmap

    from .feature2d import R2D2Feature

__all__ = [
    "CAMERA_MODES",
    "SfMResult",
    "import_pycolmap",
    "write_database",
    "verify_matches",
    "incremental_mapping",
    "reconstruct",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
CAMERA_MODES = ("auto", "single", "per_folder", "per_image")
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
    """COLMAP's own log (glog, on stderr) only when verbose; restored afterwards."""
    level = pycolmap.logging.minloglevel
    pycolmap.logging.minloglevel = level if verbose else max(level, 1)
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
    pycolmap.Database.open(str(database_path)).close()
    names = features.names()
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


def verify_matches(database_path: PathLike, num_threads: int = -1, verbose: bool = False) -> int:
    """COLMAP's geometric verification of all the database's matched pairs.

    Args:
        num_threads: worker threads (-1: all cores).

    Returns:
        The number of verified image pairs.
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
        return int(database.num_verified_image_pairs())
    finally:
        database.close()


def incremental_mapping(
    database_path: PathLike, image_dir: PathLike, output_dir: PathLike, verbose: bool = False,
) -> List[Tuple[Path, "pycolmap.Reconstruction"]]:
    """COLMAP's incremental mapping; models are written to ``output_dir/0``, ``/1``...

    An existing ``output_dir`` is replaced once mapping has finished.

    Returns:
        (folder, reconstruction) of each model, largest (most registered images) first.
    """
    pycolmap = import_pycolmap()
    output_dir = Path(output_dir)
    with atomic_dir(output_dir) as work, _colmap_log_level(pycolmap, verbose):
        models = pycolmap.incremental_mapping(
            os.fspath(database_path), os.fspath(image_dir), os.fspath(work),
        )
    found = [(output_dir / str(index), model) for index, model in models.items()]
    return sorted(found, key=lambda item: -item[1].num_reg_images())


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
    """

    num_images: int
    database: Path
    num_registered: int = 0
    num_points3D: int = 0
    mean_track_length: float = 0.0
    mean_reprojection_error: float = 0.0
    num_models: int = 0
    model: Optional[Path] = None
    reconstruction: Any = None
    failed: List[Tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        """A few lines for people."""
        lines = [f"images:                {self.num_images} ({len(self.failed)} unreadable)",
                 f"database:              {self.database}"]
        if self.model is not None:
            lines += [
                f"registered images:     {self.num_registered} / {self.num_images - len(self.failed)}",
                f"3-D points:            {self.num_points3D}",
                f"mean track length:     {self.mean_track_length:.2f}",
                f"mean reprojection err: {self.mean_reprojection_error:.3f} px",
                f"models:                {self.num_models} (largest in {self.model})",
            ]
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
) -> SfMResult:
    """Photos in, sparse COLMAP model out.

    Writes ``features.h5``, ``matches.h5`` (reused by a later run unless
    ``overwrite``), ``database.db`` and, unless ``database_only``, ``sparse/<k>``
    in ``output_dir``.

    Args:
        image_dir: the photos (searched recursively).
        output_dir: where to write.
        feature: the extractor; None: ``R2D2Feature.create(device=device)``.
        pairs: ``exhaustive``, ``sequential[:k]`` or a pairs file (see
            :func:`cv2r2d2.matching.parse_pairs`).
        camera_model, camera_mode: as :func:`write_database`.
        max_distance, ratio, device: as :func:`cv2r2d2.matching.match_batch`.
        database_only: stop after the database and its geometric verification.
        overwrite: extract and match again instead of reusing earlier results.
        show_progress: progress bars (on a terminal).
        verbose: COLMAP's own log on stderr.
        rotations: as :func:`cv2r2d2.matching.match_batch`, with ``feature``'s steerers
            (views that may be rotated in the image plane).
    """
    import_pycolmap()
    rotation_angles(rotations)  # a bad value fails before the extraction, not after it
    image_dir, output_dir = Path(image_dir), Path(output_dir)
    if not image_dir.is_dir():
        raise NotADirectoryError(f"no such image folder: {image_dir}")
    torch_device(device)  # the matcher's: checked before the extraction
    if feature is None:
        from .feature2d import R2D2Feature

        feature = R2D2Feature.create(device=device)
    images = list_images([image_dir])
    output_dir.mkdir(parents=True, exist_ok=True)
    with H5Features(output_dir / "features.h5", writable=True) as features:
        extraction = extract_collection(images, features, feature, overwrite, show_progress)
        names = sorted(set(features.names()) & {name for name, _ in images})
        pair_list = parse_pairs(pairs, names)
        with H5Matches(output_dir / "matches.h5", writable=True) as matches:
            match_collection(features, pair_list, matches, max_distance, ratio, device,
                             overwrite, show_progress, rotations=rotations, steerers=feature)
            database = output_dir / "database.db"
            with atomic_path(database) as tmp:
                write_database(tmp, image_dir, features, matches, pair_list, camera_model,
                               camera_mode)
                verified = verify_matches(tmp, verbose=verbose)
    logger.info("%d of %d image pairs passed geometric verification", verified, len(pair_list))
    result = SfMResult(num_images=len(images), database=database, failed=extraction.failed)
    if database_only:
        return result
    models = incremental_mapping(database, image_dir, output_dir / "sparse", verbose)
    if not models:
        logger.warning("COLMAP could not reconstruct anything from %s", image_dir)
        return result
    result.model, best = models[0]
    result.reconstruction = best
    result.num_models = len(models)
    result.num_registered = best.num_reg_images()
    result.num_points3D = best.num_points3D()
    result.mean_track_length = float(best.compute_mean_track_length())
    result.mean_reprojection_error = float(best.compute_mean_reprojection_error())
    return result

