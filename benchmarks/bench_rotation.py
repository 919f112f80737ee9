"""Rotation robustness: R2D2 plain, R2D2 with steerers (rotations 4, 8, 12, 16), cv2.SIFT.

    python benchmarks/bench_rotation.py [--images brooklyn.png ...] [--max-side 480]
        [--step 10] [--viewpoint-per-image 2] [--plot docs/rotation_mma.png]

Each image (from ../shared/images, scaled to at most --max-side px) is rotated about its
centre by 0, 10, ..., 350 degrees on an enlarged canvas (quarter turns exactly, with
cv2.rotate), the ground truth being the rotation's homography. Every image is extracted
once (R2D2 at the paper's settings, SIFT with 5000 keypoints) and matched with each
method:

- R2D2 plain: mutual nearest neighbours (cv2.BFMatcher(crossCheck=True)'s pairs);
- R2D2 steered, rotations N: the rotation estimated by the most mutual matches among
  the N steering angles (the best-scoring 1024 descriptors of each image vote), then
  mutual nearest neighbours under it (cv2r2d2.matching.match_rotated); N = 16 steps by
  22.5 degrees (not a divisor of 360, so not a `rotations=` value: built from fitted
  steerers); "12, all vote" lets every descriptor vote;
- SIFT(5000): mutual nearest neighbours of its descriptors.

Printed: per method MMA@1 and MMA@3 (share of matches within 1 / 3 px of the truth),
matches per pair, the fraction of pairs whose homography cv2.findHomography (RANSAC,
3 px) recovers with a mean corner error <= 3 px, how often the estimated rotation is the
steering angle nearest the truth (within one step), and the matching time against plain
(median over pairs of the per-pair ratio); per angle MMA@3 (also drawn into --plot);
the steerers' fitting time; the viewpoint pairs of bench_accuracy.py (rotation up to 30
degrees, scale, tilt) with and without steering; and on a full-size image (--cost-image,
paper settings) the time of matching with rotations=12 against one extraction.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import cv2
import numpy as np
import torch

import cv2r2d2
from bench_accuracy import homography_correct
from cv2r2d2.evaluation import PairData, mean_matching_accuracy
from cv2r2d2.matching import match_rotated, mutual_nearest_neighbours
from cv2r2d2.steerer_fitting import fit_steerers, rotate_image
from cv2r2d2.steerers import DEFAULT_ROTATIONS, rotation_angles
from homography_pairs import IMAGES, load, make_pairs

THRESHOLDS = (1, 3)
PLAIN, SIFT = "R2D2 plain", "cv2.SIFT(5000)"
# method -> (steering angles, descriptors voting per image: None = all)
STEERED = {
    "R2D2 steered, rotations 4": (rotation_angles(4), 1024),
    "R2D2 steered, rotations 8": (rotation_angles(8), 1024),
    "R2D2 steered, rotations 12": (rotation_angles(12), 1024),
    "R2D2 steered, rotations 12, all vote": (rotation_angles(12), None),
    "R2D2 steered, 16 (22.5 deg)": (tuple(k * 22.5 for k in range(16)), 1024),
}


def timed(function: Any, *args: Any, **kwargs: Any) -> Tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def detect(feature: Any, image: np.ndarray) -> Tuple[np.ndarray, np.ndarray, float]:
    (keypoints, descriptors), seconds = timed(feature.detectAndCompute, image, None)
    xy = cv2.KeyPoint_convert(keypoints).reshape(-1, 2) if keypoints else np.zeros((0, 2), np.float32)
    if descriptors is None:
        descriptors = np.zeros((0, feature.descriptorSize()), np.float32)
    return xy, descriptors, seconds


class Extractions:
    """Features of each image, extracted once (and kept in --cache, when given)."""

    def __init__(self, methods: Dict[str, Any], folder: Optional[Path]) -> None:
        self.methods, self.folder, self.seconds = methods, folder, []
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def get(self, key: str, image: np.ndarray) -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
        path = None if self.folder is None else self.folder / f"{key}.npz"
        if path is not None and path.is_file():
            with np.load(path) as data:
                return {m: (data[f"{m}/xy"], data[f"{m}/d"]) for m in self.methods}
        found = {}
        for method, feature in self.methods.items():
            xy, descriptors, seconds = detect(feature, image)
            found[method] = (xy, descriptors)
            if method == "r2d2":
                self.seconds.append(seconds)
        if path is not None:
            np.savez(path, **{f"{m}/{k}": v for m, (xy, d) in found.items()
                              for k, v in (("xy", xy), ("d", d))})
        return found


def evaluate(xy_a: np.ndarray, xy_b: np.ndarray, matches: np.ndarray, homography: np.ndarray,
             size_a: Tuple[int, int], size_b: Tuple[int, int]) -> Dict[str, float]:
    pair = PairData(xy_a, xy_b, matches, homography, size_a, size_b)
    mma = mean_matching_accuracy(pair, THRESHOLDS)
    return {"mma1": float(mma[0]), "mma3": float(mma[1]), "matches": len(matches),
            "homography": float(homography_correct(pair))}


def nearest_step(angle: float, estimate: float, step: float) -> bool:
    """Whether ``estimate`` is within one steering step of the true ``angle``."""
    difference = abs((estimate - angle + 180) % 360 - 180)
    return difference <= step + 1e-6


def match_all(r2d2_a: Tuple[np.ndarray, np.ndarray], r2d2_b: Tuple[np.ndarray, np.ndarray],
              sift_a: Tuple[np.ndarray, np.ndarray], sift_b: Tuple[np.ndarray, np.ndarray],
              matrices: Dict[str, np.ndarray], homography: np.ndarray, size_a: Tuple[int, int],
              size_b: Tuple[int, int], angle: Optional[float]) -> Dict[str, Dict[str, float]]:
    """Every method's metrics on one pair (``angle``: the true rotation, if a pure one)."""
    rows = {}
    (indices, _), plain_seconds = timed(mutual_nearest_neighbours, r2d2_a[1], r2d2_b[1])
    rows[PLAIN] = evaluate(r2d2_a[0], r2d2_b[0], indices, homography, size_a, size_b)
    rows[PLAIN]["time_ratio"] = 1.0
    for method, (angles, estimate_on) in STEERED.items():
        [(indices, _, best)], seconds = timed(match_rotated, [(r2d2_a[1], r2d2_b[1])],
                                             matrices[method], estimate_on=estimate_on)
        rows[method] = evaluate(r2d2_a[0], r2d2_b[0], indices, homography, size_a, size_b)
        rows[method]["time_ratio"] = seconds / plain_seconds
        rows[method]["estimate"] = float(angles[best])
        if angle is not None:
            rows[method]["rotation_found"] = float(nearest_step(angle, angles[best],
                                                                 360 / len(angles)))
    indices, _ = mutual_nearest_neighbours(sift_a[1], sift_b[1])
    rows[SIFT] = evaluate(sift_a[0], sift_b[0], indices, homography, size_a, size_b)
    return rows


def summary(results: List[Dict[str, Dict[str, float]]], title: str) -> None:
    methods = list(results[0])
    print(f"\n{title} ({len(results)} pairs)")
    print("| method | MMA@1 | MMA@3 | min MMA@3 | matches | homography correct | "
          "rotation found | matching time / plain |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for method in methods:
        rows = [r[method] for r in results]
        found = [r["rotation_found"] for r in rows if "rotation_found" in r]
        ratio = [r["time_ratio"] for r in rows if "time_ratio" in r]
        print(f"| {method} | {np.mean([r['mma1'] for r in rows]):.3f} | "
              f"{np.mean([r['mma3'] for r in rows]):.3f} | {np.min([r['mma3'] for r in rows]):.3f} | "
              f"{np.mean([r['matches'] for r in rows]):.0f} | "
              f"{np.mean([r['homography'] for r in rows]):.3f} | "
              + (f"{np.mean(found):.3f}" if found else "-") + " | "
              + (f"{np.median(ratio):.2f}" if ratio else "-") + " |")


def per_angle(results: Dict[float, List[Dict[str, Dict[str, float]]]]) -> Dict[str, List[float]]:
    methods = list(next(iter(results.values()))[0])
    table = {m: [float(np.mean([r[m]["mma3"] for r in results[a]])) for a in results]
             for m in methods}
    print("\nMMA@3 per angle (mean over images); homography correct on every image: *")
    print("| angle | " + " | ".join(methods) + " |")
    print("| --- " * (len(methods) + 1) + "|")
    for i, angle in enumerate(results):
        cells = []
        for m in methods:
            correct = all(r[m]["homography"] for r in results[angle])
            cells.append(f"{table[m][i]:.3f}{'*' if correct else ''}")
        print(f"| {angle:g} | " + " | ".join(cells) + " |")
    return table


def plot(angles: List[float], table: Dict[str, List[float]], path: Path, images: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.8), dpi=80)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for method, values in table.items():
        if "all vote" not in method:
            axes.plot(angles, values, marker="o", markersize=3, linewidth=1.5, label=method)
    axes.set_xlabel("in-plane rotation [degrees]")
    axes.set_ylabel("MMA@3")
    axes.set_title(f"Matching accuracy against rotation ({images} images)")
    axes.set_xlim(0, 360)
    axes.set_xticks(range(0, 361, 30))
    axes.set_ylim(0, 1)
    axes.grid(True)
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")


def fit(r2d2: Any) -> Dict[str, np.ndarray]:
    """The steerers of every method, fitted here (not cached); prints the fitting time."""
    default = rotation_angles(DEFAULT_ROTATIONS)
    steerers, seconds = timed(fit_steerers, r2d2, default, show_progress=False)
    print(f"fitting the default steering set ({len(steerers.angles)} fits for "
          f"{len(default)} angles, every {360 // DEFAULT_ROTATIONS} degrees): {seconds:.1f} s")
    others = sorted({a for angles, _ in STEERED.values() for a in angles} - set(default))
    extra, seconds = timed(fit_steerers, r2d2, others, show_progress=False)
    steerers = steerers.merged(extra)
    print(f"fitting {len(extra.angles)} more for the other sets: {seconds:.1f} s")
    print("mean cosine of corresponding fitting descriptors, unsteered -> steered: "
          + ", ".join(f"{a:g}: {c[0]:.2f} -> {c[1]:.2f}" for a, c in zip(steerers.angles,
                                                                    steerers.cosines)))
    return {m: np.stack([steerers.matrix(a) for a in angles]) for m, (angles, _) in STEERED.items()}


def cost(r2d2: Any, name: str, matrices: np.ndarray) -> None:
    """Matching with rotations=12 against one extraction, on a full-size image."""
    image = cv2.imread(str(IMAGES / name))
    rotated = cv2.rotate(image, cv2.ROTATE_90_COUNTERCLOCKWISE)
    (_, d_a, t_a), (_, d_b, t_b) = detect(r2d2, image), detect(r2d2, rotated)
    plain = [timed(mutual_nearest_neighbours, d_a, d_b)[1] for _ in range(3)]
    steered = [timed(match_rotated, [(d_a, d_b)], matrices)[1] for _ in range(3)]
    extraction = float(np.median([t_a, t_b]))
    print(f"\n{name} ({image.shape[1]} x {image.shape[0]}, paper settings, {len(d_a)} and "
          f"{len(d_b)} keypoints): extraction {extraction:.1f} s (median of 2); matching plain "
          f"{np.median(plain):.2f} s, rotations=12 {np.median(steered):.2f} s (medians of 3) = "
          f"{np.median(steered) / extraction:.3f} of one extraction, "
          f"{np.median(steered) / np.median(plain):.2f}x plain")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", nargs="+",
                        default=["brooklyn.png", "sacre_coeur/03903474_1471484089.jpg"],
                        help="images under ../shared/images")
    parser.add_argument("--max-side", type=int, default=480)
    parser.add_argument("--step", type=int, default=10, help="degrees between rotations")
    parser.add_argument("--viewpoint-per-image", type=int, default=2,
                        help="viewpoint pairs of homography_pairs.py per image (0: none)")
    parser.add_argument("--cost-image", default="brooklyn.png",
                        help="full-size image for the matching cost (empty: skip)")
    parser.add_argument("--plot", default="docs/rotation_mma.png")
    parser.add_argument("--json", default=None, help="write the per-pair results here")
    parser.add_argument("--cache", default=None, help="keep extractions in this folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    r2d2 = cv2r2d2.R2D2_create(device="cpu")
    matrices = fit(r2d2)
    extractions = Extractions({"r2d2": r2d2, "sift": cv2.SIFT_create(5000)},
                              None if args.cache is None else Path(args.cache))
    by_angle: Dict[float, List[Dict[str, Dict[str, float]]]] = {}
    angles = list(range(0, 360, args.step))
    for name in args.images:
        image = load(name, args.max_side)
        size_a = image.shape[1::-1]
        key = f"{Path(name).stem}-{args.max_side}"
        base = extractions.get(f"{key}-0", image)
        for angle in angles:
            rotated, homography = rotate_image(image, angle)
            found = extractions.get(f"{key}-rot{angle}", rotated)
            by_angle.setdefault(angle, []).append(match_all(
                base["r2d2"], found["r2d2"], base["sift"], found["sift"], matrices, homography,
                size_a, rotated.shape[1::-1], angle))
        print(f"{name} {image.shape[1]}x{image.shape[0]}: {len(angles)} rotations done "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
    rotation_rows = [row for rows in by_angle.values() for row in rows]
    summary(rotation_rows, f"Rotations 0..{angles[-1]} by {args.step} degrees, "
                           f"{', '.join(args.images)} at {args.max_side} px")
    table = per_angle(by_angle)
    if args.plot:
        plot(angles, table, Path(args.plot), len(args.images))
        print(f"\nplot: {args.plot}")

    viewpoint_rows = []
    if args.viewpoint_per_image:
        pairs = [p for p in make_pairs(args.viewpoint_per_image) if p.kind == "viewpoint"]
        for i, pair in enumerate(pairs):
            base = extractions.get(f"{Path(pair.name).stem}-viewpoint-a", pair.image_a)
            found = extractions.get(f"{Path(pair.name).stem}-viewpoint-{i}", pair.image_b)
            viewpoint_rows.append(match_all(base["r2d2"], found["r2d2"], base["sift"],
                                            found["sift"], matrices, pair.homography,
                                            pair.image_a.shape[1::-1], pair.image_b.shape[1::-1],
                                            None))
        summary(viewpoint_rows, "Viewpoint pairs of bench_accuracy.py (homography_pairs.py)")
    print(f"\nR2D2 extraction per image of this benchmark: median "
          f"{np.median(extractions.seconds):.2f} s over {len(extractions.seconds)} images")
    if args.cost_image:
        cost(r2d2, args.cost_image, matrices["R2D2 steered, rotations 12"])
    if args.json:
        Path(args.json).write_text(json.dumps({"rotation": {str(a): r for a, r in by_angle.items()},
                                               "viewpoint": viewpoint_rows}, indent=1))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
