"""Speed, memory and accuracy of R2D2 extraction on this machine (not a test).

    python benchmarks/bench_extract.py [--repeat 3] [--huge] [--threads 2]

Prints, for brooklyn.png at the paper's settings: the median time of several
interleaved runs of each mode against the un-optimised baseline (``backend="reference"``,
the original implementation's way of running the network), cv2.SIFT for context, the
per-stage split, the fraction of the machine's fp32 matmul throughput reached, the peak
RSS of each mode (each in a fresh process), and for the fast modes (faster2d2, int8
ONNX Runtime exports calibrated on the other sample images, and both) the mean
matching accuracy at 3 px they cost on homography pairs made from the sample images.
``--huge`` adds an 8000 x 6000 synthetic image at full resolution (minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import cv2
import numpy as np
import torch
from torch import nn

import cv2r2d2
from cv2r2d2.evaluation import homography_matching_accuracy
from cv2r2d2.extractor import ExtractionParams, extract, pyramid
from cv2r2d2.image import normalize_image
from homography_pairs import IMAGES, by_image, make_pairs

HUGE = dict(max_size=9999, min_size=0, min_scale=0.3)

# name -> R2D2Feature.create keyword arguments; "reference" is the baseline. An
# "onnx" entry names the model exported to ONNX (fp32, or int8 calibrated on the sample
# images other than brooklyn) and run by onnxruntime.
MODES: Dict[str, dict] = {
    "reference": dict(backend="reference", tile_size=0),
    "exact": dict(),
    "exact, untiled": dict(tile_size=0),
    "exact, onnxruntime fp32": dict(onnx=("r2d2_WASF_N16", "fp32")),
    "faster2d2": dict(model="faster2d2_WASF_N16"),
    "int8 onnxruntime": dict(onnx=("r2d2_WASF_N16", "int8")),
    "faster2d2, int8 onnxruntime": dict(onnx=("faster2d2_WASF_N16", "int8")),
}
FAST_MODES = ("faster2d2", "int8 onnxruntime", "faster2d2, int8 onnxruntime")
ONNX_DIR_ENV = "BENCH_ONNX_DIR"


def export_models(folder: Path) -> None:
    """Export the ONNX models the modes name into ``folder`` (skipped when present)."""
    from cv2r2d2.export import export_onnx

    calibration = folder / "calibration"
    calibration.mkdir(exist_ok=True)
    for other in sorted(IMAGES.glob("*.png")):
        if other.name != "brooklyn.png" and not (calibration / other.name).exists():
            (calibration / other.name).symlink_to(other.resolve())
    for model, precision in {kw["onnx"] for kw in MODES.values() if "onnx" in kw}:
        path = folder / f"{model}-{precision}.onnx"
        if not path.is_file():
            int8 = precision == "int8"
            export_onnx(model, path, int8=int8, calibration=calibration if int8 else None)


def create(mode: str, **params) -> cv2r2d2.R2D2Feature:
    kwargs = dict(MODES[mode], **params)
    exported = kwargs.pop("onnx", None)
    if exported is not None:
        onnx_path = Path(os.environ[ONNX_DIR_ENV]) / "{}-{}.onnx".format(*exported)
        return cv2r2d2.R2D2Feature.create(str(onnx_path), backend="onnxruntime", **kwargs)
    return cv2r2d2.R2D2Feature.create(device="cpu", **kwargs)


def matmul_gflops(n: int = 4096, repeat: int = 3) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / np.median(times) / 1e9


def macs_per_pixel(net: nn.Module) -> float:
    """Multiply-accumulates per input pixel of the network (convolutions only)."""
    total, area = 0.0, 1.0
    for layer in net.modules():
        if isinstance(layer, nn.Conv2d):
            k = layer.kernel_size[0] * layer.kernel_size[1]
            total += area * layer.in_channels * layer.out_channels * k / layer.groups
        elif isinstance(layer, nn.MaxPool2d):
            area /= layer.kernel_size**2 if isinstance(layer.kernel_size, int) else np.prod(layer.kernel_size)
        elif isinstance(layer, nn.Upsample):
            area *= float(layer.scale_factor) ** 2
    return total


class TimedRunner:
    """Wraps a runner and adds up the time spent in each stage."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.descriptor_size = runner.descriptor_size
        self.halo = getattr(runner, "halo", 0)
        self.seconds = dict(resize=0.0, network=0.0, gather=0.0)

    def _timed(self, stage: str, fn: Callable, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.seconds[stage] += time.perf_counter() - start
        return result

    def prepare(self, image):
        return self.runner.prepare(image)

    def output_size(self, height, width):
        return self.runner.output_size(height, width)

    def resize(self, image, height, width):
        return self._timed("resize", self.runner.resize, image, height, width)

    def run(self, image, box=None):
        output = self._timed("network", self.runner.run, image, box)
        timer = self

        class Output:
            reliability = output.reliability
            repeatability = output.repeatability

            @staticmethod
            def descriptors_at(x, y):
                return timer._timed("gather", output.descriptors_at, x, y)

        return Output()


def huge_image() -> np.ndarray:
    """An 8000 x 6000 photo-like image: the sample photos tiled and rescaled."""
    tiles = [cv2.imread(str(IMAGES / f)) for f in ("brooklyn.png", "peppers.png", "test.png", "boat.png")]
    row = [cv2.resize(t, (2000, 1500), interpolation=cv2.INTER_CUBIC) for t in tiles]
    canvas = np.vstack([np.hstack(row[i:] + row[:i]) for i in range(4)])
    return canvas


def child(mode: str, image_name: str) -> None:
    """Run one extraction in this (fresh) process and print its figures as JSON."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    if image_name == "huge":
        image, params = huge_image(), HUGE
    else:
        image, params = cv2.imread(str(IMAGES / image_name)), {}
    r2d2 = create(mode, **params)
    start = time.perf_counter()
    keypoints, _ = r2d2.detectAndCompute(image, None)
    seconds = time.perf_counter() - start
    peak_mb = peak_rss_mb()
    print(json.dumps(dict(mode=mode, seconds=seconds, peak_mb=peak_mb, keypoints=len(keypoints))))


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM; ru_maxrss can carry the parent's)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss(mode: str, image_name: str, threads: int) -> dict:
    env = dict(os.environ, BENCH_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--child", mode, image_name],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mma(r2d2, pairs, threshold: float = 3.0) -> float:
    """Mean matching accuracy: mutual nearest-neighbour matches within threshold px."""
    accuracies = []
    for image_a, group in by_image(pairs):
        xy_a, desc_a = detect(r2d2, image_a)
        for pair in group:
            xy_b, desc_b = detect(r2d2, pair.image_b)
            accuracies.append(homography_matching_accuracy(
                xy_a, desc_a, xy_b, desc_b, pair.homography, image_a.shape[1::-1],
                pair.image_b.shape[1::-1], [threshold])[0])
    return float(np.mean(accuracies))


def detect(r2d2, image: np.ndarray):
    keypoints, descriptors = r2d2.detectAndCompute(image, None)
    return cv2.KeyPoint_convert(keypoints).reshape(-1, 2), descriptors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--huge", action="store_true", help="add the 8000 x 6000 image")
    parser.add_argument("--pairs", type=int, default=5,
                        help="homography pairs per sample image and kind for MMA@3")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    torch.set_num_threads(args.threads)
    os.environ["CV2R2D2_NUM_THREADS"] = str(args.threads)  # onnxruntime modes, children too
    image = cv2.imread(str(IMAGES / "brooklyn.png"))
    gflops = matmul_gflops()
    print(f"torch {torch.__version__}, opencv {cv2.__version__}, {args.threads} threads; "
          f"fp32 matmul {gflops:.0f} GFLOP/s")

    onnx_dir = tempfile.TemporaryDirectory(prefix="bench-extract-")
    os.environ[ONNX_DIR_ENV] = onnx_dir.name
    export_models(Path(onnx_dir.name))
    extractors = {name: create(name) for name in MODES}
    sift = cv2.SIFT_create(5000)
    times: Dict[str, List[float]] = {name: [] for name in [*extractors, "cv2.SIFT(5000)"]}
    counts = {}
    for name, r2d2 in extractors.items():  # warm-up
        counts[name] = len(r2d2.detectAndCompute(image, None)[0])
    counts["cv2.SIFT(5000)"] = len(sift.detectAndCompute(image, None)[0])
    for _ in range(args.repeat):
        for name, r2d2 in extractors.items():
            start = time.perf_counter()
            r2d2.detectAndCompute(image, None)
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        sift.detectAndCompute(image, None)
        times["cv2.SIFT(5000)"].append(time.perf_counter() - start)
    median = {name: float(np.median(t)) for name, t in times.items()}

    net = cv2r2d2.load_model("r2d2_WASF_N16", device="cpu")
    levels = [lv for lv in pyramid(*image.shape[:2], ExtractionParams()) if lv.processed]
    pixels = sum(lv.height * lv.width for lv in levels)
    flops = 2 * macs_per_pixel(net) * pixels

    print(f"\nbrooklyn.png 1280x820, paper settings ({len(levels)} levels, {pixels / 1e6:.2f} Mpx, "
          f"{flops / 1e12:.2f} TFLOP), median of {args.repeat} interleaved runs:")
    print("| mode | seconds | speed-up vs reference | keypoints | fp32 matmul fraction | peak RSS MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in times:
        if name in MODES:
            rss = f"{peak_rss(name, 'brooklyn.png', args.threads)['peak_mb']:.0f}"
            model_flops = flops if "faster" not in name else flops * 142.6 / 483.6
            # int8 arithmetic is not measured against the fp32 rate.
            fraction = "-" if "int8" in name else f"{model_flops / median[name] / 1e9 / gflops:.2f}"
        else:
            rss, fraction = "-", "-"
        print(f"| {name} | {median[name]:.2f} | {median['reference'] / median[name]:.2f}x | "
              f"{counts[name]} | {fraction} | {rss} |")

    exact = extractors["exact"]
    timed = TimedRunner(exact.getRunner())
    start = time.perf_counter()
    extract(timed, normalize_image(image), exact.getParams(), tile_size=exact.getTileSize())
    total = time.perf_counter() - start
    rest = total - sum(timed.seconds.values())
    print("\nper-stage split of 'exact': " + ", ".join(
        f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in
        [*timed.seconds.items(), ("image normalisation and NMS/top-k", rest)]))

    pairs = make_pairs(args.pairs)
    exact_mma = mma(extractors["exact"], pairs)
    print(f"\nFast modes: MMA@3 on {len(pairs)} homography pairs (viewpoint and illumination, "
          f"benchmarks/homography_pairs.py); exact: {exact_mma:.3f}")
    print("| mode | speed-up vs reference | MMA@3 | vs exact |")
    print("| --- | --- | --- | --- |")
    for name in FAST_MODES:
        value = mma(extractors[name], pairs)
        print(f"| {name} | {median['reference'] / median[name]:.2f}x | {value:.3f} | "
              f"{value - exact_mma:+.3f} |")

    if args.huge:
        print("\n8000x6000 synthetic image, max_size=9999, min_size=0, min_scale=0.3 (one run):")
        for name in ("exact",):
            figures = peak_rss(name, "huge", args.threads)
            print(f"- {name}: {figures['seconds']:.0f} s, peak RSS {figures['peak_mb']:.0f} MB, "
                  f"{figures['keypoints']} keypoints")


if __name__ == "__main__":
    main()
