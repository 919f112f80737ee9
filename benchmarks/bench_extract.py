"""Speed, memory and accuracy of R2D2 extraction on this machine, for every precision (not a test).

    python benchmarks/bench_extract.py [--repeat 3] [--threads 2 1] [--huge]
        [--modes bf16 int8 ...] [--no-accuracy] [--no-memory]

Prints the CPU (model, torch's capability, its bf16/int8 flags), then for brooklyn.png
at the paper's settings and each thread count: the median time of interleaved runs of
each mode against the un-optimised baseline (``backend="reference"``, the original
implementation's way of running the network) and against the exact mode measured in the
same runs, cv2.SIFT for context, the per-stage split, the fraction of the machine's fp32
matmul throughput reached, the peak RSS of each mode (each in a fresh process), the
mean matching accuracy at 3 px of each mode on the 40 homography pairs of
benchmarks/homography_pairs.py, and whether the speed targets of the precision issue
are met. ``precision="int8"`` networks come from the cache (built on first use, not
timed). ``--huge`` adds an 8000 x 6000 synthetic image at full resolution (minutes).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import Callable, Dict, List

import cv2
import numpy as np
import torch
from torch import nn

import cv2r2d2
from cv2r2d2.backends import resolve_precision
from cv2r2d2.evaluation import homography_matching_accuracy
from cv2r2d2.extractor import extract
from cv2r2d2.params import ExtractionParams
from cv2r2d2.pyramid import pyramid
from cv2r2d2.image import normalize_image
from cv2r2d2.precision import CpuCapability, probe_cpu
from homography_pairs import IMAGES, by_image, make_pairs

HUGE = dict(max_size=9999, min_size=0, min_scale=0.3)
FASTER = "faster2d2_WASF_N16"

# name -> R2D2Feature.create keyword arguments; "reference" is the baseline, "exact"
# the exact mode (fp32) every other mode is also compared with.
MODES: Dict[str, dict] = {
    "reference": dict(backend="reference", tile_size=0),
    "exact": dict(),
    "bf16": dict(precision="bf16"),
    "int8": dict(precision="int8"),
    "onnxruntime fp32": dict(backend="onnxruntime"),
    "faster2d2": dict(model=FASTER),
    "faster2d2, bf16": dict(model=FASTER, precision="bf16"),
    "faster2d2, int8": dict(model=FASTER, precision="int8"),
}
# Timed at every thread count (the others at the first one only).
EVERY_THREAD_COUNT = ("reference", "exact", "bf16", "int8", "faster2d2, bf16", "faster2d2, int8")
# Candidates of the `fast` preset: >= 5x the reference, MMA@3 within 0.01 of exact.
FAST_CANDIDATES = ("int8", "bf16", "faster2d2", "faster2d2, bf16", "faster2d2, int8")


def create(mode: str, **params) -> cv2r2d2.R2D2Feature:
    kwargs = dict(MODES[mode], **params)
    if kwargs.get("backend") != "onnxruntime":
        kwargs.setdefault("device", "cpu")
    return cv2r2d2.R2D2Feature.create(**kwargs)


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
    threads = int(os.environ.get("BENCH_THREADS", "2"))
    if image_name == "huge":
        image, params = huge_image(), HUGE
    else:
        image, params = cv2.imread(str(IMAGES / image_name)), {}
    r2d2 = create(mode, num_threads=threads, **params)
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


def time_modes(extractors: Dict[str, cv2r2d2.R2D2Feature], image: np.ndarray,
               repeat: int) -> Dict[str, float]:
    """Median seconds of ``detectAndCompute`` per mode (and cv2.SIFT), runs interleaved."""
    sift = cv2.SIFT_create(5000)
    runs: Dict[str, List[float]] = {name: [] for name in [*extractors, "cv2.SIFT(5000)"]}
    for _ in range(repeat):
        for name, r2d2 in extractors.items():
            start = time.perf_counter()
            r2d2.detectAndCompute(image, None)
            runs[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        sift.detectAndCompute(image, None)
        runs["cv2.SIFT(5000)"].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in runs.items()}


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1],
                        help="thread counts; every mode runs at the first, the main ones at all")
    parser.add_argument("--huge", action="store_true", help="add the 8000 x 6000 image")
    parser.add_argument("--pairs", type=int, default=5,
                        help="homography pairs per sample image and kind for MMA@3")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="modes to run (reference and exact always run)")
    parser.add_argument("--no-accuracy", action="store_true", help="skip MMA@3 (speed only)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak RSS runs")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "IMAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import onnxruntime

    cpu = probe_cpu()
    avx2 = CpuCapability("an AVX2-only CPU", "AVX2", frozenset({"avx2"}))
    print(f"CPU: {cpu.describe()}\ntorch {torch.__version__}, onnxruntime "
          f"{onnxruntime.__version__}, opencv {cv2.__version__}")
    print(f"precision='auto' runs {resolve_precision('r2d2_WASF_N16', 'cpu', 'torch', 'auto')} "
          f"here, {resolve_precision('r2d2_WASF_N16', 'cpu', 'torch', 'auto', avx2)} on an "
          f"AVX2-only CPU (no avx512_bf16/amx_bf16, no VNNI)")
    image = cv2.imread(str(IMAGES / "brooklyn.png"))
    levels = [lv for lv in pyramid(*image.shape[:2], ExtractionParams()) if lv.processed]
    pixels = sum(lv.height * lv.width for lv in levels)
    macs = {name: macs_per_pixel(cv2r2d2.load_model(name, device="cpu"))
            for name in ("r2d2_WASF_N16", FASTER)}

    first = args.threads[0]
    chosen = [name for name in MODES if name in ("reference", "exact") or name in args.modes]
    extractors: Dict[str, cv2r2d2.R2D2Feature] = {}
    medians: Dict[int, Dict[str, float]] = {}
    for threads in args.threads:
        names = [n for n in chosen if threads == first or n in EVERY_THREAD_COUNT]
        # Every backend takes num_threads (torch's count is set around each call).
        extractors = {name: create(name, num_threads=threads) for name in names}
        counts = {name: len(r2d2.detectAndCompute(image, None)[0])  # warm-up
                  for name, r2d2 in extractors.items()}
        torch.set_num_threads(threads)
        gflops = matmul_gflops()
        median = medians[threads] = time_modes(extractors, image, args.repeat)
        print(f"\nbrooklyn.png 1280x820, paper settings ({len(levels)} levels, "
              f"{pixels / 1e6:.2f} Mpx), {threads} thread(s), fp32 matmul {gflops:.0f} GFLOP/s, "
              f"median of {args.repeat} interleaved runs:")
        print("| mode | seconds | vs reference | vs exact | keypoints | fp32 matmul fraction "
              "| peak RSS MB |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for name, seconds in median.items():
            rss, fraction, count = "-", "-", counts.get(name, 5000)
            if name in MODES:
                if threads == first and not args.no_memory:
                    rss = f"{peak_rss(name, 'brooklyn.png', threads)['peak_mb']:.0f}"
                model = MODES[name].get("model", "r2d2_WASF_N16")
                if MODES[name].get("precision", "fp32") == "fp32":
                    flops = 2 * macs[model] * pixels
                    fraction = f"{flops / seconds / 1e9 / gflops:.2f}"
            print(f"| {name} | {seconds:.2f} | {median['reference'] / seconds:.2f}x | "
                  f"{median['exact'] / seconds:.2f}x | {count} | {fraction} | {rss} |", flush=True)
        if threads == first:
            all_extractors = extractors

    exact = all_extractors["exact"]
    timed = TimedRunner(exact._runner())
    torch.set_num_threads(first)
    start = time.perf_counter()
    extract(timed, normalize_image(image), exact.getConfig().params, tile_size=exact.getTileSize())
    total = time.perf_counter() - start
    rest = total - sum(timed.seconds.values())
    print(f"\nper-stage split of 'exact' ({first} threads): " + ", ".join(
        f"{k} {v:.2f} s ({100 * v / total:.0f}%)" for k, v in
        [*timed.seconds.items(), ("image normalisation and NMS/top-k", rest)]))

    if args.huge:
        print("\n8000x6000 synthetic image, max_size=9999, min_size=0, min_scale=0.3 (one run):")
        for name in ("exact",):
            figures = peak_rss(name, "huge", first)
            print(f"- {name}: {figures['seconds']:.0f} s, peak RSS {figures['peak_mb']:.0f} MB, "
                  f"{figures['keypoints']} keypoints")

    if args.no_accuracy:
        return
    pairs = make_pairs(args.pairs)
    accuracy = {name: mma(all_extractors[name], pairs) for name in chosen if name != "reference"}
    base = medians[first]
    print(f"\nMMA@3 on {len(pairs)} homography pairs (viewpoint and illumination, "
          f"benchmarks/homography_pairs.py); exact: {accuracy['exact']:.3f}")
    print(f"| mode | vs reference ({first} threads) | vs exact | MMA@3 | vs exact |")
    print("| --- | --- | --- | --- | --- |")
    for name, value in accuracy.items():
        print(f"| {name} | {base['reference'] / base[name]:.2f}x | {base['exact'] / base[name]:.2f}x "
              f"| {value:.3f} | {value - accuracy['exact']:+.3f} |")

    print("\nTargets (issue 25), on this CPU:")
    for name in (n for n in FAST_CANDIDATES if n in accuracy):
        speed = {t: medians[t]["reference"] / medians[t][name] for t in medians if name in medians[t]}
        loss = accuracy["exact"] - accuracy[name]
        print(f"- fast candidate {name!r}: "
              + ", ".join(f"{s:.2f}x the reference at {t} thread(s)" for t, s in speed.items())
              + f", MMA@3 {loss:+.3f} below exact: "
              + verdict(min(speed.values()) >= 5 and loss <= 0.01))
    if "bf16" not in accuracy:
        return
    speed = {t: medians[t]["exact"] / medians[t]["bf16"] for t in medians}
    loss = abs(accuracy["exact"] - accuracy["bf16"])
    print("- bf16 >= 1.8x exact, MMA@3 within 0.005: "
          + ", ".join(f"{s:.2f}x at {t} thread(s)" for t, s in speed.items())
          + f", MMA@3 {accuracy['bf16'] - accuracy['exact']:+.3f}: "
          + verdict(min(speed.values()) >= 1.8 and loss <= 0.005))


if __name__ == "__main__":
    main()
