"""Structure from motion with R2D2 features and COLMAP (through pycolmap >= 4.2).

:func:`reconstruct` runs the whole chain on a folder of photos: R2D2 extraction into
``features.h5``, mutual nearest-neighbour matching into ``matches.h5`` (both resumable,
see :mod:`cv2r2d2.collection`), a COLMAP database (cameras from the image size, or the
EXIF focal length when present; keypoints; descriptors; matches), COLMAP's geometric
verification, the featuremetric refinement of the verified tracks
(:func:`refine_database`, cached) and incremental mapping into ``sparse/``. Its choices
come in option objects (:class:`MatchingOptions`, :class:`CameraOptions`,
:class:`RefinementOptions`) and pycolmap's own mapper options as a dict. The COLMAP
steps are functions of :mod:`cv2r2d2.colmap`, for users who run COLMAP themselves.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .collection import MatchingSettings, extract_collection, match_collection
from .colmap import (
    check_camera_mode, import_pycolmap, incremental_mapping, most_inliers, pipeline_options,
    read_verified_edges, update_keypoints, verify_matches, write_database,
)
from .config import R2D2Config
from .image import list_images
from .pairs import parse_pairs
from .presets import SFM_PRESET, Preset, get_preset
from .refinement import RefinementParams, RefinementReport, refine_keypoints
from .stores import FeatureStore, H5Features, H5Matches
from .utils import PathLike, atomic_path, torch_device

if TYPE_CHECKING:
    from .feature2d import R2D2Feature

__all__ = [
    "MatchingOptions",
    "CameraOptions",
    "RefinementOptions",
    "SfMResult",
    "refine_database",
    "reconstruct",
]

logger = logging.getLogger(__name__)


# --- options -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MatchingOptions:
    """Which image pairs :func:`reconstruct` matches, and how.

    Attributes:
        pairs: ``exhaustive``, ``sequential[:k]``, ``retrieval:k`` or a pairs file (see
            :func:`cv2r2d2.pairs.parse_pairs`).
        max_distance: as :func:`cv2r2d2.matching.match_batch`; None: the preset's.
        ratio: as :func:`cv2r2d2.matching.match_batch`; None: the preset's.
        rotations: as :func:`cv2r2d2.matching.match_batch`, with the extractor's steerers
            (views that may be rotated in the image plane).
    """

    pairs: str = "exhaustive"
    max_distance: Optional[float] = None
    ratio: Optional[float] = None
    rotations: int = 1

    def __post_init__(self) -> None:
        # The matcher's own checks, before the extraction (None: the preset's, later).
        MatchingSettings(self.max_distance, self.ratio, self.rotations)

    def settings(self, device: Optional[str]) -> MatchingSettings:
        """The matcher's settings for a run on ``device``."""
        return MatchingSettings(self.max_distance, self.ratio, self.rotations, device)


@dataclass(frozen=True)
class CameraOptions:
    """The cameras of the COLMAP database (see :func:`cv2r2d2.colmap.write_database`).

    Attributes:
        model: a COLMAP camera model (``SIMPLE_RADIAL``, ``PINHOLE``, ...).
        mode: ``auto`` (a camera per image unless EXIF says otherwise), ``single``,
            ``per_folder`` or ``per_image``.
    """

    model: str = "SIMPLE_RADIAL"
    mode: str = "auto"

    def __post_init__(self) -> None:
        check_camera_mode(self.mode)


@dataclass(frozen=True)
class RefinementOptions:
    """The featuremetric keypoint refinement of the verified tracks before mapping
    (:func:`refine_database`).

    Attributes:
        enabled: refine; None: as the preset does (the ``sfm`` preset refines).
        params: its settings (None: the preset's, else the defaults).
        feature: the extractor whose network computes the refinement's descriptors
            (None: the preset's refinement network, else the extraction's).
    """

    enabled: Optional[bool] = None
    params: Optional[RefinementParams] = None
    feature: Optional["R2D2Feature"] = None

    def __post_init__(self) -> None:
        if self.enabled is not None and not isinstance(self.enabled, (bool, np.bool_)):
            raise TypeError(f"RefinementOptions.enabled must be None, True or False, got "
                            f"{self.enabled!r}")
        if self.params is not None and not isinstance(self.params, RefinementParams):
            raise TypeError(f"RefinementOptions.params must be a RefinementParams, got "
                            f"{type(self.params).__name__}")
        if self.feature is not None and not hasattr(self.feature, "_descriptor_windows"):
            raise TypeError(f"RefinementOptions.feature must be an R2D2Feature, got "
                            f"{type(self.feature).__name__}")


def _options(value: Any, kind: type, name: str) -> Any:
    """``value`` (None: the defaults) if it is a ``kind``, else a TypeError."""
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise TypeError(f"{name} must be a {kind.__name__} (or None), got {type(value).__name__}")
    return value


# --- refinement of a database, cached ------------------------------------------------------


def _fingerprint(feature: "R2D2Feature", params: RefinementParams, names: Sequence[str],
                 arrays: Sequence[np.ndarray]) -> str:
    """sha256 of everything a refinement's result depends on."""
    digest = hashlib.sha256(json.dumps({
        "model": feature.getModel(), "extraction": feature.getConfig().params.as_dict(),
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
        database_path: a COLMAP database after :func:`cv2r2d2.colmap.verify_matches`.
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
    params = params if params is not None else RefinementParams()
    verified = read_verified_edges(database_path, params.min_inliers)
    names = verified.names
    if sizes is not None:
        detected: Optional[List[np.ndarray]] = [np.asarray(sizes[name], np.float32)
                                                for name in names]
    else:
        detected = None if any(s is None for s in verified.sizes) else verified.sizes
    fingerprint = _fingerprint(feature, params, names, [
        *verified.keypoints, *(detected or []), verified.edges,
        np.asarray(verified.image_sizes, np.int64)])
    refined = None
    if cache is not None and not overwrite:
        refined = _read_refined(Path(cache), fingerprint, names)
    if refined is not None:
        logger.info("refined keypoints read from %s", cache)
        report = RefinementReport(cached=True)
    else:
        refined, report = refine_keypoints(
            feature, [Path(image_dir) / name for name in names], verified.keypoints,
            verified.edges, sizes=detected, image_sizes=verified.image_sizes,
            scores=verified.similarities, params=params, show_progress=show_progress)
        if cache is not None:
            _write_refined(Path(cache), fingerprint, names, refined)
    update_keypoints(database_path, dict(zip(verified.image_ids, refined)))
    return report


# --- the whole chain ---------------------------------------------------------------------


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
        num_pairs: image pairs matched.
        num_verified_pairs: those that passed geometric verification.
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
    *,
    preset: Optional[str] = None,
    matching: Optional[MatchingOptions] = None,
    camera: Optional[CameraOptions] = None,
    refinement: Optional[RefinementOptions] = None,
    mapper_options: Optional[Mapping[str, Any]] = None,
    device: Optional[str] = None,
    database_only: bool = False,
    overwrite: bool = False,
    show_progress: bool = False,
    verbose: bool = False,
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
        preset: the name of the settings (:data:`cv2r2d2.presets.PRESETS`) of the
            matching and the refinement, and of the extraction when ``feature`` is None;
            None: ``feature``'s preset, or ``"sfm"`` without a feature.
        matching: the pairs and the matcher (None: exhaustive, the preset's matcher).
        camera: the database's cameras (None: ``SIMPLE_RADIAL``, COLMAP's choice).
        refinement: the keypoint refinement (None: as the preset does).
        mapper_options: pycolmap's ``IncrementalPipelineOptions`` to change, as hloc's
            (see :func:`cv2r2d2.colmap.pipeline_options`); an unknown one is a ValueError.
        device: the torch device of the matching (and of the extractor made here).
        database_only: stop after the database, its geometric verification and the
            refinement.
        overwrite: extract and match again instead of reusing earlier results.
        show_progress: progress bars (on a terminal).
        verbose: COLMAP's own log on stderr.
    """
    matching = _options(matching, MatchingOptions, "matching")
    camera = _options(camera, CameraOptions, "camera")
    refinement = _options(refinement, RefinementOptions, "refinement")
    import_pycolmap()
    pipeline_options(mapper_options)  # a bad option fails before the extraction
    if preset is not None:
        get_preset(preset)
    image_dir, output_dir = Path(image_dir), Path(output_dir)
    if not image_dir.is_dir():
        raise NotADirectoryError(f"no such image folder: '{image_dir}'")
    torch_device(device)  # the matcher's: checked before the extraction
    feature = _extractor(feature, preset, device)
    chosen = get_preset(preset or feature.getPreset())
    run = _Run(image_dir, output_dir, feature, _preset_matching(matching, chosen), camera,
               _preset_refinement(refinement, chosen, feature), device, overwrite,
               show_progress, verbose)
    result = run.database()
    if not result.num_verified_pairs:
        result.failure = run.failure(
            f"no image pair passed COLMAP's geometric verification (of "
            f"{result.num_pairs} pair(s) matched)")
        # A model of earlier matches would not be this run's.
        shutil.rmtree(output_dir / "sparse", ignore_errors=True)
    elif not database_only:
        run.map(result, mapper_options)
    return result


def _extractor(feature: Optional["R2D2Feature"], preset: Optional[str],
               device: Optional[str]) -> "R2D2Feature":
    """``feature``, checked, or the preset's extractor (``sfm`` without a preset)."""
    from .feature2d import R2D2Feature

    if feature is None:
        return R2D2Feature(R2D2Config.from_arguments(preset=preset or SFM_PRESET, device=device))
    if not isinstance(feature, R2D2Feature):
        raise TypeError(f"feature must be an R2D2Feature (R2D2Feature.create(...)), got "
                        f"{type(feature).__name__}")
    return feature


def _preset_matching(matching: MatchingOptions, preset: Preset) -> MatchingOptions:
    """``matching`` with the preset's ``max_distance`` and ``ratio`` where it has None."""
    return replace(matching, **{key: preset.matching.get(key) for key in ("max_distance", "ratio")
                                if getattr(matching, key) is None})


def _preset_refinement(refinement: RefinementOptions, preset: Preset,
                       feature: "R2D2Feature") -> RefinementOptions:
    """``refinement`` with what it leaves to the preset chosen: whether to refine, the
    upsampling and the network."""
    from .feature2d import R2D2Feature

    enabled = preset.refinement is not None if refinement.enabled is None \
        else bool(refinement.enabled)
    params, network = refinement.params, refinement.feature
    if enabled and preset.refinement is not None:
        if params is None and preset.refinement.get("upsample", 1.0) != 1.0:
            params = RefinementParams.upsampled(preset.refinement["upsample"])
        if network is None and preset.refinement.get("network"):
            network = R2D2Feature(feature.getConfig().replace(**preset.refinement["network"]))
    return RefinementOptions(enabled, params, network or feature)


class _Run:
    """One :func:`reconstruct` call's stages, with their wall times."""

    def __init__(self, image_dir: Path, output_dir: Path, feature: "R2D2Feature",
                 matching: MatchingOptions, camera: CameraOptions,
                 refinement: RefinementOptions, device: Optional[str], overwrite: bool,
                 show_progress: bool, verbose: bool) -> None:
        self.image_dir, self.output_dir, self.feature = image_dir, output_dir, feature
        self.matching, self.camera, self.refinement = matching, camera, refinement
        self.device, self.overwrite = device, overwrite
        self.show_progress, self.verbose = show_progress, verbose
        self.seconds: Dict[str, float] = {}
        self._clock = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self._clock
        self._clock = now

    def database(self) -> SfMResult:
        """Extraction, matching, the database, its verification and refinement."""
        images = list_images([self.image_dir])
        self.output_dir.mkdir(parents=True, exist_ok=True)
        database = self.output_dir / "database.db"
        refinement = None
        with H5Features(self.output_dir / "features.h5", writable=True) as features:
            extraction = extract_collection(images, features, self.feature, self.overwrite,
                                            self.show_progress)
            self.lap("extract")
            names = sorted(set(features.names()) & {name for name, _ in images})
            pairs = parse_pairs(self.matching.pairs, names, features, self.show_progress)
            with H5Matches(self.output_dir / "matches.h5", writable=True) as matches:
                self.match(features, pairs, matches)
                with atomic_path(database) as tmp:
                    write_database(tmp, self.image_dir, features, matches, pairs,
                                   self.camera.model, self.camera.mode)
                    self.lap("database")
                    verified = verify_matches(tmp, verbose=self.verbose)
                    self.lap("verify")
                    if self.refinement.enabled and verified:
                        refinement = self.refine(tmp, features)
        return SfMResult(num_images=len(images), database=database, failed=extraction.failed,
                         num_pairs=len(pairs), num_verified_pairs=verified,
                         refinement=refinement, seconds=self.seconds)

    def match(self, features: FeatureStore, pairs: Sequence[Tuple[str, str]],
              matches: H5Matches) -> None:
        match_collection(features, pairs, matches, self.matching.settings(self.device),
                         self.feature, self.overwrite, self.show_progress)
        self.lap("match")

    def refine(self, database: Path, features: FeatureStore) -> RefinementReport:
        report = refine_database(
            database, self.image_dir, self.refinement.feature, self.refinement.params,
            _sizes(features), cache=self.output_dir / "refined_keypoints.npz",
            overwrite=self.overwrite, show_progress=self.show_progress)
        self.lap("refine")
        return report

    def map(self, result: SfMResult, mapper_options: Optional[Mapping[str, Any]]) -> None:
        """Incremental mapping of the verified database into ``sparse/``; the largest
        model's figures into ``result``."""
        models = incremental_mapping(result.database, self.image_dir,
                                     self.output_dir / "sparse", self.verbose, mapper_options)
        self.lap("map")
        if not models:
            result.failure = self.failure(
                "COLMAP found no initial image pair to start a model from "
                f"({result.num_verified_pairs} of {result.num_pairs} pair(s) verified, the "
                f"best with {most_inliers(result.database)} inlier matches)")
            return
        result.model, best = models[0]
        result.reconstruction = best
        result.num_models = len(models)
        result.num_registered = best.num_reg_images()
        result.num_points3D = best.num_points3D()
        result.mean_track_length = float(best.compute_mean_track_length())
        result.mean_reprojection_error = float(best.compute_mean_reprojection_error())
        readable = result.num_images - len(result.failed)
        if result.num_registered < readable:
            logger.warning("%d of %d images have no pose in the largest model (%d model(s) "
                           "made): they overlap too little with the others, or need "
                           "--rotations 12 if they are turned in the image plane",
                           readable - result.num_registered, readable, len(models))

    def failure(self, stage: str) -> str:
        """What failed and what to try, when COLMAP made no model."""
        hints = ["photos that overlap more (each scene part seen by three or more photos)",
                 "--camera-mode single if one camera took them all"]
        if self.matching.rotations == 1:
            hints.append("--rotations 12 if some are turned in the image plane")
        hints.append("another preset (--preset accurate or paper)")
        return (f"COLMAP could not reconstruct anything from '{self.image_dir}': {stage}. "
                "Try " + "; ".join(hints) + ". COLMAP's own log: -v.")
