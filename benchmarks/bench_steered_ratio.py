"""Steered matching between steering angles: the ratio-test recipe and the steering set.

    python benchmarks/bench_steered_ratio.py [--part ratio|angles|all] [--cache DIR]

Every photo is rotated about its centre on an enlarged canvas (cv2r2d2.steerer_fitting.rotate_image;
quarter turns exact), the ground truth being the rotation's homography; a match is correct
within 3 px of it. Steerers are fitted here (default settings, not cached) for every angle
used, and the fitting time of each steering set is printed.

Part "ratio": two Sacre-Coeur photos at full size (paper settings, 5000 keypoints), rotated
by 15, 30, ..., 90 degrees. Correct matches (and matches) of the README's recipes:
cross-checked steered matching (SteeredMatcher(crossCheck=True)), Lowe's ratio test after
SteeredMatcher(crossCheck=False).knnMatch(d1, d2, 2) with and without trainKeypoints=kp2,
at rotations 12 and the default, and the angle known: BFMatcher(crossCheck=True) on
r2d2.steer(d1, angle).

Part "angles": three photos the steerers were not chosen on (ANGLE_PHOTOS, at most
--angle-side px, 2000 keypoints), rotated by 0, 7.5, ..., 180 degrees and by the
mid-points 11.25 + 22.5 k of 22.5-degree steps (or --angles). MMA@3 (mean over the photos)
per angle of cross-checked steered matching with 12 (30 deg), 16 (22.5 deg), 24 (15 deg;
coarse to fine, and every angle voting) and 48 (7.5 deg) steering angles, and with the 12
fitted ones plus the geodesic midpoints between them (polar factor of S_a + S_b: no new
fits); matches per pair, how often the nearest steering angle was found, and the matching
time per pair as a ratio to plain mutual nearest neighbours (median, interleaved in one
process).
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch

import cv2r2d2
from cv2r2d2 import matching
from cv2r2d2.matching import match_rotated, mutual_nearest_neighbours
from cv2r2d2.steered_matcher import SteeredMatcher
from cv2r2d2.steerer_fitting import fit_steerers, rotate_image
from cv2r2d2.steerers import DEFAULT_ROTATIONS, Steerers

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images"
MAX_ERROR = 3.0
FULL_SIZE = 10000  # a longer side no photo exceeds: no downscaling
RATIO_PHOTOS = ("sacre_coeur/03903474_1471484089.jpg", "sacre_coeur/60584745_2207571072.jpg")
RATIO_ANGLES = (15, 30, 45, 60, 75, 90)
RATIO = 0.9  # the README's recipe
RADII = (0, 2, 4, 8, 12)
ANGLE_PHOTOS = ("sceaux_castle/100_7100.JPG", "monstree/IMG_1025.JPG",
                "sacre_coeur/10265353_3838484249.jpg")
ANGLES = sorted({7.5 * k for k in range(25)} | {11.25 + 22.5 * k for k in range(8)})
# steering set -> (angle step in degrees, every angle votes)
SETS = {"12 (30 deg)": (30.0, False), "16 (22.5 deg)": (22.5, False),
        "24 (15 deg)": (15.0, False), "24, every angle votes": (15.0, True),
        "48 (7.5 deg)": (7.5, False), "12 + midpoints (15 deg)": (15.0, False)}
MIDPOINTS = "12 + midpoints (15 deg)"

View = Tuple[np.ndarray, np.ndarray, np.ndarray]  # xy (N, 2), descriptors (N, D), homography


def load(name: str, max_side: int) -> np.ndarray:
    image = cv2.imread(str(IMAGES / name))
    if image is None:
        raise FileNotFoundError(f"sample image {IMAGES / name} is missing")
    scale = max_side / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return image


class Views:
    """Rotated views of photos, extracted once (and kept in --cache, when given)."""

    def __init__(self, folder: Optional[Path]) -> None:
        self.folder, self.features = folder, {}
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, max_side: int, angle: float, nfeatures: int) -> View:
        image = load(name, max_side)
        rotated, homography = rotate_image(image, angle)
        path = None if self.folder is None else \
            self.folder / f"{Path(name).stem}-{max_side}-{angle:g}-{nfeatures}-0.npz"
        if path is not None and path.is_file():
            with np.load(path) as data:
                return data["xy"], data["d"], homography
        if nfeatures not in self.features:
            self.features[nfeatures] = cv2r2d2.R2D2Feature.create(nfeatures=nfeatures,
                                                                  device="cpu")
        keypoints, descriptors = self.features[nfeatures].detectAndCompute(rotated, None)
        xy = cv2.KeyPoint_convert(keypoints).reshape(-1, 2)
        if path is not None:
            np.savez(path, xy=xy, d=descriptors)
        return xy, descriptors, homography


def correct_mask(xy_a: np.ndarray, xy_b: np.ndarray, pairs: np.ndarray,
                 homography: np.ndarray) -> np.ndarray:
    """(M,) whether each match (M, 2) puts its image-b keypoint within MAX_ERROR px of
    the truth."""
    if not len(pairs):
        return np.zeros(0, bool)
    projected = cv2.perspectiveTransform(xy_a[pairs[:, 0]].reshape(-1, 1, 2).astype(np.float64),
                                         homography).reshape(-1, 2)
    return np.linalg.norm(projected - xy_b[pairs[:, 1]], axis=1) <= MAX_ERROR


def correct(xy_a: np.ndarray, xy_b: np.ndarray, pairs: np.ndarray, homography: np.ndarray) -> int:
    return int(correct_mask(xy_a, xy_b, pairs, homography).sum())


def timed(function: Callable, *args: Any, **kwargs: Any) -> Tuple[Any, float]:
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def fit(r2d2: Any) -> Steerers:
    """Steerers for every angle of the benchmark; prints each steering set's fitting time."""
    steerers, done = None, set()
    for step in (30.0, 15.0, 22.5, 7.5):
        angles = sorted({step * k for k in range(1, int(180 / step) + 1)} - done)
        new, seconds = timed(fit_steerers, r2d2, angles, show_progress=False)
        steerers = new if steerers is None else steerers.merged(new)
        done |= set(angles)
        print(f"fitted {len(angles)} more steerers for {step:g}-degree steps in {seconds:.0f} s "
              f"({seconds / len(angles):.1f} s each)", flush=True)
    return steerers


def matrices(steerers: Steerers, step: float) -> np.ndarray:
    return np.stack([steerers.matrix(step * k) for k in range(round(360 / step))])


def midpoints(steerers: Steerers) -> np.ndarray:
    """(24, D, D): the 30-degree steerers and, between each two, the geodesic midpoint
    on the orthogonal group, U V^T of the SVD of their sum."""
    fitted = matrices(steerers, 30.0).astype(np.float64)
    stack = []
    for k, matrix in enumerate(fitted):
        u, _, vt = np.linalg.svd(matrix + fitted[(k + 1) % len(fitted)])
        stack += [matrix, u @ vt]
    return np.stack(stack).astype(np.float32)


def pairs_of(matches: Sequence[cv2.DMatch]) -> np.ndarray:
    return np.array([(m.queryIdx, m.trainIdx) for m in matches], np.int64).reshape(-1, 2)


def ratio_methods(steerers: Steerers) -> Dict[str, Callable[[View, View, float], np.ndarray]]:
    """The README's recipes: name -> (view a, view b, true angle) -> (M, 2) matches."""
    def ratio(rotations: int, value: float, keypoints: bool) -> Callable:
        def run(a: View, b: View, angle: float) -> np.ndarray:
            matcher = SteeredMatcher(steerers, rotations=rotations, crossCheck=False,
                                     device="cpu")
            knn = matcher.knnMatch(a[1], b[1], 2, trainKeypoints=b[0] if keypoints else None)
            return pairs_of([r[0] for r in knn if len(r) == 2 and r[0].distance < value * r[1].distance])
        return run

    def cross(rotations: int) -> Callable:
        def run(a: View, b: View, angle: float) -> np.ndarray:
            return pairs_of(SteeredMatcher(steerers, rotations=rotations, device="cpu").match(a[1], b[1]))
        return run

    def known(a: View, b: View, angle: float) -> np.ndarray:
        return pairs_of(cv2.BFMatcher(cv2.NORM_L2, crossCheck=True).match(
            steerers.steer(a[1], angle), b[1]))

    default = DEFAULT_ROTATIONS
    return {
        "ratio 0.8, rotations 12 (the old README)": ratio(12, 0.8, False),
        f"ratio 0.8, rotations {default}": ratio(default, 0.8, False),
        f"ratio 0.8, rotations {default}, trainKeypoints": ratio(default, 0.8, True),
        f"ratio {RATIO}, rotations {default}, trainKeypoints": ratio(default, RATIO, True),
        "cross-check, rotations 12": cross(12),
        f"cross-check, rotations {default}": cross(default),
        "angle known: steer + BFMatcher(crossCheck=True)": known,
    }


def part_ratio(steerers: Steerers, views: Views) -> None:
    methods = ratio_methods(steerers)
    table: Dict[str, Dict[int, List[Tuple[int, int]]]] = {m: {} for m in methods}
    distinct: Dict[str, Dict[int, List[int]]] = {m: {} for m in methods}
    for name in RATIO_PHOTOS:
        base = views.get(name, FULL_SIZE, 0, 5000)
        for angle in RATIO_ANGLES:
            view = views.get(name, FULL_SIZE, angle, 5000)
            for method, run in methods.items():
                found = run(base, view, angle)
                hits = correct_mask(base[0], view[0], found, view[2])
                table[method].setdefault(angle, []).append((int(hits.sum()), len(found)))
                distinct[method].setdefault(angle, []).append(len(np.unique(found[hits, 1])))
        print(f"{name}: done", flush=True)
    print(f"\nCorrect matches (of matches), summed over {len(RATIO_PHOTOS)} photos at full size, "
          "5000 keypoints")
    print("| method | " + " | ".join(f"{a} deg" for a in RATIO_ANGLES) + " |")
    print("| --- " * (len(RATIO_ANGLES) + 1) + "|")
    for method, rows in table.items():
        cells = [f"{sum(c for c, _ in rows[a])} ({sum(n for _, n in rows[a])})"
                 for a in RATIO_ANGLES]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nDistinct image-2 keypoints among the correct matches (a one-way match may give "
          "two image-1 keypoints of one place the same image-2 keypoint)")
    for method, rows in distinct.items():
        print(f"  {method}: " + ", ".join(f"{a}: {sum(rows[a])}" for a in RATIO_ANGLES))
    for i, name in enumerate(RATIO_PHOTOS):
        print(f"\n{name}: correct matches")
        for method, rows in table.items():
            print(f"  {method}: " + ", ".join(f"{a}: {rows[a][i][0]}" for a in RATIO_ANGLES))
    print("\nThe recipe at 45 degrees by trainKeypoints radius (correct matches of matches, "
          "summed over the photos; 0: OpenCV's second neighbour)")
    cells = {radius: [0, 0] for radius in RADII}
    for name in RATIO_PHOTOS:
        a, b = views.get(name, FULL_SIZE, 0, 5000), views.get(name, FULL_SIZE, 45, 5000)
        matcher = SteeredMatcher(steerers, crossCheck=False, device="cpu")
        for radius in RADII:
            knn = matcher.knnMatch(a[1], b[1], 2, trainKeypoints=b[0], radius=radius)
            found = pairs_of([r[0] for r in knn if len(r) == 2
                              and r[0].distance < RATIO * r[1].distance])
            cells[radius][0] += correct(a[0], b[0], found, b[2])
            cells[radius][1] += len(found)
    print("| radius (px) | " + " | ".join(f"{r:g}" for r in RADII) + " |")
    print("| --- " * (len(RADII) + 1) + "|")
    print(f"| ratio {RATIO} | " + " | ".join(f"{c} ({n})" for c, n in cells.values()) + " |")


def part_angles(steerers: Steerers, views: Views, max_side: int,
                angles: Sequence[float]) -> None:
    stacks = {name: matrices(steerers, step) for name, (step, _) in SETS.items()
              if name != MIDPOINTS}
    stacks[MIDPOINTS] = midpoints(steerers)
    mma: Dict[str, Dict[float, List[float]]] = {m: {} for m in SETS}
    found: Dict[str, List[float]] = {m: [] for m in SETS}
    counts: Dict[str, List[int]] = {m: [] for m in SETS}
    ratios: Dict[str, List[float]] = {m: [] for m in SETS}
    coarse = matching.COARSE_VOTES
    for name in ANGLE_PHOTOS:
        xy_a, d_a, _ = views.get(name, max_side, 0, 2000)
        for angle in angles:
            xy_b, d_b, homography = views.get(name, max_side, angle, 2000)
            _, plain = timed(mutual_nearest_neighbours, d_a, d_b, device="cpu")
            for method, (step, every) in SETS.items():
                matching.COARSE_VOTES = 10**9 if every else coarse
                try:
                    [(pairs, _, best)], seconds = timed(match_rotated, [(d_a, d_b)],
                                                        stacks[method], device="cpu")
                finally:
                    matching.COARSE_VOTES = coarse
                hits = correct(xy_a, xy_b, pairs, homography)
                mma[method].setdefault(angle, []).append(hits / max(len(pairs), 1))
                counts[method].append(len(pairs))
                ratios[method].append(seconds / plain)
                error = abs((best * step - angle + 180) % 360 - 180)
                found[method].append(float(error <= step / 2 + 1e-6))
        print(f"{name}: done", flush=True)
    print(f"\nMMA@3 (mean over {len(ANGLE_PHOTOS)} photos at {max_side} px, 2000 keypoints) of "
          "cross-checked steered matching, by steering set")
    print("| angle | " + " | ".join(SETS) + " |")
    print("| --- " * (len(SETS) + 1) + "|")
    for angle in angles:
        print(f"| {angle:g} | " + " | ".join(f"{np.mean(mma[m][angle]):.3f}" for m in SETS) + " |")
    rows = {"lowest MMA@3 (over angles)": lambda m: f"{min(np.mean(v) for v in mma[m].values()):.3f}",
            "mean MMA@3": lambda m: f"{np.mean([np.mean(v) for v in mma[m].values()]):.3f}",
            "matches per pair": lambda m: f"{np.mean(counts[m]):.0f}",
            "nearest steering angle found": lambda m: f"{np.mean(found[m]):.3f}",
            "matching time / plain (median)": lambda m: f"{np.median(ratios[m]):.2f}"}
    for label, cell in rows.items():
        print(f"| {label} | " + " | ".join(cell(m) for m in SETS) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("ratio", "angles", "all"), default="all")
    parser.add_argument("--angle-side", type=int, default=480,
                        help="longer side of the photos of part 'angles', pixels")
    parser.add_argument("--angles", type=float, nargs="+", default=ANGLES,
                        help="rotations of part 'angles', degrees")
    parser.add_argument("--cache", default=None, help="keep extractions in this folder")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    r2d2 = cv2r2d2.R2D2Feature.create(device="cpu")
    steerers = fit(r2d2)
    views = Views(None if args.cache is None else Path(args.cache))
    if args.part in ("ratio", "all"):
        part_ratio(steerers, views)
    if args.part in ("angles", "all"):
        part_angles(steerers, views, args.angle_side, args.angles)


if __name__ == "__main__":
    main()
