"""Structure from motion on real photos: COLMAP SIFT against `cv2r2d2 sfm` settings.

On ../shared/images/sacre_coeur (10 photos of mixed sizes), each pipeline reconstructs
with pycolmap's incremental mapping (a camera per image, COLMAP's "auto" mode):

- ``sift``: pycolmap's own extract_features, match_exhaustive, incremental_mapping;
- the presets as ``cv2r2d2 sfm`` runs them: ``preset-sfm`` (the command's default, no
  option) and ``preset-paper`` (``--preset paper``), each with an empty derived-model
  cache (``$CV2R2D2_CACHE_DIR`` in the working folder), so that the ``total`` time
  includes the int8 network's first-use build;
- R2D2 configurations through :func:`cv2r2d2.sfm.reconstruct`: ``default``,
  ``subpixel`` (``subpixel=True``), ``descriptor`` (``subpixel="descriptor"``), ``unique``
  (``unique_radius=1``: one keypoint per place across levels), each with and without
  ``+refine`` (``reconstruct(refinement=RefinementOptions(True))``); ``+refine-int8``
  refines with the model's int8 network (``precision="int8"``, built on first use from
  procedural images and cached), ``+refine-x2`` on levels up to twice
  finer (``RefinementParams.upsampled(2)``), ``+refine-x2-int8`` both, ``+refine-x2.5-int8``
  at 2.5 times.

Printed per pipeline: registered images, 3-D points, mean track length, mean
reprojection error, camera agreement with the SIFT model (camera centres after a
similarity fit, median, in % of the scene radius: the median distance of the SIFT model's
cameras from the median of its 3-D points; rotation error, median, degrees), and the time of
each stage. Configurations with the same extraction settings share one extraction and one
matching (their ``extract`` and ``match`` times are those of the first), so the ``refine``
stage can be set against the extraction of the same images.

    python benchmarks/bench_sfm.py --work /tmp/bench_sfm [--repeats 3] [--configs ...]

Mapping is randomised (RANSAC); ``--repeats`` maps each database several times and prints
the median of each figure. Expect about 4 minutes per extraction setting on 2 cores.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

import cv2r2d2
from cv2r2d2.colmap import import_pycolmap, incremental_mapping
from cv2r2d2.refinement import RefinementParams
from cv2r2d2.sfm import RefinementOptions, reconstruct

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images" / "sacre_coeur"

# name: (R2D2Feature.create keyword arguments, refine, refinement upsample, int8 refinement);
# the preset rows leave refinement to the preset (None).
CONFIGS: Dict[str, tuple] = {
    "preset-sfm": ({"preset": "sfm"}, None, None, None),
    "preset-paper": ({"preset": "paper"}, None, None, None),
    "default": ({}, False, 1.0, False),
    "subpixel": ({"subpixel": True}, False, 1.0, False),
    "refine": ({}, True, 1.0, False),
    "refine-int8": ({}, True, 1.0, True),
    "refine-x2-int8": ({}, True, 2.0, True),
    "subpixel+refine": ({"subpixel": True}, True, 1.0, False),
    "descriptor": ({"subpixel": "descriptor"}, False, 1.0, False),
    "descriptor+refine": ({"subpixel": "descriptor"}, True, 1.0, False),
    "descriptor+refine-int8": ({"subpixel": "descriptor"}, True, 1.0, True),
    "descriptor+refine-x2": ({"subpixel": "descriptor"}, True, 2.0, False),
    "descriptor+refine-x2-int8": ({"subpixel": "descriptor"}, True, 2.0, True),
    "descriptor+refine-x2.5-int8": ({"subpixel": "descriptor"}, True, 2.5, True),
    "unique": ({"unique_radius": 1.0}, False, 1.0, False),
    "unique+refine": ({"unique_radius": 1.0}, True, 1.0, False),
    "subpixel+unique+refine": ({"subpixel": True, "unique_radius": 1.0}, True, 1.0, False),
}

def largest(models: Dict[int, Any]) -> Any:
    return max(models.values(), key=lambda model: model.num_reg_images()) if models else None


def sift(images: Path, work: Path, repeats: int) -> dict:
    """COLMAP's SIFT pipeline, as its own tutorial runs it through pycolmap."""
    pycolmap = import_pycolmap()
    folder = work / "sift"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    database = folder / "database.db"
    seconds = {}
    start = time.perf_counter()
    pycolmap.extract_features(database, images)
    seconds["extract"] = time.perf_counter() - start
    start = time.perf_counter()
    pycolmap.match_exhaustive(database)
    seconds["match+verify"] = time.perf_counter() - start
    runs = []
    for k in range(repeats):
        start = time.perf_counter()
        model = largest(pycolmap.incremental_mapping(database, images, folder / f"sparse{k}"))
        runs.append((model, time.perf_counter() - start))
    return {"runs": runs, "seconds": seconds}


def r2d2(name: str, images: Path, work: Path, repeats: int, shared: Dict[str, Path]) -> dict:
    options, refine, upsample, int8 = CONFIGS[name]
    key = ",".join(f"{k}={v}" for k, v in sorted(options.items())) or "paper"
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    if refine is None:  # a preset as the command runs it: from scratch, empty cache
        shutil.rmtree(folder)
        cache = work / f"{name}-cache"
        shutil.rmtree(cache, ignore_errors=True)
        previous = os.environ.get("CV2R2D2_CACHE_DIR")
        os.environ["CV2R2D2_CACHE_DIR"] = str(cache)
        try:
            start = time.perf_counter()
            result = reconstruct(images, folder, preset=options["preset"])
            total = time.perf_counter() - start
        finally:
            if previous is None:
                os.environ.pop("CV2R2D2_CACHE_DIR")
            else:
                os.environ["CV2R2D2_CACHE_DIR"] = previous
        return _report(result, dict(result.seconds, total=total), images, folder, repeats)
    if key in shared:
        # Same extraction settings: reuse the features and matches (reconstruct skips both).
        for file in ("features.h5", "matches.h5"):
            if not (folder / file).exists():
                shutil.copyfile(shared[key] / file, folder / file)
    # Timed afresh: an earlier run's refined keypoints are not reused.
    (folder / "refined_keypoints.npz").unlink(missing_ok=True)
    feature = cv2r2d2.R2D2Feature.create(**options)
    refiner = cv2r2d2.R2D2Feature.create(**options, precision="int8") if int8 else None
    params = RefinementParams.upsampled(upsample) if upsample != 1 else None
    result = reconstruct(images, folder, feature=feature,
                         refinement=RefinementOptions(refine, params, refiner))
    seconds = dict(result.seconds)
    if key in shared:
        seconds.update({stage: shared[key + ":" + stage] for stage in ("extract", "match")})
    else:
        shared[key] = folder
        shared.update({key + ":" + stage: seconds[stage] for stage in ("extract", "match")})
    return _report(result, seconds, images, folder, repeats)


def _report(result: Any, seconds: Dict[str, float], images: Path, folder: Path,
            repeats: int) -> dict:
    """The mapping runs of a reconstruction (its own and ``repeats - 1`` more of its
    database) with its stage times."""
    runs = [(result.reconstruction, seconds.pop("map", 0.0))]
    for k in range(1, repeats):
        start = time.perf_counter()
        found = incremental_mapping(result.database, images, folder / f"sparse{k}")
        runs.append((found[0][1] if found else None, time.perf_counter() - start))
    report = {"runs": runs, "seconds": seconds, "verified": result.num_verified_pairs,
              "pairs": result.num_pairs}
    if result.refinement is not None:
        report["refinement"] = result.refinement
    return report


def scene_radius(model: Any) -> float:
    """Median distance of the cameras from the scene's centre (the 3-D points' median)."""
    centre = np.median(np.array([point.xyz for point in model.points3D.values()]), axis=0)
    cameras = np.array([image.projection_center() for image in model.images.values()
                        if image.has_pose])
    return float(np.median(np.linalg.norm(cameras - centre, axis=1)))


def rotation_angle(rotation: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))


def agreement(model: Any, reference: Any) -> Optional[tuple]:
    """Median camera-centre error (% of the reference's scene radius) and rotation error
    (degrees) of ``model`` against ``reference`` after a similarity fit of the centres."""
    pycolmap = import_pycolmap()
    ours = {image.name: image for image in model.images.values() if image.has_pose}
    theirs = {image.name: image for image in reference.images.values() if image.has_pose}
    names = sorted(set(ours) & set(theirs))
    if len(names) < 3:
        return None
    source = np.array([ours[n].projection_center() for n in names])
    target = np.array([theirs[n].projection_center() for n in names])
    fit = pycolmap.estimate_sim3d(source, target)
    centres = np.linalg.norm(np.array([fit * point for point in source]) - target, axis=1)
    rotation = fit.rotation.matrix()
    angles = [rotation_angle(theirs[n].cam_from_world().rotation.matrix()
                             @ (ours[n].cam_from_world().rotation.matrix() @ rotation.T).T)
              for n in names]
    return 100 * float(np.median(centres)) / scene_radius(reference), float(np.median(angles))


def figures(runs: List[tuple], reference: Any) -> dict:
    """Median over the mapping runs of each figure."""
    rows = []
    for model, seconds in runs:
        if model is None:
            rows.append({"registered": 0, "points": 0, "track": 0.0, "error": float("nan"),
                         "centre": float("nan"), "rotation": float("nan"), "map": seconds})
            continue
        agree = agreement(model, reference) if reference is not None else None
        rows.append({
            "registered": model.num_reg_images(), "points": model.num_points3D(),
            "track": model.compute_mean_track_length(),
            "error": model.compute_mean_reprojection_error(),
            "centre": agree[0] if agree else float("nan"),
            "rotation": agree[1] if agree else float("nan"), "map": seconds,
        })
    return {key: float(np.median([row[key] for row in rows])) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--work", type=Path, default=Path("bench_sfm"),
                        help="working folder (kept: a rerun reuses extractions)")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=1, help="mapping runs per database")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = [n for n in args.configs.split(",") if n]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; known: {', '.join(CONFIGS)}")
    print(f"{len(os.listdir(args.images))} images in {args.images}; repeats {args.repeats}")
    reports = {"sift": sift(args.images, args.work, args.repeats)}
    reference = reports["sift"]["runs"][0][0]
    shared: Dict[str, Any] = {}
    for name in names:
        reports[name] = r2d2(name, args.images, args.work, args.repeats, shared)
    print("\n| pipeline | registered | 3-D points | track length | reprojection error | "
          "centres (% radius) | rotation (deg) | time per stage (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, report in reports.items():
        row = figures(report["runs"], reference)
        stages = dict(report["seconds"], map=row["map"])
        times = ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in stages.items()
                          if stage != "database")
        print(f"| {name} | {row['registered']:.0f} | {row['points']:.0f} | {row['track']:.2f} | "
              f"{row['error']:.3f} px | {row['centre']:.2f} | {row['rotation']:.3f} | {times} |")
    print()
    for name, report in reports.items():
        if "refinement" in report:
            r = report["refinement"]
            ratio = report["seconds"]["refine"] / report["seconds"]["extract"]
            print(f"{name}: {r.num_observations} keypoints in {r.num_tracks} tracks refined, "
                  f"median move {r.median_displacement:.2f} px, {r.num_conflicts} conflicting "
                  f"matches, windows {r.window_bytes / 2**20:.0f} MB; refine / extract "
                  f"{ratio:.2f} (network {r.seconds['network']:.0f} s, adjust "
                  f"{r.seconds['adjust']:.1f} s)")
        if "verified" in report:
            print(f"{name}: {report['verified']} of {report['pairs']} pairs verified")


if __name__ == "__main__":
    main()
