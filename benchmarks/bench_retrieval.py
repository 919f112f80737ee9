"""Image retrieval pairs (``--pairs retrieval:K``) against exhaustive matching.

On the three scenes of ../shared/images mixed into one collection (sacre_coeur 10 photos,
sceaux_castle 11, monstree 23; a folder of symbolic links ``<scene>-<file>`` made in the
working folder, the photos are not copied), this prints:

1. Recall: of the pairs that exhaustive matching verifies with at least
   ``--min-inliers`` inliers (COLMAP's geometric verification through pycolmap, as
   ``cv2r2d2 sfm`` runs it), the share that retrieval with K = ``--k`` selects, against
   the share that choosing each photo's K pairs of most inliers would (the best any
   choice of K per photo can do); for bags of ``--words`` visual words (the index) and
   for VLAD vectors of ``--vlad-words`` words (the alternative), with the pairs
   selected (those across scenes), the share of photos whose same-scene photos all rank
   first, and the time to learn the codebook and to describe a photo; then the default
   index at larger K.
2. Cost: describing a photo (reading its features and making its vector) against
   extracting it (R2D2 paper settings, ``--extract-sample`` photos timed).
3. SfM: ``cv2r2d2.sfm.reconstruct`` with exhaustive pairs and with ``retrieval:K`` on the
   same features (paper settings, no refinement): photos registered per scene, verified
   pairs, stage times, and the pairs and matching time (retrieval included) as ratios.
4. Scale: top-K among ``--scale`` random unit vectors of the index's dimension (float16
   in an h5 file, as the index stores them), time and peak memory (tracemalloc: numpy's
   arrays; BLAS buffers are not counted).

    python benchmarks/bench_retrieval.py --work /tmp/bench_retrieval \
        [--features FEATURES.h5] [--k 10] [--words 256,1024,2048] [--scale 100000]

``--features``: a features file of the mixed collection (``cv2r2d2 extract WORK/mixed -o
FEATURES.h5``, paper settings), copied into the SfM folders; without it the exhaustive
run extracts (85 minutes on 2 loaded cores). The SfM outcomes are kept in
``WORK/<run>/summary.json`` and read by later runs (delete them to measure again).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
import tracemalloc
from pathlib import Path
from typing import Any, Dict, List, Sequence, Set, Tuple

import numpy as np

import cv2r2d2
from cv2r2d2.collection import detect
from cv2r2d2.colmap import import_pycolmap, verified_matches
from cv2r2d2.image import list_images, read_image
from cv2r2d2 import retrieval
from cv2r2d2.neighbours import top_k_neighbours
from cv2r2d2.retrieval import RetrievalIndex, RetrievalSettings
from cv2r2d2.sfm import MatchingOptions, RefinementOptions, reconstruct
from cv2r2d2.stores import H5Features

IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "images"
SCENES = ("sacre_coeur", "sceaux_castle", "monstree")
Pair = Tuple[str, str]


def cpu_model() -> str:
    """The CPU's name and vector extensions, from /proc/cpuinfo (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = re.search(r"^model name\s*:\s*(.*)$", text, re.M)
    flags = set((re.search(r"^flags\s*:\s*(.*)$", text, re.M) or ["", ""])[1].split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16")
    return (f"{name[1] if name else 'unknown CPU'}, {os.cpu_count()} cores, "
            + " ".join(f for f in wanted if f in flags))


def mixed_folder(work: Path) -> Path:
    """WORK/mixed: a symbolic link ``<scene>-<file>`` to each photo of the three scenes."""
    folder = work / "mixed"
    folder.mkdir(parents=True, exist_ok=True)
    for scene in SCENES:
        for photo in sorted((IMAGES / scene).iterdir()):
            link = folder / f"{scene}-{photo.name}"
            if not link.is_symlink():
                link.symlink_to(photo)
    return folder


def scene(name: str) -> str:
    return name.split("-")[0]


def sfm_summary(images: Path, output: Path, features: Path, pairs: str) -> Dict[str, Any]:
    """What a reconstruction gave, kept in OUTPUT/summary.json (a later run reads it)."""
    record = output / "summary.json"
    if record.exists():
        return json.loads(record.read_text())
    output.mkdir(parents=True, exist_ok=True)
    if features is not None and not (output / "features.h5").exists():
        shutil.copyfile(features, output / "features.h5")
    result = reconstruct(images, output, feature=cv2r2d2.R2D2Feature.create(device="cpu"),
                         matching=MatchingOptions(pairs), refinement=RefinementOptions(False),
                         device="cpu")
    summary = summarise(output, result.num_pairs, result.num_verified_pairs, result.seconds)
    record.write_text(json.dumps(summary))
    return summary


def summarise(output: Path, num_pairs: int, num_verified: int, seconds: Dict[str, float]
              ) -> Dict[str, Any]:
    """num_pairs, num_verified_pairs, seconds (per stage), registered (per scene, the
    names in the model holding most of it, and the count in any model), inliers
    ([name0, name1, inlier matches] per verified pair)."""
    pycolmap = import_pycolmap()
    sparse = output / "sparse"
    models = [{image.name for image in pycolmap.Reconstruction(str(folder)).images.values()}
              for folder in sorted(sparse.iterdir()) if folder.is_dir()] if sparse.is_dir() else []
    registered = {}
    for name in SCENES:
        per_model = [sorted(n for n in model if scene(n) == name) for model in models]
        registered[name] = {"best": max(per_model, key=len, default=[]),
                            "anywhere": len(set().union(*per_model))}
    db = pycolmap.Database.open(str(output / "database.db"))
    try:
        ids = {image.image_id: image.name for image in db.read_all_images()}
        inliers = [[ids[a], ids[b], len(geometry.inlier_matches)]
                   for a, b, geometry in verified_matches(db)]
    finally:
        db.close()
    return {"num_pairs": num_pairs, "num_verified_pairs": num_verified, "seconds": seconds,
            "registered": registered, "inliers": inliers}


def recall(selected: Sequence[Pair], wanted: Set[frozenset]) -> float:
    chosen = {frozenset(pair) for pair in selected}
    return len(wanted & chosen) / len(wanted) if wanted else 1.0


def top_k_pairs(similarity: np.ndarray, names: Sequence[str], k: int) -> List[Pair]:
    """Each image with the k others of largest ``similarity`` (N, N), each pair once."""
    similarity = similarity.astype(np.float64)
    np.fill_diagonal(similarity, -np.inf)
    seen = {}
    for i, row in enumerate(similarity):
        for j in np.argsort(-row, kind="stable")[:k]:
            seen.setdefault(frozenset((i, j)), (names[i], names[j]))
    return list(seen.values())


def vlad_similarity(store: H5Features, names: Sequence[str], words: int) -> np.ndarray:
    """(N, N) similarity of VLAD vectors (Arandjelovic and Zisserman 2013: square-root
    power law, intra-normalisation) over a codebook learned as the index learns its own:
    the alternative measured against the bag of words."""
    rng = np.random.default_rng(0)
    descriptors = [retrieval._unit_rows(store.read(name).descriptors) for name in names]
    per_image = int(np.ceil(100_000 / len(names)))
    sample = np.concatenate([d[np.sort(rng.choice(len(d), min(per_image, len(d)), replace=False))]
                             for d in descriptors])
    codebook = retrieval._spherical_kmeans(sample, words, 25, rng)
    vectors = []
    for d in descriptors:
        labels = retrieval._assign(d, codebook)
        sums = np.zeros_like(codebook)
        retrieval._add_rows(sums, labels, d)
        residuals = sums - np.bincount(labels, minlength=words)[:, None] * codebook
        vector = retrieval._unit_rows(np.sign(residuals) * np.sqrt(np.abs(residuals))).ravel()
        vectors.append(vector / max(np.linalg.norm(vector), 1e-12))
    vectors = np.stack(vectors)
    return vectors @ vectors.T


def scale_test(count: int, dimension: int, k: int, work: Path) -> Tuple[float, float]:
    """Seconds and peak numpy memory (MB) of top-k among ``count`` random unit vectors
    stored as the index stores its rows (float16 in an h5 file, read in blocks)."""
    import h5py

    path = work / f"random-{count}x{dimension}.h5"
    if not path.exists():
        rng = np.random.default_rng(0)
        with h5py.File(path, "w") as f:
            data = f.create_dataset("vectors", (count, dimension), np.float16,
                                    chunks=(max(1, 2 ** 19 // dimension), dimension))
            for start in range(0, count, 8192):
                block = rng.standard_normal((min(8192, count - start), dimension), np.float32)
                data[start:start + len(block)] = retrieval._unit_rows(block)
    with h5py.File(path, "r") as f:
        tracemalloc.start()
        start = time.perf_counter()
        top_k_neighbours(f["vectors"], k)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--features", type=Path, default=None)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--min-inliers", type=int, default=50)
    parser.add_argument("--words", default="256,1024,2048",
                        help="bag-of-words codebook sizes to compare")
    parser.add_argument("--vlad-words", default="16,64",
                        help="VLAD codebook sizes to compare ('' for none)")
    parser.add_argument("--extract-sample", type=int, default=3,
                        help="photos whose extraction is timed (a photo of each scene in turn)")
    parser.add_argument("--scale", type=int, default=100_000)
    parser.add_argument("--no-sfm", action="store_true",
                        help="skip the SfM run with retrieval pairs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    images = mixed_folder(args.work)
    print(f"CPU: {cpu_model()}")

    exhaustive = sfm_summary(images, args.work / "exhaustive", args.features, "exhaustive")
    verified = {frozenset((a, b)): count for a, b, count in exhaustive["inliers"]}
    wanted = {pair for pair, count in verified.items() if count >= args.min_inliers}
    features = args.work / "exhaustive" / "features.h5"
    with H5Features(features) as store:
        names = store.names()
    across = sum(len({scene(n) for n in pair}) > 1 for pair in wanted)
    oracle = np.zeros((len(names), len(names)))
    for pair, count in verified.items():
        i, j = (names.index(n) for n in pair)
        oracle[i, j] = oracle[j, i] = count
    print(f"\n{len(names)} photos; exhaustive: {exhaustive['num_pairs']} pairs, "
          f"{len(verified)} verified, {len(wanted)} with >= {args.min_inliers} inliers "
          f"({across} across scenes); choosing each photo's {args.k} pairs of most inliers "
          f"would select {recall(top_k_pairs(oracle, names, args.k), wanted):.3f} of them")

    print(f"\nrecall at K = {args.k} of those {len(wanted)} pairs; pairs selected (across "
          "scenes); share of photos whose same-scene photos all rank first")
    print(f"{'method':>16} {'recall':>7} {'pairs':>10} {'first':>6} {'codebook s':>11} "
          f"{'describe ms/photo':>18}")
    describe_ms = {}

    def report(label: str, pairs: Sequence[Pair], first: float, codebook: str, ms: str) -> None:
        crossing = sum(scene(a) != scene(b) for a, b in pairs)
        print(f"{label:>16} {recall(pairs, wanted):>7.3f} {len(pairs):>5} ({crossing:>2}) "
              f"{first:>6.3f} {codebook:>11} {ms:>18}")

    def same_scene_first(similarity: np.ndarray) -> float:
        similarity = similarity.astype(np.float64)
        np.fill_diagonal(similarity, -np.inf)
        labels = np.array([scene(n) for n in names])
        return float(np.mean([np.all(labels[np.argsort(-row)[:np.sum(labels == labels[i]) - 1]]
                                     == labels[i]) for i, row in enumerate(similarity)]))

    with H5Features(features) as store:
        for words in [int(w) for w in args.words.split(",") if w]:
            path = args.work / f"index-{words}.retrieval.h5"
            start = time.perf_counter()
            index = RetrievalIndex.build(store, path, RetrievalSettings(num_words=words),
                                         overwrite=True)
            total = time.perf_counter() - start
            # The codebook's time: the whole build less a second pass describing the photos.
            start = time.perf_counter()
            vectors = np.stack([index.describe(store.read(name).descriptors)
                                for name in index.names])
            describe = time.perf_counter() - start
            describe_ms[words] = 1000 * describe / len(index)
            report(f"words {words}", index.pairs(args.k), same_scene_first(vectors @ vectors.T),
                   f"{total - describe:.1f}", f"{describe_ms[words]:.1f}")
        for words in [int(w) for w in args.vlad_words.split(",") if w]:
            similarity = vlad_similarity(store, names, words)
            report(f"VLAD {words}", top_k_pairs(similarity, names, args.k),
                   same_scene_first(similarity), "", "")
        default = RetrievalIndex.build(store)
        for k in sorted({args.k, args.k + 2, args.k + 5, args.k + 10}):
            print(f"  default ({default.settings.num_words} words), K = {k}: recall "
                  f"{recall(default.pairs(k), wanted):.3f}, {len(default.pairs(k))} pairs "
                  f"(each photo's {k} of most inliers: "
                  f"{recall(top_k_pairs(oracle, names, k), wanted):.3f})")

    feature = cv2r2d2.R2D2Feature.create(device="cpu")
    photos = list_images([images])
    firsts = [next(path for name, path in photos if scene(name) == s) for s in SCENES]
    sample = (firsts * args.extract_sample)[:args.extract_sample]
    start = time.perf_counter()
    for path in sample:
        detect(feature, read_image(path))
    extract_ms = 1000 * (time.perf_counter() - start) / max(len(sample), 1)
    print(f"\nextraction {extract_ms:.0f} ms/photo ({len(sample)} photos); describing "
          + ", ".join(f"{w} words {ms:.1f} ms ({100 * ms / extract_ms:.2f}%)"
                      for w, ms in describe_ms.items()))

    if not args.no_sfm:
        label = f"retrieval:{args.k}"
        runs = {"exhaustive": exhaustive,
                label: sfm_summary(images, args.work / "retrieval", args.features, label)}
        print(f"\nSfM (paper settings, no refinement): photos registered per scene, in the "
              "model holding most of the scene (in any model)")
        for name, run in runs.items():
            seconds = run["seconds"]
            print(f"  {name:>13}: " + ", ".join(
                f"{s} {len(r['best'])} ({r['anywhere']})" for s, r in run["registered"].items())
                + f"; {run['num_pairs']} pairs, {run['num_verified_pairs']} verified; match "
                f"{seconds['match']:.1f} s, verify {seconds['verify']:.1f} s, map "
                f"{seconds['map']:.1f} s")
        for s in SCENES:
            one, other = (set(runs[n]["registered"][s]["best"]) for n in runs)
            if one != other:
                print(f"  {s}: only exhaustive {sorted(one - other)}, only {label} "
                      f"{sorted(other - one)}")
        ratio = runs[label]["num_pairs"] / exhaustive["num_pairs"]
        print(f"  {label} / exhaustive: pairs {ratio:.3f} (2 K / (N - 1) = "
              f"{2 * args.k / (len(names) - 1):.3f}), match time (retrieval included) "
              f"{runs[label]['seconds']['match'] / exhaustive['seconds']['match']:.3f}")

    dimension = RetrievalSettings().num_words
    seconds, peak = scale_test(args.scale, dimension, args.k, args.work)
    print(f"\nscale: top-{args.k} among {args.scale} random {dimension}-d vectors (float16, "
          f"h5) in {seconds:.1f} s ({1e6 * seconds / args.scale:.0f} us/photo), peak numpy "
          f"memory {peak:.0f} MB; the index stores {2 * dimension} B/photo")


if __name__ == "__main__":
    main()
