"""Every preset's figures on the homography pairs, against the paper preset.

    python benchmarks/bench_presets.py [--per-image 5] [--threads 2] [--ratio-nfeatures 1000]
        [--presets paper,ratio,accurate,...]

On the pairs of benchmarks/homography_pairs.py (4 sample images, ``--per-image``
viewpoint and illumination pairs each: 40 by default), each preset's extractor
(``R2D2Feature.create(preset=NAME)``) is run on every image, interleaved, and prints:
MMA@1 and MMA@3 of mutual nearest-neighbour matches, the fraction of pairs whose
homography RANSAC recovers (mean corner error <= 3 px), the correct matches (<= 3 px)
that OpenCV's ratio-test recipe keeps (knnMatch k=2, Lowe's 0.75) at the preset's
nfeatures and at ``--ratio-nfeatures`` (a tight budget, where the ratio preset matters),
and the extraction time against the paper preset (median of per-image ratios). Presets
with the same extraction (``sfm`` extracts as ``accurate``) are run once; their SfM
figures come from benchmarks/bench_sfm.py. The CPU and its vector extensions are printed
first: figures of other CPUs differ.
"""
from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List

import cv2
import numpy as np
import torch

import cv2r2d2
from bench_accuracy import RATIO, homography_correct, ratio_test_correct
from cv2r2d2.evaluation import PairData, mean_matching_accuracy
from cv2r2d2.matching import mutual_nearest_neighbours
from cv2r2d2.precision import probe_cpu
from cv2r2d2.presets import PRESETS
from homography_pairs import by_image, make_pairs

THRESHOLDS = (1, 3)


def _extraction(config: Any) -> Dict[str, Any]:
    """The arguments of an extractor's configuration, its preset's name left out."""
    return {k: v for k, v in config.arguments().items() if k != "preset"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-image", type=int, default=5, help="pairs per image and kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ratio-nfeatures", type=int, default=1000,
                        help="the tight keypoint budget of the second ratio-test column")
    parser.add_argument("--presets", default=",".join(PRESETS),
                        help="comma-separated preset names (default: all)")
    args = parser.parse_args()
    names = ["paper"] + [n for n in args.presets.split(",") if n and n != "paper"]
    for name in names:
        if name not in PRESETS:
            parser.error(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    torch.set_num_threads(args.threads)
    cpu = probe_cpu()
    print(f"CPU: {cpu.model}; torch capability {cpu.torch_capability}; flags "
          f"{' '.join(sorted(cpu.flags)) or '-'}; {args.threads} thread(s); torch "
          f"{torch.__version__}")

    # One extractor per distinct extraction; presets sharing one share its figures.
    extraction_of: Dict[str, str] = {}
    features: Dict[str, Any] = {}
    for name in names:
        config = cv2r2d2.R2D2Feature.create(preset=name, device="cpu").getConfig()
        # The same extraction: every argument equal but the preset's name.
        same = [other for other in features if "@" not in other
                and _extraction(features[other].getConfig()) == _extraction(config)]
        extraction_of[name] = same[0] if same else name
        if not same:
            features[name] = cv2r2d2.R2D2Feature(config)
            features[name + "@tight"] = cv2r2d2.R2D2Feature(
                config.replace(nfeatures=args.ratio_nfeatures))

    pairs = make_pairs(args.per_image)
    rows: Dict[str, List[tuple]] = {name: [] for name in features}
    seconds: Dict[str, List[float]] = {name: [] for name in features}
    for image_a, group in by_image(pairs):
        detected: Dict[str, list] = {name: [] for name in features}
        for image in [image_a] + [pair.image_b for pair in group]:
            for name, feature in features.items():
                start = time.perf_counter()
                keypoints, descriptors = feature.detectAndCompute(image, None)
                seconds[name].append(time.perf_counter() - start)
                detected[name].append((cv2.KeyPoint_convert(keypoints).reshape(-1, 2),
                                       descriptors))
        for name in features:
            xy_a, desc_a = detected[name][0]
            for pair, (xy_b, desc_b) in zip(group, detected[name][1:]):
                matches, _ = mutual_nearest_neighbours(desc_a, desc_b, cv2.NORM_L2)
                data = PairData(xy_a, xy_b, matches, pair.homography, image_a.shape[1::-1],
                                pair.image_b.shape[1::-1])
                rows[name].append((mean_matching_accuracy(data, THRESHOLDS),
                                   homography_correct(data),
                                   ratio_test_correct(xy_a, desc_a, xy_b, desc_b,
                                                      pair.homography, cv2.NORM_L2)))
        print(f"{group[0].name}: {len(group)} pairs done", flush=True)

    print(f"\n{len(pairs)} pairs from {', '.join(sorted({p.name for p in pairs}))}")
    print(f"| preset | MMA@1 | MMA@3 | homography correct | ratio {RATIO} correct, preset's "
          f"nfeatures | same, nfeatures {args.ratio_nfeatures} | extraction time / paper's |")
    print("| --- " * 7 + "|")
    for name in names:
        own = extraction_of[name]
        mma = np.mean([r[0] for r in rows[own]], axis=0)
        time_ratio = np.median(np.array(seconds[own]) / np.array(seconds["paper"]))
        shared = f" (extracts as {own})" if own != name else ""
        print(f"| {name}{shared} | {mma[0]:.3f} | {mma[1]:.3f} | "
              f"{np.mean([r[1] for r in rows[own]]):.2f} | "
              f"{np.mean([r[2] for r in rows[own]]):.0f} | "
              f"{np.mean([r[2] for r in rows[own + '@tight']]):.0f} | {time_ratio:.2f} |")


if __name__ == "__main__":
    main()
