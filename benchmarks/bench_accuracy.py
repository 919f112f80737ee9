"""Localisation accuracy of R2D2's settings against cv2.SIFT.

    python benchmarks/bench_accuracy.py [--per-image 5] [--threads 2] [--nfeatures 5000]
        [--methods ...]

On homography pairs made from ../shared/images (benchmarks/homography_pairs.py: per
image and kind, ``--per-image`` viewpoint and illumination pairs), prints for each
method (and for ``subpixel=True`` followed by ``refineMatches`` on image b) the mean
matching accuracy at 1..10 px of mutual nearest-neighbour matches
(overall, illumination, viewpoint), keypoints and matches per pair, the fraction of
pairs whose homography cv2.findHomography (RANSAC, 3 px) recovers with a mean corner
error <= 3 px, the correct matches (<= 3 px) that OpenCV's ratio-test recipe keeps
(``BFMatcher.knnMatch(k=2)``, Lowe's ratio 0.75), and the extraction time of each method
against the default (median over images of the per-image ratio, runs interleaved).
Methods (``--methods``): ``default``, ``subpixel`` (``subpixel=True``), ``descriptor``
(``subpixel="descriptor"``), ``unique`` (``unique_radius=UNIQUE_RADIUS``), ``sift``.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Callable, Dict, List, Tuple

import cv2
import numpy as np
import torch

import cv2r2d2
from cv2r2d2.evaluation import PairData, mean_matching_accuracy, project
from cv2r2d2.matching import mutual_nearest_neighbours
from homography_pairs import by_image, make_pairs

THRESHOLDS = tuple(range(1, 11))
DEFAULT = "R2D2 default"
REFINED_FROM = "R2D2 subpixel=True"
REFINED = "R2D2 subpixel=True + refineMatches"
KINDS = ("overall", "illumination", "viewpoint")
RATIO = 0.75
UNIQUE_RADIUS = 2.0
# --methods name: (printed name, factory of nfeatures)
METHODS: Dict[str, Tuple[str, Callable[[int], Any]]] = {
    "default": (DEFAULT, lambda n: cv2r2d2.R2D2_create(n, device="cpu")),
    "subpixel": (REFINED_FROM, lambda n: cv2r2d2.R2D2_create(n, device="cpu", subpixel=True)),
    "descriptor": ('R2D2 subpixel="descriptor"',
                   lambda n: cv2r2d2.R2D2_create(n, device="cpu", subpixel="descriptor")),
    "unique": (f"R2D2 unique_radius={UNIQUE_RADIUS:g}",
               lambda n: cv2r2d2.R2D2_create(n, device="cpu", unique_radius=UNIQUE_RADIUS)),
    "sift": ("cv2.SIFT", lambda n: cv2.SIFT_create(n)),
}


def detect(feature: Any, image: np.ndarray) -> Tuple[tuple, np.ndarray, float]:
    start = time.perf_counter()
    keypoints, descriptors = feature.detectAndCompute(image, None)
    return keypoints, descriptors, time.perf_counter() - start


def homography_correct(pair: PairData, max_corner_error: float = 3.0) -> bool:
    if len(pair.matches) < 4:
        return False
    estimate, _ = cv2.findHomography(pair.keypoints_a[pair.matches[:, 0]],
                                     pair.keypoints_b[pair.matches[:, 1]], cv2.RANSAC, 3.0)
    if estimate is None:
        return False
    w, h = pair.size_a
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    error = np.linalg.norm(project(corners, estimate) - project(corners, pair.homography), axis=1)
    return bool(error.mean() <= max_corner_error)


def ratio_test_correct(xy_a: np.ndarray, desc_a: np.ndarray, xy_b: np.ndarray,
                       desc_b: np.ndarray, homography: np.ndarray, norm: int,
                       max_error: float = 3.0) -> int:
    """Correct matches (<= max_error px) kept by knnMatch(k=2) and Lowe's ratio test."""
    if len(desc_a) < 2 or len(desc_b) < 2:
        return 0
    knn = cv2.BFMatcher(norm).knnMatch(desc_a, desc_b, k=2)
    good = np.array([(m.queryIdx, m.trainIdx) for m, n in knn if m.distance < RATIO * n.distance],
                    np.int64).reshape(-1, 2)
    error = np.linalg.norm(project(xy_a[good[:, 0]], homography) - xy_b[good[:, 1]], axis=1)
    return int((error <= max_error).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-image", type=int, default=5, help="pairs per image and kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--nfeatures", type=int, default=5000,
                        help="keypoints per image, every method (default: %(default)s)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, of {', '.join(METHODS)} (default: all)")
    args = parser.parse_args()
    chosen_methods = ["default"] + [m for m in args.methods.split(",") if m and m != "default"]
    unknown = [m for m in chosen_methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)

    methods: Dict[str, Any] = {METHODS[m][0]: METHODS[m][1](args.nfeatures)
                              for m in chosen_methods}
    pairs = make_pairs(args.per_image)
    rows: Dict[str, List[Tuple[str, np.ndarray, bool, int, int, int]]] = {
        m: [] for m in [*methods, *([REFINED] if REFINED_FROM in methods else [])]}
    seconds: Dict[str, List[float]] = {m: [] for m in methods}
    refine_seconds = []
    for image_a, group in by_image(pairs):
        images = [image_a] + [pair.image_b for pair in group]
        detected: Dict[str, list] = {m: [] for m in methods}
        for image in images:
            for name, feature in methods.items():
                detected[name].append(detect(feature, image))
                seconds[name].append(detected[name][-1][2])
        for name, feature in methods.items():
            kp_a, desc_a, _ = detected[name][0]
            xy_a = cv2.KeyPoint_convert(kp_a).reshape(-1, 2)
            for pair, (kp_b, desc_b, _) in zip(group, detected[name][1:]):
                xy_b = cv2.KeyPoint_convert(kp_b).reshape(-1, 2)
                matches, _ = mutual_nearest_neighbours(desc_a, desc_b, feature.defaultNorm())
                variants = {name: (xy_a, xy_b, matches)}
                if name == REFINED_FROM:
                    start = time.perf_counter()
                    moved = feature.refineMatches(pair.image_b, desc_a, kp_b, matches)
                    refine_seconds.append(time.perf_counter() - start)
                    # One point per match: the refined positions replace image b's.
                    variants[REFINED] = (xy_a, moved, np.c_[matches[:, 0], np.arange(len(moved))])
                ratio_correct = ratio_test_correct(xy_a, desc_a, xy_b, desc_b, pair.homography,
                                                   feature.defaultNorm())
                for variant, (p_a, p_b, m) in variants.items():
                    data = PairData(p_a, p_b, m, pair.homography,
                                    image_a.shape[1::-1], pair.image_b.shape[1::-1])
                    rows[variant].append((pair.kind, mean_matching_accuracy(data, THRESHOLDS),
                                          homography_correct(data), (len(kp_a) + len(kp_b)) // 2,
                                          len(m), ratio_correct))
        print(f"{group[0].name}: {len(group)} pairs done", flush=True)

    n_kinds = {kind: sum(p.kind == kind for p in pairs) for kind in KINDS[1:]}
    print(f"\n{len(pairs)} pairs ({n_kinds['viewpoint']} viewpoint, {n_kinds['illumination']} "
          f"illumination) from {', '.join(sorted({p.name for p in pairs}))}; "
          f"nfeatures {args.nfeatures}")
    print("| method | pairs | " + " | ".join(f"MMA@{t}" for t in THRESHOLDS)
          + f" | homography correct | keypoints | matches | correct after ratio {RATIO} |")
    print("| --- " * (len(THRESHOLDS) + 7) + "|")
    for kind in KINDS:
        for name, method_rows in rows.items():
            chosen = [r for r in method_rows if kind == "overall" or r[0] == kind]
            mma = np.mean([r[1] for r in chosen], axis=0)
            print(f"| {name} | {kind} | " + " | ".join(f"{v:.3f}" for v in mma)
                  + f" | {np.mean([r[2] for r in chosen]):.2f} | {np.mean([r[3] for r in chosen]):.0f}"
                  f" | {np.mean([r[4] for r in chosen]):.0f} | {np.mean([r[5] for r in chosen]):.0f} |")
    print()
    for name in methods:
        ratio = np.median(np.array(seconds[name]) / np.array(seconds[DEFAULT]))
        print(f"extraction time, {name} / default: {ratio:.3f} "
              f"(median over {len(seconds[name])} images, interleaved runs)")
    if refine_seconds:
        print(f"refineMatches on image b / its subpixel extraction: "
              f"{np.median(refine_seconds) / np.median(seconds[REFINED_FROM]):.2f} (medians)")


if __name__ == "__main__":
    main()
