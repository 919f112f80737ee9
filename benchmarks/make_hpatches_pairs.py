"""The accuracy benchmarks' homography pairs written as HPatches sequences, for eval-hpatches.

The pairs are those of benchmarks/homography_pairs.py. Each sample image gives ``v_<name>`` (its 5 viewpoint pairs: 1.ppm the image, 2..6.ppm
the warps, H_1_k the homographies) and ``i_<name>`` (its 5 illumination pairs, identity
homographies):

    python benchmarks/make_hpatches_pairs.py /tmp/hpatches-samples
    CV2R2D2_WEIGHTS_DIR=../shared/weights cv2r2d2 eval-hpatches /tmp/hpatches-samples \\
        --methods r2d2,sift
"""
from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from homography_pairs import make_pairs

PREFIXES = {"viewpoint": "v", "illumination": "i"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the folder to write the sequences into")
    parser.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    args = parser.parse_args()
    last = {}  # folder -> the last image number written
    for pair in make_pairs(per_image=5, seed=args.seed):
        folder = Path(args.output) / f"{PREFIXES[pair.kind]}_{Path(pair.name).stem}"
        if folder not in last:
            folder.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(folder / "1.ppm"), pair.image_a)
        k = last[folder] = last.get(folder, 1) + 1
        cv2.imwrite(str(folder / f"{k}.ppm"), pair.image_b)
        np.savetxt(folder / f"H_1_{k}", pair.homography)
    print(f"{len(last)} sequences in {args.output}: {', '.join(f.name for f in last)}")


if __name__ == "__main__":
    main()
