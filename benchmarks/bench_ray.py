"""Extraction on Ray against the single-machine command, on this machine (not a test).

    python benchmarks/bench_ray.py [--images 200] [--throughput-images 48] [--side 200]

Makes small photos (crops of the sample images, ``--side`` px, one pyramid level) and
prints:

- images/s of the single-machine extraction (2 threads), of Ray with 1 actor of 2
  threads and of Ray with 2 actors of 1 thread, on a local Ray of 2 CPUs, counted from
  the first image (model loading and Ray's start-up apart; they are printed too);
- the driver's peak RSS (VmHWM) while extracting ``--images`` images and a quarter of
  them, each in a fresh process that starts its own local Ray: it must not grow with
  the number of images, the driver never receiving descriptors.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import cv2

from cv2r2d2.config import R2D2Config

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images"


def options(side: int) -> R2D2Config:
    """R2D2 configuration of the benchmark: the paper's, on one pyramid level of ``side`` px."""
    return R2D2Config.from_arguments(device="cpu", min_size=side, max_size=side)


def make_photos(folder: Path, count: int, side: int) -> List[Tuple[str, Path]]:
    """``count`` different side x 3/4 side crops of the sample images."""
    samples = [cv2.imread(str(IMAGES / name))
               for name in ("brooklyn.png", "test.png", "peppers.png", "boat.png")]
    photos = []
    for k in range(count):
        image = samples[k % len(samples)]
        height, width = image.shape[:2]
        step = k // len(samples)
        y, x = (step * 37) % (height // 2), (step * 53) % (width // 2)
        crop = cv2.resize(image[y : y + height // 2, x : x + width // 2], (side, side * 3 // 4),
                          interpolation=cv2.INTER_AREA)
        path = folder / f"{k:05d}.png"
        cv2.imwrite(str(path), crop)
        photos.append((path.name, path))
    return photos


def peak_rss_mb() -> float:
    """This process's peak resident set size (VmHWM), MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child_rss(folder: str, count: int, side: int) -> None:
    """Extract ``count`` photos of ``folder`` on a local Ray started here; print JSON."""
    from cv2r2d2.distributed import RayExecutor
    from cv2r2d2.image import list_images

    images = list_images([folder])[:count]
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        report = RayExecutor(actors=2, threads=1).extract(images, Path(out) / "features.h5",
                                                          options(side))
        wall = time.perf_counter() - start
    print(json.dumps(dict(images=len(report.extracted), peak_mb=peak_rss_mb(), wall=wall,
                          per_second=report.images_per_second)))


def single_machine(images: List[Tuple[str, Path]], side: int, out: Path) -> Dict[str, float]:
    import torch

    import cv2r2d2
    from cv2r2d2.collection import extract_collection
    from cv2r2d2.stores import open_features

    torch.set_num_threads(2)
    start = time.perf_counter()
    feature = cv2r2d2.R2D2Feature(options(side))
    loaded = time.perf_counter()
    with open_features(out, writable=True) as store:
        report = extract_collection(images, store, feature)
    seconds = time.perf_counter() - loaded
    return dict(per_second=len(report.extracted) / seconds, startup=loaded - start)


def on_ray(images: List[Tuple[str, Path]], side: int, out: Path, actors: int,
           threads: int) -> Dict[str, float]:
    from cv2r2d2.distributed import RayExecutor

    start = time.perf_counter()
    report = RayExecutor(actors=actors, threads=threads).extract(images, out, options(side))
    wall = time.perf_counter() - start
    return dict(per_second=report.images_per_second, startup=wall - report.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--throughput-images", type=int, default=48)
    parser.add_argument("--side", type=int, default=200)
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "COUNT", "SIDE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_rss(args.child[0], int(args.child[1]), int(args.child[2]))
        return
    import ray

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        photos = make_photos(folder, args.images, args.side)
        subset = photos[: args.throughput_images]
        print(f"{os.cpu_count()} CPUs; {len(subset)} photos of {args.side} x "
              f"{args.side * 3 // 4} px, paper settings on one pyramid level\n")
        results = {"single machine, 2 threads": single_machine(subset, args.side,
                                                              Path(tmp) / "single.h5")}
        start = time.perf_counter()
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray_start = time.perf_counter() - start
        try:
            for actors, threads in ((1, 2), (2, 1)):
                name = f"Ray, {actors} actor(s) x {threads} thread(s)"
                results[name] = on_ray(subset, args.side, Path(tmp) / f"ray{actors}.h5",
                                       actors, threads)
        finally:
            ray.shutdown()
        print("| run | images/s | start-up s (model; Ray actors) |")
        print("| --- | --- | --- |")
        for name, figures in results.items():
            print(f"| {name} | {figures['per_second']:.2f} | {figures['startup']:.1f} |")
        print(f"\nstarting a local Ray: {ray_start:.1f} s")

        print("\ndriver peak RSS, 2 actors x 1 thread, each run in a fresh process "
              "starting its own local Ray:")
        print("| images | driver peak RSS MB | images/s | wall s |")
        print("| --- | --- | --- | --- |")
        for count in (args.images // 4, args.images):
            out = subprocess.run([sys.executable, __file__, "--child", str(folder), str(count),
                                  str(args.side)], capture_output=True, text=True, check=True)
            figures = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {figures['images']} | {figures['peak_mb']:.0f} | "
                  f"{figures['per_second']:.2f} | {figures['wall']:.0f} |")


if __name__ == "__main__":
    main()
