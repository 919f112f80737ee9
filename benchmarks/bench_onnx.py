"""Speed and accuracy of the ONNX backends against the torch backend, in one process.

Exports the model in fp32 and int8 (calibrated on the sample images other than the
benchmark image), then times ``detectAndCompute`` at the paper's settings for each
backend, interleaved, and prints the median of N runs and its speed-up over torch,
the parity with the original implementation's reference output where one exists,
and the int8 export's accuracy report.

    CV2R2D2_WEIGHTS_DIR=../shared/weights python benchmarks/bench_onnx.py --repeat 5
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
from cv2r2d2.export import export_onnx, keypoint_agreement
from cv2r2d2.extractor import ExtractionParams
from cv2r2d2.config import NUM_THREADS_ENV
from cv2r2d2.evaluation import parity_figures

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="r2d2_WASF_N16")
    parser.add_argument("--image", default=str(SHARED / "images" / "brooklyn.png"))
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per backend")
    parser.add_argument("--threads", type=int, default=2, help="threads for every backend")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    os.environ[NUM_THREADS_ENV] = str(args.threads)
    image_path = Path(args.image)
    image = cv2.imread(str(image_path))
    if image is None:
        raise SystemExit(f"cannot read {image_path}")

    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as folder:
        folder = Path(folder)
        calibration = folder / "calibration"
        calibration.mkdir()
        for other in sorted(image_path.parent.glob("*.png")):
            if other.name != image_path.name:
                (calibration / other.name).symlink_to(other.resolve())
        fp32 = export_onnx(args.model, folder / "fp32.onnx")
        int8 = export_onnx(args.model, folder / "int8.onnx", int8=True, calibration=calibration)
        print(f"int8 export ({int8['evaluation_images']} calibration images, "
              f"longer side <= 512, paper settings): {int8}")

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

        runners = {name: r2d2.getRunner() for name, r2d2 in extractors.items()}
        agreement = keypoint_agreement(
            runners["onnxruntime fp32"], runners["onnxruntime int8"], [image], ExtractionParams()
        )
        print(f"\nint8 vs fp32 on {image_path.name}: {agreement}")


if __name__ == "__main__":
    main()
