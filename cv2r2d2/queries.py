"""Query photos for localisation, their cameras, and their results files.

A query is an image file, with intrinsics when they are known: from an hloc query list
(``name MODEL WIDTH HEIGHT p1 p2 ...``), given for all the queries, or else from the
photo's EXIF focal length and size as COLMAP reads them (without EXIF, COLMAP's guess of
1.2 x the longer side, which the pose solver then estimates).
:func:`cv2r2d2.localization.localize` gives a :class:`QueryResult` per query;
:func:`write_results` writes them in hloc's results format (COLMAP's ``cam_from_world``
poses), with every query's outcome beside them.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .colmap import import_pycolmap
from .image import list_images
from .utils import PathLike, atomic_path

if TYPE_CHECKING:
    import pycolmap

__all__ = [
    "CAMERA_MODEL",
    "FOCAL_LENGTH_FACTOR",
    "Query",
    "read_queries",
    "camera_models",
    "check_camera_model",
    "given_camera",
    "query_camera",
    "QueryResult",
    "write_results",
    "read_results",
    "logs_path",
]

logger = logging.getLogger(__name__)

CAMERA_MODEL = "SIMPLE_RADIAL"
"""The COLMAP camera model of queries without listed intrinsics, by default."""
FOCAL_LENGTH_FACTOR = 1.2
"""Without EXIF, COLMAP's focal length guess: this factor times the longer side."""


@dataclass
class Query:
    """A photo to localise.

    Attributes:
        name: its name in the results (its path relative to the folder or list file).
        path: the image file.
        camera: its intrinsics (None: from EXIF and the image size, or the caller's).
    """

    name: str
    path: Path
    camera: Optional["pycolmap.Camera"] = None


def camera_models() -> List[str]:
    """The names of COLMAP's camera models (``SIMPLE_RADIAL``, ``PINHOLE``, ...)."""
    pycolmap = import_pycolmap()
    return [name for name in pycolmap.CameraModelId.__members__ if name != "INVALID"]


def check_camera_model(camera_model: Any) -> str:
    """``camera_model`` if it names a COLMAP camera model, else a ValueError naming them."""
    models = camera_models()
    if camera_model not in models:
        raise ValueError(f"camera_model must be one of {', '.join(models)}, got {camera_model!r}")
    return camera_model


def given_camera(camera_model: str, params: Sequence[float], width: int, height: int,
                 where: str) -> "pycolmap.Camera":
    """A camera of known intrinsics, checked against its model's parameter count.

    Args:
        camera_model: a COLMAP camera model.
        params: its parameters, pixels.
        width: the image's width, pixels.
        height: the image's height, pixels.
        where: what the error messages name (a list file's line, an argument).
    """
    pycolmap = import_pycolmap()
    check_camera_model(camera_model)
    camera = pycolmap.Camera.create_from_model_name(0, camera_model, 1.0, int(width), int(height))
    try:
        values = [float(value) for value in params]
    except (TypeError, ValueError):
        raise ValueError(f"{where}: camera parameters must be numbers, got {params!r}") from None
    if len(values) != len(camera.params) or not all(map(math.isfinite, values)):
        raise ValueError(f"{where}: a {camera_model} camera takes {len(camera.params)} finite "
                         f"parameters ({camera.params_info}), got {params!r}")
    camera.params = values
    camera.has_prior_focal_length = True
    return camera


def read_queries(queries: Union[PathLike, Sequence[PathLike]]) -> List[Query]:
    """The photos named by an image file, a folder (searched recursively) or a ``.txt``
    list (or several of these), as :func:`cv2r2d2.image.list_images` finds them.

    A list line may give the photo's intrinsics as hloc's query lists do:
    ``name MODEL WIDTH HEIGHT p1 p2 ...`` (COLMAP camera model and parameters); other
    lines are paths, relative to the list's folder.

    Raises:
        FileNotFoundError: a query that does not exist.
        ValueError: no image found, a malformed intrinsics line.
    """
    inputs = [queries] if isinstance(queries, (str, os.PathLike)) else list(queries)
    found: List[Query] = []
    for item in inputs:
        path = Path(item)
        if not (path.is_file() and path.suffix.lower() == ".txt"):
            found += [Query(name, file) for name, file in list_images([path])]
            continue
        models = set(camera_models())
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            words = line.split()
            if len(words) >= 5 and words[1] in models:
                where = f"{path} line {number}"
                try:
                    width, height = int(words[2]), int(words[3])
                except ValueError:
                    raise ValueError(f"{where}: WIDTH and HEIGHT must be integers, got "
                                     f"{words[2]!r} {words[3]!r}") from None
                camera = given_camera(words[1], words[4:], width, height, where)
                name, file = _list_line(path, words[0])
                found.append(Query(name, file, camera))
            elif line.strip() and not line.strip().startswith("#"):
                name, file = _list_line(path, line.strip())
                found.append(Query(name, file))
    if not found:
        raise ValueError(f"no query images in {', '.join(map(os.fspath, inputs))}")
    seen: Dict[str, Path] = {}
    for query in found:
        if seen.setdefault(query.name, query.path) != query.path:
            raise ValueError(f"two queries have the name {query.name!r}: {seen[query.name]} "
                             f"and {query.path}")
    return found


def _list_line(list_file: Path, line: str) -> Tuple[str, Path]:
    """(name, path) of one line of a list file, named as :func:`list_images` names it."""
    listed = Path(line)
    outside = listed.is_absolute() or ".." in listed.parts
    path = list_file.parent / listed
    if not path.is_file():
        raise FileNotFoundError(f"no such query image: {path} (listed in {list_file})")
    return listed.name if outside else listed.as_posix(), path


def query_camera(query: Query, image_size: Tuple[int, int], camera_model: str,
                  camera_params: Optional[Sequence[float]]) -> Tuple["pycolmap.Camera", str]:
    """The query's camera and where its focal length comes from: ``given`` (listed with
    the query, else ``camera_params`` of ``camera_model``), ``exif`` or ``guess``
    (:data:`FOCAL_LENGTH_FACTOR` x the longer side).

    Args:
        image_size: (width, height) of the decoded image, pixels (OpenCV applies the EXIF
            orientation, COLMAP does not).
    """
    pycolmap = import_pycolmap()
    width, height = image_size
    if query.camera is not None:
        camera = query.camera
        if (camera.width, camera.height) != (width, height):
            raise ValueError(f"{query.name} is {width}x{height} pixels but its listed camera "
                             f"is {camera.width}x{camera.height}")
        return camera, "given"
    if camera_params is not None:
        return given_camera(camera_model, camera_params, width, height, query.name), "given"
    focal, source = FOCAL_LENGTH_FACTOR * max(width, height), "guess"
    try:
        exif = pycolmap.infer_camera_from_image(
            os.fspath(query.path), pycolmap.ImageReaderOptions(camera_model=camera_model))
        if exif.has_prior_focal_length:
            focal, source = float(exif.mean_focal_length()), "exif"
    except ValueError as exc:  # a format COLMAP cannot read: no EXIF then
        logger.debug("no EXIF focal length for %s: %s", query.name, exc)
    # The size is the decoded image's: OpenCV applies the EXIF orientation, COLMAP does
    # not (a portrait photo stored landscape), and the keypoints are OpenCV's.
    camera = pycolmap.Camera.create_from_model_name(0, camera_model, focal, width, height)
    camera.has_prior_focal_length = source == "exif"
    return camera, source


# --- results ----------------------------------------------------------------------------


@dataclass
class QueryResult:
    """The outcome of one query.

    Attributes:
        name: the query's name.
        success: whether it was localised (``min_inliers`` inliers or more).
        qvec: (w, x, y, z) unit quaternion of the rotation of ``cam_from_world``, or None.
        tvec: (x, y, z) translation of ``cam_from_world`` (model units), or None.
        num_inliers: inlier 2D-3D correspondences of the pose (0 without one).
        num_correspondences: distinct 2D-3D correspondences found.
        database_images: the retrieved model images, most similar first.
        inliers_per_image: inliers through each of them.
        camera: the camera's model, width, height and params (after refinement when
            localised), and where its focal length came from (``given``, ``exif``,
            ``guess``).
        reason: why it was not localised (None when it was).
        seconds: wall time per stage (``extract``, ``retrieve``, ``match``, ``pose``).
    """

    name: str
    success: bool
    qvec: Optional[Tuple[float, float, float, float]] = None
    tvec: Optional[Tuple[float, float, float]] = None
    num_inliers: int = 0
    num_correspondences: int = 0
    database_images: List[str] = field(default_factory=list)
    inliers_per_image: List[int] = field(default_factory=list)
    camera: Dict[str, Any] = field(default_factory=dict)
    reason: Optional[str] = None
    seconds: Dict[str, float] = field(default_factory=dict)

    def rotation(self) -> np.ndarray:
        """(3, 3) world-to-camera rotation matrix (a localised query only)."""
        w, x, y, z = self._pose()[0]
        return np.array([
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ])

    def projection_center(self) -> np.ndarray:
        """(3,) camera centre in the model's frame, ``-R^T t``."""
        return -self.rotation().T @ np.asarray(self._pose()[1])

    def _pose(self) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
        if self.qvec is None or self.tvec is None:
            raise ValueError(f"{self.name} was not localised: it has no pose")
        return self.qvec, self.tvec


def logs_path(results: PathLike) -> Path:
    """The log written beside a results file: ``<results>_logs.json`` (hloc writes
    ``<results>_logs.pkl``)."""
    return Path(f"{os.fspath(results)}_logs.json")


def write_results(path: PathLike, results: Sequence[QueryResult]) -> None:
    """Write the poses in hloc's format and every query's outcome beside them.

    ``path`` gets one ``name qw qx qy qz tx ty tz`` line per localised query (COLMAP's
    ``cam_from_world``, as hloc's ``localize_sfm`` writes); queries that were not
    localised have no line there. :func:`logs_path` gets all of them as JSON (name,
    success, reason, inliers, correspondences, retrieved images, camera, times). Both
    files are written atomically, together.
    """
    spaced = [result.name for result in results if result.success and " " in result.name]
    if spaced:
        raise ValueError(f"hloc's results format cannot hold image names with spaces: "
                         f"{spaced[0]!r}")
    lines = [" ".join([result.name, *(repr(v) for v in (*result.qvec, *result.tvec))])
             for result in results if result.success
             and result.qvec is not None and result.tvec is not None]
    logs = {"localized": sum(result.success for result in results), "queries": len(results),
            "results": [asdict(result) for result in results]}
    with atomic_path(logs_path(path)) as logs_tmp, atomic_path(path) as tmp:
        Path(logs_tmp).write_text(json.dumps(logs, indent=1), encoding="utf-8")
        Path(tmp).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def read_results(path: PathLike) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
    """The poses of an hloc results file: name -> ((4,) qw qx qy qz, (3,) t)."""
    poses = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if len(words) != 8:
            raise ValueError(f"{path} line {number}: expected 'name qw qx qy qz tx ty tz', "
                             f"got {line!r}")
        values = np.array([float(v) for v in words[1:]])
        poses[words[0]] = (values[:4], values[4:])
    return poses
