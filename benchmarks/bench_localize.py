"""Localisation, leave one out: each Sacre-Coeur photo against a model of the nine others.

On ../shared/images/sacre_coeur (10 photos), with one preset (``--preset``, default ``sfm``,
the settings ``cv2r2d2 sfm`` uses):

1. the reference: :func:`cv2r2d2.sfm.reconstruct` of all ten photos;
2. for each photo in turn, a model of the nine others (:func:`reconstruct` on a folder of
   links to them, its ``features.h5`` the nine photos' features copied from the reference
   run and its ``matches.h5`` the reference's, so that nothing is extracted or matched
   again: the database, the verification, the preset's keypoint refinement and the mapping
   are redone), and the tenth localised against it with :func:`cv2r2d2.localization.localize`
   (its features extracted afresh, as a new photo's would be). When COLMAP's mapper leaves photos out of the nine-photo model (its initial pair decides
   that on such a small collection), the same database is mapped again with another
   minimum triangulation angle of the initial pair (8, then 25 degrees; COLMAP's default
   is 16), and the most complete model is kept: localisation needs a model of the scene;
3. the localised pose set against the photo's pose in the reference: the nine-photo model
   is aligned to the reference by a similarity fit of the nine shared camera centres; the
   centre error is in % of the reference's scene radius (the median distance of its
   cameras from the median of its 3-D points, as benchmarks/bench_sfm.py), the rotation
   error in degrees.

Printed per photo: inliers / 2D-3D correspondences, centre and rotation errors, the
rotation error again with the rotation between the frames fitted to the nine cameras'
orientations too (the chordal mean of their relative rotations; the centres alone leave it
less certain), the nine-photo model's own camera agreement with the reference (median, same
units: what the models themselves differ by), and the times. The issue's target: every photo localised,
centre within 1% of the scene radius and rotation within 0.5 degrees.

    python benchmarks/bench_localize.py --work /tmp/bench_localize [--preset sfm]

The working folder is kept: a rerun reuses the extraction, the matches and the
refinements. Expect about 2 minutes per photo on 2 cores with the sfm preset (its
keypoint refinement dominates), less with ``--preset accurate`` (the same extraction,
no refinement).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from bench_sfm import agreement, rotation_angle, scene_radius
from cv2r2d2.colmap import import_pycolmap, incremental_mapping
from cv2r2d2.config import R2D2Config
from cv2r2d2.feature2d import R2D2Feature
from cv2r2d2.image import list_images
from cv2r2d2.localization import localize
from cv2r2d2.presets import SFM_PRESET, preset_names
from cv2r2d2.queries import QueryResult, write_results
from cv2r2d2.sfm import reconstruct
from cv2r2d2.stores import H5Features

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images" / "sacre_coeur"
# COLMAP's default is 16 degrees; tried in turn on a model that left photos out.
INIT_MIN_TRI_ANGLES = (8.0, 25.0)
FOREIGN = [IMAGES.parent / "sceaux_castle" / "100_7100.JPG",
           IMAGES.parent / "monstree" / "IMG_1025.JPG"]


def leave_out(images: Dict[str, Path], left: str, reference: Path, folder: Path) -> Path:
    """A folder of links to every photo but ``left``, and an output folder holding their
    features and the reference's matches; returns the photos' folder."""
    photos = folder / "images"
    photos.mkdir(parents=True, exist_ok=True)
    for name, path in images.items():
        link = photos / name
        if name != left and not link.exists():
            link.symlink_to(path.resolve())
    output = folder / "model"
    output.mkdir(exist_ok=True)
    if not (output / "features.h5").exists():
        with H5Features(reference / "features.h5") as source, \
                H5Features(output / "features.h5.part", writable=True) as target:
            target.set_settings(source.settings())
            for name in images:
                if name != left:
                    target.write(name, source.read(name))
        os.replace(output / "features.h5.part", output / "features.h5")
    if not (output / "matches.h5").exists():
        (output / "matches.h5").write_bytes((reference / "matches.h5").read_bytes())
    return photos


def remap(built: Any, photos: Path, wanted: int) -> str:
    """Map the database of an incomplete model again with other initial-pair settings
    (COLMAP's choice of initial pair decides whether a small collection is reconstructed
    whole), keeping the most complete model in ``built.model``'s place; says what it did."""
    registered = {"default": built.num_registered}
    for angle in INIT_MIN_TRI_ANGLES:
        work = built.model.parent.parent / f"sparse_tri{angle:g}"
        models = incremental_mapping(built.database, photos, work, mapper_options={
            "mapper": {"init_min_tri_angle": angle}})
        best = models[0][1] if models else None
        registered[f"init_min_tri_angle {angle:g}"] = best.num_reg_images() if best else 0
        if best is not None and best.num_reg_images() > built.num_registered:
            shutil.rmtree(built.model.parent)
            built.model.mkdir(parents=True)
            best.write(os.fspath(built.model))
            built.reconstruction, built.num_registered = best, best.num_reg_images()
        shutil.rmtree(work, ignore_errors=True)
        if built.num_registered >= wanted:
            break
    return ", ".join(f"{k}: {v}" for k, v in registered.items())


def errors(result: QueryResult, model: Any, reference: Any) -> Dict[str, float]:
    """Centre error (% of the reference's scene radius) and rotation error (degrees) of a
    query localised in ``model``, against its pose in ``reference``."""
    pycolmap = import_pycolmap()
    ours = {image.name: image for image in model.images.values() if image.has_pose}
    theirs = {image.name: image for image in reference.images.values() if image.has_pose}
    names = sorted(set(ours) & set(theirs))
    fit = pycolmap.estimate_sim3d(np.array([ours[n].projection_center() for n in names]),
                                  np.array([theirs[n].projection_center() for n in names]))
    true = theirs[result.name]
    true_rotation = true.cam_from_world().rotation.matrix()
    centre = np.linalg.norm(fit * result.projection_center() - true.projection_center())
    rotation = result.rotation() @ fit.rotation.matrix().T
    # The rotation between the frames also from the cameras' orientations (the chordal
    # mean of R_reference^T R_model over the shared cameras), not from their centres only.
    u, _, vt = np.linalg.svd(sum(theirs[n].cam_from_world().rotation.matrix().T
                                 @ ours[n].cam_from_world().rotation.matrix() for n in names))
    mean = u @ np.diag([1, 1, np.linalg.det(u @ vt)]) @ vt
    models = [rotation_angle(theirs[n].cam_from_world().rotation.matrix()
                             @ (ours[n].cam_from_world().rotation.matrix() @ mean.T).T)
              for n in names]
    return {"centre": 100 * float(centre) / scene_radius(reference),
            "rotation": rotation_angle(true_rotation @ rotation.T),
            "rotation (orientations)": rotation_angle(
                true_rotation @ (result.rotation() @ mean.T).T),
            "models rotation (orientations)": float(np.median(models))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--work", type=Path, default=Path("bench_localize"),
                        help="working folder (kept: a rerun reuses extraction and matches)")
    parser.add_argument("--preset", default=SFM_PRESET, choices=preset_names(),
                        help="the settings of the models and the queries (default: %(default)s)")
    parser.add_argument("--only", default=None,
                        help="comma-separated photo names to leave out (default: each; '': "
                             "none)")
    parser.add_argument("--foreign", nargs="*", type=Path, default=FOREIGN,
                        help="photos of other scenes, localised against the ten-photo model "
                             "(they must not be; default: a photo of each other scene)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in ("cv2r2d2.weights", "cv2r2d2.retrieval"):
        logging.getLogger(name).setLevel(logging.WARNING)
    pycolmap = import_pycolmap()
    images = dict(list_images([args.images]))
    feature = R2D2Feature(R2D2Config.from_arguments(preset=args.preset, device="cpu"))
    print(f"{len(images)} photos in {args.images}; preset {args.preset}; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    start = time.perf_counter()
    full = reconstruct(args.images, args.work / "full", feature=feature, preset=args.preset)
    reference = full.reconstruction
    print(f"reference: {full.num_registered} / {len(images)} registered, "
          f"{full.num_points3D} points, scene radius {scene_radius(reference):.3f}; "
          + ", ".join(f"{k} {v:.0f} s" for k, v in full.seconds.items())
          + f" ({time.perf_counter() - start:.0f} s)")
    left_out = list(images) if args.only is None else [n for n in args.only.split(",") if n]
    rows: List[Dict[str, Any]] = []
    for left in left_out:
        folder = args.work / "leave_out" / Path(left).stem
        photos = leave_out(images, left, args.work / "full", folder)
        start = time.perf_counter()
        built = reconstruct(photos, folder / "model", feature=feature, preset=args.preset)
        row: Dict[str, Any] = {"name": left, "stages": built.seconds}
        if built.reconstruction is not None and built.num_registered < len(images) - 1:
            row["remapped"] = remap(built, photos, len(images) - 1)
        row["registered"] = built.num_registered
        row["model"] = time.perf_counter() - start
        if built.reconstruction is None or left not in {
                i.name for i in reference.images.values() if i.has_pose}:
            row["failure"] = built.failure or "not in the reference model"
            rows.append(row)
            continue
        row["models agree"] = agreement(built.reconstruction, reference)
        start = time.perf_counter()
        result, = localize(folder / "model", images[left], feature=feature, device="cpu")
        row["localize"] = time.perf_counter() - start
        row["result"] = result
        write_results(folder / "results.txt", [result])
        if result.success:
            model = pycolmap.Reconstruction(os.fspath(built.model))
            row.update(errors(result, model, reference))
        rows.append(row)
        print(_line(row), flush=True)
    for row in rows:
        if "remapped" in row:
            print(f"{row['name']}: COLMAP's model of the nine others registered too few; "
                  f"mapped again: {row['remapped']} registered")
    print("\n| left out | model registered | localised | inliers / corr. | centre (% radius) | "
          "rotation (deg) | rotation, orientations aligned (deg) | 9-photo model vs "
          "reference: centres %, rotation deg, rotation orientations aligned | model s | "
          "localise s (extract, match, pose) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(_line(row))
    if args.foreign:
        print("\nphotos of other scenes against the ten-photo model:")
        for result in localize(args.work / "full", args.foreign, feature=feature, device="cpu"):
            print(f"  {result.name}: {'localised' if result.success else 'not localised'}, "
                  f"{result.num_inliers} inliers of {result.num_correspondences} "
                  f"correspondences{'' if result.success else ' (' + str(result.reason) + ')'}")
    done = [row for row in rows if "result" in row]
    localised = [row for row in done if row["result"].success]
    if localised:
        centres = [row["centre"] for row in localised]
        angles = [row["rotation"] for row in localised]
        aligned = [row["rotation (orientations)"] for row in localised]
        print(f"\nlocalised {len(localised)} / {len(rows)}; centre error median "
              f"{np.median(centres):.3f}% max {max(centres):.3f}% of the scene radius; "
              f"rotation error median {np.median(angles):.3f} max {max(angles):.3f} deg "
              f"(orientations aligned: median {np.median(aligned):.3f} max "
              f"{max(aligned):.3f} deg); target: all localised, < 1%, < 0.5 deg")


def _line(row: Dict[str, Any]) -> str:
    if "result" not in row:
        return f"| {row['name']} | {row['registered']} | model failed: {row.get('failure')} |"
    result = row["result"]
    agree = row.get("models agree") or (float("nan"), float("nan"))
    nan = float("nan")
    pose = (f"{row['centre']:.3f} | {row['rotation']:.3f} | "
            f"{row['rotation (orientations)']:.3f}" if result.success
            else f"- | - | - ({result.reason})")
    seconds = ", ".join(f"{result.seconds.get(stage, nan):.1f}"
                        for stage in ("extract", "match", "pose"))
    return (f"| {row['name']} | {row['registered']} | {'yes' if result.success else 'no'} | "
            f"{result.num_inliers} / {result.num_correspondences} | {pose} | "
            f"{agree[0]:.3f}, {agree[1]:.3f}, {row.get('models rotation (orientations)', nan):.3f}"
            f" | {row['model']:.0f} | {row['localize']:.1f} ({seconds}) |")


if __name__ == "__main__":
    main()
