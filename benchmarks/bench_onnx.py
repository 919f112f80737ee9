"""Speed and accuracy of the ONNX backends, and which calibration data the int8 network needs.

    CV2R2D2_WEIGHTS_DIR=../shared/weights python benchmarks/bench_onnx.py --repeat 5
    CV2R2D2_WEIGHTS_DIR=../shared/weights python benchmarks/bench_onnx.py --calibration-study

By default: exports the model in fp32 and int8 (calibrated on the sample images other
than the benchmark image), times ``detectAndCompute`` at the paper's settings for each
backend, interleaved, and prints the median of N runs and its speed-up over torch, the
parity with the original implementation's reference output where one exists, and the
int8 export's accuracy report.

``--calibration-study`` builds the int8 network on each kind of calibration data the
package could use on first use (procedural textures it draws itself, in several counts
and sizes, and real photos: ../shared/images/sacre_coeur, which the pairs do not use) and
prints, for each, the build time and the MMA@3 on the 40 homography pairs of
benchmarks/homography_pairs.py against the exact mode's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

import cv2r2d2
from bench_extract import mma
from cv2r2d2.config import NUM_THREADS_ENV
from cv2r2d2.evaluation import parity_figures
from cv2r2d2.export import export_onnx, read_images
from cv2r2d2.params import ExtractionParams
from cv2r2d2.onnx_export import export_int8, keypoint_agreement
from cv2r2d2.precision import probe_cpu
from cv2r2d2.steerer_fitting import procedural_images
from homography_pairs import make_pairs

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PHOTOS = SHARED / "images" / "sacre_coeur"
# (label, images): procedural (count, side) or a folder of photos at a longer side of 512.
CALIBRATIONS = (
    ("procedural 4 x 512 px", lambda: procedural_images(4, 512)),
    ("procedural 16 x 512 px", lambda: procedural_images(16, 512)),
    ("procedural 32 x 256 px", lambda: procedural_images(32, 256)),
    ("photos: sacre_coeur, 10 at 512 px", lambda: read_images(PHOTOS)),
)


def backends(args: argparse.Namespace, image: np.ndarray, image_path: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as folder:
        folder = Path(folder)
        calibration = folder / "calibration"
        calibration.mkdir()
        for other in sorted(image_path.parent.glob("*.png")):
            if other.name != image_path.name:
                (calibration / other.name).symlink_to(other.resolve())
        fp32 = export_onnx(args.model, folder / "fp32.onnx")
        int8 = export_onnx(args.model, folder / "int8.onnx", int8=True, calibration=calibration)
        print(f"int8 export ({int8['evaluation_images']} held-out images, longer side <= 512, "
              f"paper settings): {int8}")

        extractors = {
            "torch": cv2r2d2.R2D2Feature.create(args.model, device="cpu"),
            "onnxruntime fp32": cv2r2d2.R2D2Feature.create(fp32["output"], backend="onnxruntime"),
            "onnxruntime int8": cv2r2d2.R2D2Feature.create(int8["output"], backend="onnxruntime"),
            "opencv fp32": cv2r2d2.R2D2Feature.create(fp32["output"], backend="opencv"),
            "opencv int8": cv2r2d2.R2D2Feature.create(int8["output"], backend="opencv"),
        }
        results = {name: r2d2.detectAndCompute(image, None) for name, r2d2 in extractors.items()}
        times = {name: [] for name in extractors}
        for _ in range(args.repeat):
            for name, r2d2 in extractors.items():
                start = time.perf_counter()
                r2d2.detectAndCompute(image, None)
                times[name].append(time.perf_counter() - start)

        reference_file = SHARED / "reference" / f"{args.model}__{image_path.stem}__default.npz"
        reference = np.load(reference_file) if reference_file.is_file() else None
        base = statistics.median(times["torch"])
        print(f"\n{image_path.name} {image.shape[1]}x{image.shape[0]}, {args.model}, paper settings, "
              f"{args.threads} threads, median of {args.repeat}")
        print(f"{'backend':<18} {'median s':>9} {'speed-up':>9}  parity with the reference")
        for name, runs in times.items():
            median = statistics.median(runs)
            parity = parity_figures(*results[name], reference) if reference is not None else "-"
            print(f"{name:<18} {median:9.3f} {base / median:8.2f}x  {parity}")

        runners = {name: r2d2._runner() for name, r2d2 in extractors.items()}
        agreement = keypoint_agreement(
            runners["onnxruntime fp32"], runners["onnxruntime int8"], [image], ExtractionParams()
        )
        print(f"\nint8 vs fp32 on {image_path.name}: {agreement}")


def calibration_study(args: argparse.Namespace) -> None:
    pairs = make_pairs(5)
    exact = mma(cv2r2d2.R2D2Feature.create(args.model, device="cpu"), pairs)
    print(f"\n{args.model}, MMA@3 on {len(pairs)} homography pairs; exact (torch fp32): "
          f"{exact:.3f}")
    print("| calibration data | build s | MMA@3 | vs exact |")
    print("| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="bench-calibration-") as folder:
        for index, (label, images) in enumerate(CALIBRATIONS):
            path = Path(folder) / f"{index}.onnx"
            start = time.perf_counter()
            export_int8(args.model, path, images(), [])
            seconds = time.perf_counter() - start
            value = mma(cv2r2d2.R2D2Feature.create(str(path), backend="onnxruntime"), pairs)
            print(f"| {label} | {seconds:.0f} | {value:.3f} | {value - exact:+.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="r2d2_WASF_N16")
    parser.add_argument("--image", default=str(SHARED / "images" / "brooklyn.png"))
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per backend")
    parser.add_argument("--threads", type=int, default=2, help="threads for every backend")
    parser.add_argument("--calibration-study", action="store_true",
                        help="compare the calibration data of the int8 network instead")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    os.environ[NUM_THREADS_ENV] = str(args.threads)
    print(f"CPU: {probe_cpu().describe()}; torch {torch.__version__}, {args.threads} threads")
    if args.calibration_study:
        calibration_study(args)
        return
    image_path = Path(args.image)
    image = cv2.imread(str(image_path))
    if image is None:
        raise SystemExit(f"cannot read {image_path}")
    backends(args, image, image_path)


if __name__ == "__main__":
    main()
