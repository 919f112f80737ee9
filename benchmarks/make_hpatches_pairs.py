"""HPatches-format sequences made from the sample images, for ``cv2r2d2 eval-hpatches``.

Each image gives an illumination sequence ``i_<name>`` (gamma changes under the identity)
and a viewpoint sequence ``v_<name>`` (perspective warps of growing strength), with
noise, written by the test suite's ``write_sequence`` (tests/test_evaluation.py):

    python benchmarks/make_hpatches_pairs.py /tmp/hpatches-samples
    CV2R2D2_WEIGHTS_DIR=../shared/weights cv2r2d2 eval-hpatches /tmp/hpatches-samples \\
        --methods r2d2,sift
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cv2r2d2.io import list_images, read_image

ROOT = Path(__file__).resolve().parents[1]
# The sequences are the test suite's; reuse its writer rather than restate it.
sys.path.insert(0, str(ROOT / "tests"))
from test_evaluation import write_sequence  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the folder to write the sequences into (new)")
    parser.add_argument("--images", default=str(ROOT.parent / "shared" / "images"),
                        help="a folder of images (default: %(default)s)")
    args = parser.parse_args()
    output = Path(args.output)
    for index, (name, path) in enumerate(list_images([args.images])):
        image = read_image(path)
        for seed, kind in enumerate(("i", "v"), start=2 * index):
            write_sequence(output, f"{kind}_{path.stem}", image, seed)
        print(f"{name}: {image.shape[1]}x{image.shape[0]}, i_{path.stem} and v_{path.stem}")
    print(f"sequences in {output}")


if __name__ == "__main__":
    main()
