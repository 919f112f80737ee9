"""Lowe's ratio test on real photos: SIFT against R2D2, with and without ``unique_radius``.

    python benchmarks/bench_ratio.py --work /tmp/bench_ratio [--nfeatures 1000] [--images 4]

The ground truth is COLMAP's own SIFT model of ../shared/images/sacre_coeur (pycolmap's
extract_features, match_exhaustive, incremental_mapping, as in bench_sfm.py): on every
pair of the first ``--images`` photos (by name) a match is correct when both of its
points lie within 3 px of the epipolar line of the other (the model's cameras). Printed
per method: matches and correct matches, summed over the pairs, of OpenCV's two
recipes, cross-checked nearest neighbours and knnMatch(k=2) with Lowe's ratio 0.75.
The model comes from SIFT's own matches, which favours SIFT slightly.
"""
from __future__ import annotations

import argparse
import itertools
import logging
from pathlib import Path
from typing import Any, Dict

import cv2
import numpy as np

import cv2r2d2
from bench_sfm import IMAGES, sift

RATIO = 0.75
MAX_ERROR = 3.0


def fundamental(model: Any, name_a: str, name_b: str) -> np.ndarray:
    """(3, 3) F with x_b^T F x_a = 0 for COLMAP pixel coordinates of images a and b."""
    images = {image.name: image for image in model.images.values()}
    a, b = images[name_a], images[name_b]
    k_a = model.cameras[a.camera_id].calibration_matrix()
    k_b = model.cameras[b.camera_id].calibration_matrix()
    pose_a, pose_b = a.cam_from_world().matrix(), b.cam_from_world().matrix()
    rotation = pose_b[:, :3] @ pose_a[:, :3].T
    t = pose_b[:, 3] - rotation @ pose_a[:, 3]
    cross = np.array([[0, -t[2], t[1]], [t[2], 0, -t[0]], [-t[1], t[0], 0]])
    return np.linalg.inv(k_b).T @ cross @ rotation @ np.linalg.inv(k_a)


def epipolar_correct(points_a: np.ndarray, points_b: np.ndarray, f: np.ndarray) -> int:
    """Matches (OpenCV pixels) whose points both lie within MAX_ERROR px of the other's
    epipolar line."""
    if len(points_a) == 0:
        return 0
    # COLMAP puts the top-left pixel's centre at (0.5, 0.5), OpenCV at (0, 0).
    x_a = np.c_[points_a + 0.5, np.ones(len(points_a))]
    x_b = np.c_[points_b + 0.5, np.ones(len(points_b))]
    lines_b, lines_a = x_a @ f.T, x_b @ f
    d_b = np.abs((lines_b * x_b).sum(axis=1)) / np.hypot(lines_b[:, 0], lines_b[:, 1])
    d_a = np.abs((lines_a * x_a).sum(axis=1)) / np.hypot(lines_a[:, 0], lines_a[:, 1])
    return int((np.maximum(d_a, d_b) <= MAX_ERROR).sum())


def recipes(norm: int, d_a: np.ndarray, d_b: np.ndarray) -> Dict[str, list]:
    """The matches of OpenCV's two recipes, as (queryIdx, trainIdx) lists."""
    cross = cv2.BFMatcher(norm, crossCheck=True).match(d_a, d_b)
    knn = cv2.BFMatcher(norm).knnMatch(d_a, d_b, k=2)
    ratio = [m for m, n in (pair for pair in knn if len(pair) == 2) if m.distance < RATIO * n.distance]
    return {"cross-check": [(m.queryIdx, m.trainIdx) for m in cross],
            f"ratio {RATIO}": [(m.queryIdx, m.trainIdx) for m in ratio]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("bench_ratio"),
                        help="working folder of the SIFT model")
    parser.add_argument("--nfeatures", type=int, default=1000)
    parser.add_argument("--images", type=int, default=4, help="photos used (all pairs)")
    args = parser.parse_args()
    if args.images < 2:
        parser.error("--images must be at least 2")
    logging.basicConfig(level=logging.WARNING)
    model = sift(IMAGES, args.work, 1)["runs"][0][0]
    if model is None:
        raise SystemExit("COLMAP's SIFT pipeline reconstructed nothing")
    names = sorted(image.name for image in model.images.values() if image.has_pose)[:args.images]
    methods = {
        f"cv2.SIFT({args.nfeatures})": cv2.SIFT_create(args.nfeatures),
        f"R2D2({args.nfeatures})": cv2r2d2.R2D2_create(args.nfeatures, device="cpu"),
        f"R2D2({args.nfeatures}, unique_radius=2)": cv2r2d2.R2D2_create(
            args.nfeatures, device="cpu", unique_radius=2),
    }
    print(f"{len(names) * (len(names) - 1) // 2} pairs of {', '.join(names)}; correct: within "
          f"{MAX_ERROR:g} px of the SIFT model's epipolar lines")
    print("| method | recipe | matches | correct |\n| --- | --- | --- | --- |")
    for method, feature in methods.items():
        features = {}
        for name in names:
            keypoints, descriptors = feature.detectAndCompute(cv2.imread(str(IMAGES / name)), None)
            features[name] = (cv2.KeyPoint_convert(keypoints).reshape(-1, 2), descriptors)
        totals: Dict[str, list] = {}
        for a, b in itertools.combinations(names, 2):
            (xy_a, d_a), (xy_b, d_b) = features[a], features[b]
            f = fundamental(model, a, b)
            for recipe, matches in recipes(feature.defaultNorm(), d_a, d_b).items():
                pairs = np.array(matches, np.int64).reshape(-1, 2)
                total = totals.setdefault(recipe, [0, 0])
                total[0] += len(pairs)
                total[1] += epipolar_correct(xy_a[pairs[:, 0]], xy_b[pairs[:, 1]], f)
        for recipe, (count, correct) in totals.items():
            print(f"| {method} | {recipe} | {count} | {correct} |", flush=True)


if __name__ == "__main__":
    main()
