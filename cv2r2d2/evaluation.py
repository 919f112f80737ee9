"""HPatches-sequences evaluation, with the protocol of D2-Net that the R2D2 paper reports.

For each sequence (``i_*``: illumination, ``v_*``: viewpoint) image 1 is matched to
images 2..6 by mutual nearest neighbours; a match is correct at threshold t when
image 1's keypoint, mapped by the ground-truth homography ``H_1_k``, lies within t
pixels of its partner. A pair's matching accuracy at t is the fraction of its matches
that are correct (0 for a pair without matches); the mean matching accuracy (MMA) is
the mean over pairs, for ``i_*``, ``v_*`` and all sequences. The 8 sequences whose
images exceed 1600 x 1200 pixels are left out, as D2-Net does.

The detector's repeatability and the matching score count keypoints in the region both
images see only: a keypoint of image a is *visible* when ``H_1_k`` maps it into image
b (an image covers -0.5 .. W - 0.5 by OpenCV's pixel centres), and one of b when the
inverse maps it into a. Of the visible keypoints, with n = min(visible in a, visible
in b), as in the usual (Mikolajczyk et al., SuperPoint) definition:

- repeatability at t: the largest number of one-to-one pairs of a's keypoints mapped
  into b and b's keypoints that lie within t pixels (a maximum bipartite matching),
  over n, so at most 1. Where keypoints lie more than 2 t apart this is the count of
  mutual nearest neighbours in position; unlike that count it does not penalise a
  keypoint found at one place at several scales (R2D2: half of its keypoints have
  another within 1 px), which pairs with its twin in the other image;
- matching score at t: the number of correct descriptor matches (as for the MMA)
  between visible keypoints, over the same n.

Both are averaged over pairs as the MMA is, and are 0 for a pair without visible
keypoints. Metrics are functions of one image pair (:class:`PairData`) listed in
:data:`METRICS`.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from .image import read_image
from .utils import PathLike, atomic_path, import_optional, progress, torch_device
from .matching import mutual_nearest_neighbours
from .steerers import rotation_angles

__all__ = [
    "HIGH_RESOLUTION_SEQUENCES",
    "THRESHOLDS",
    "PairData",
    "mean_matching_accuracy",
    "homography_matching_accuracy",
    "parity_figures",
    "project",
    "visible_keypoints",
    "repeatability",
    "matching_score",
    "METRICS",
    "list_sequences",
    "evaluate_hpatches",
    "format_table",
    "write_json",
    "plot_metrics",
]

logger = logging.getLogger(__name__)

HIGH_RESOLUTION_SEQUENCES = frozenset({
    "i_contruction", "i_crownnight", "i_dc", "i_pencils", "i_whitebuilding",
    "v_artisans", "v_astronautis", "v_talent",
})
"""The HPatches sequences D2-Net's protocol leaves out (high-resolution images)."""
THRESHOLDS = tuple(range(1, 11))
"""The metrics' pixel thresholds: 1 to 10."""
KINDS = {"i": "illumination", "v": "viewpoint"}


@dataclass
class PairData:
    """Image 1 and image k of a sequence, their keypoints and matches.

    Attributes:
        keypoints_a: (Na, 2) x, y in pixels.
        keypoints_b: (Nb, 2) x, y in pixels.
        matches: (M, 2) indices (in a, in b).
        homography: (3, 3) maps image a's pixels to image b's.
        size_a: (width, height) of image a.
        size_b: (width, height) of image b.
    """

    keypoints_a: np.ndarray
    keypoints_b: np.ndarray
    matches: np.ndarray
    homography: np.ndarray
    size_a: Tuple[int, int]
    size_b: Tuple[int, int]


def project(points: np.ndarray, homography: np.ndarray) -> np.ndarray:
    """(N, 2) points mapped by a (3, 3) homography, in the points' units (pixels)."""
    mapped = np.concatenate([points, np.ones((len(points), 1))], axis=1) @ homography.T
    return mapped[:, :2] / mapped[:, 2:]


def _errors(pair: PairData, matches: np.ndarray) -> np.ndarray:
    """(M,) distances in pixels in image b between each match's b keypoint and its a
    keypoint mapped by the homography."""
    projected = project(pair.keypoints_a[matches[:, 0]].astype(np.float64), pair.homography)
    return np.linalg.norm(projected - pair.keypoints_b[matches[:, 1]], axis=1)


def _within(errors: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """(T, M) whether each error is within each threshold."""
    return errors[None, :] <= np.asarray(thresholds, np.float64)[:, None]


def _inside(points: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(N,) whether (N, 2) points lie in an image of size (width, height)."""
    width, height = size
    x, y = points[:, 0], points[:, 1]
    return (x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)


def visible_keypoints(pair: PairData) -> Tuple[np.ndarray, np.ndarray, int]:
    """(Na,), (Nb,) whether each keypoint lies in the region both images see, and the
    smaller of the two counts."""
    in_b = _inside(project(pair.keypoints_a.astype(np.float64), pair.homography), pair.size_b)
    in_a = _inside(project(pair.keypoints_b.astype(np.float64), np.linalg.inv(pair.homography)),
                   pair.size_a)
    return in_b, in_a, int(min(in_b.sum(), in_a.sum()))


def mean_matching_accuracy(pair: PairData, thresholds: Sequence[float]) -> np.ndarray:
    """The fraction of the pair's matches within each threshold (pixels) of the truth.

    Returns:
        (T,) float64, zeros for a pair without matches.
    """
    if not len(pair.matches):
        return np.zeros(len(thresholds))
    return _within(_errors(pair, pair.matches), thresholds).mean(axis=1)


def homography_matching_accuracy(
    xy_a: np.ndarray, descriptors_a: np.ndarray, xy_b: np.ndarray, descriptors_b: np.ndarray,
    homography: np.ndarray, size_a: Tuple[int, int], size_b: Tuple[int, int],
    thresholds: Sequence[float], visible_only: bool = False,
) -> np.ndarray:
    """MMA of two images' features under a known homography: their mutual nearest
    neighbours (L2), scored by :func:`mean_matching_accuracy`.

    Args:
        xy_a: (N, 2) keypoint positions of image a, pixels.
        descriptors_a: (N, D) float32, image a's.
        xy_b: (N, 2) keypoint positions of image b, pixels.
        descriptors_b: (N, D) float32, image b's.
        homography: (3, 3) maps image a's pixels to image b's.
        size_a: (W, H) of image a.
        size_b: (W, H) of image b.
        visible_only: match only the keypoints the other image sees (as the HPatches
            protocol of :func:`visible_keypoints` counts them).

    Returns:
        (len(thresholds),) the fraction of matches within each threshold (pixels).
    """
    a, b = np.arange(len(xy_a)), np.arange(len(xy_b))
    if visible_only:
        a, b, _ = visible_keypoints(PairData(xy_a, xy_b, np.zeros((0, 2), np.int64), homography,
                                             size_a, size_b))
    matches, _ = mutual_nearest_neighbours(descriptors_a[a], descriptors_b[b])
    pair = PairData(xy_a[a], xy_b[b], matches, homography, size_a, size_b)
    return mean_matching_accuracy(pair, thresholds)


def _one_to_one(points_a: np.ndarray, points_b: np.ndarray,
                thresholds: Sequence[float]) -> np.ndarray:
    """(T,) the largest number of one-to-one pairs of (Na, 2) and (Nb, 2) points lying
    within each threshold of each other (a maximum bipartite matching, Hopcroft-Karp)."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching
    from scipy.spatial import cKDTree

    near = cKDTree(points_a).sparse_distance_matrix(cKDTree(points_b), max(thresholds),
                                                    output_type="ndarray")
    counts = []
    for threshold in thresholds:
        edges = near[near["v"] <= threshold]
        graph = csr_matrix((np.ones(len(edges)), (edges["i"], edges["j"])),
                           shape=(len(points_a), len(points_b)))
        counts.append(int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum()))
    return np.asarray(counts, np.float64)


def repeatability(pair: PairData, thresholds: Sequence[float]) -> np.ndarray:
    """Keypoints found again: one-to-one pairs of a's keypoints mapped into b and b's
    keypoints within each threshold (pixels), over the smaller count of visible
    keypoints (module docstring).

    Returns:
        (T,) float64 in [0, 1], zeros for a pair without visible keypoints.
    """
    visible_a, visible_b, count = visible_keypoints(pair)
    if not count:
        return np.zeros(len(thresholds))
    projected = project(pair.keypoints_a[visible_a].astype(np.float64), pair.homography)
    found = _one_to_one(projected, pair.keypoints_b[visible_b].astype(np.float64), thresholds)
    return found / count


def matching_score(pair: PairData, thresholds: Sequence[float]) -> np.ndarray:
    """Correct matches between visible keypoints at each threshold (pixels), over the
    smaller count of visible keypoints (module docstring).

    Returns:
        (T,) float64 in [0, 1], zeros for a pair without visible keypoints.
    """
    visible_a, visible_b, count = visible_keypoints(pair)
    if not count:
        return np.zeros(len(thresholds))
    matches = pair.matches[visible_a[pair.matches[:, 0]] & visible_b[pair.matches[:, 1]]]
    return _within(_errors(pair, matches), thresholds).sum(axis=1) / count


Metric = Callable[[PairData, Sequence[float]], np.ndarray]
METRICS: Mapping[str, Metric] = MappingProxyType({
    "mma": mean_matching_accuracy,
    "repeatability": repeatability,
    "matching_score": matching_score,
})
"""The metrics by name: ``mma``, ``repeatability``, ``matching_score``."""


def parity_figures(keypoints: Sequence[cv2.KeyPoint], descriptors: np.ndarray,
                   reference: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """How closely keypoints and descriptors reproduce the original implementation's.

    Reference rows (``keypoints`` (N, 3) x, y, size; ``scores``; ``descriptors``, as in
    ../shared/reference's npz files) are matched to ours by (x, y, size) within 1e-3.

    Returns:
        ``overlap`` (fraction of reference keypoints found), ``max_score_error`` and
        ``min_cosine`` (over the found ones), ``count`` (ours, the reference's).
    """
    from scipy.spatial import cKDTree

    ours = np.array([(k.pt[0], k.pt[1], k.size) for k in keypoints], np.float64).reshape(-1, 3)
    scores = np.array([k.response for k in keypoints], np.float32)
    distance, index = cKDTree(ours).query(np.asarray(reference["keypoints"], np.float64))
    found = distance <= 1e-3
    matched = index[found]
    return {
        "overlap": float(found.mean()),
        "max_score_error": float(np.abs(scores[matched] - reference["scores"][found]).max()),
        "min_cosine": float(
            np.einsum("ij,ij->i", descriptors[matched], reference["descriptors"][found]).min()
        ),
        "count": (len(keypoints), len(reference["scores"])),
    }


def list_sequences(root: PathLike) -> List[Path]:
    """The ``i_*`` and ``v_*`` sequence folders of ``root``, less the high-resolution ones.

    Raises:
        ValueError: no sequence, or a sequence lacking one of 1..6.ppm or H_1_2..H_1_6.
    """
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"no such HPatches folder: {root}")
    sequences = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name[:2] not in ("i_", "v_"):
            continue
        if path.name in HIGH_RESOLUTION_SEQUENCES:
            logger.info("leaving out %s (high resolution, as D2-Net does)", path.name)
            continue
        wanted = [f"{k}.ppm" for k in range(1, 7)] + [f"H_1_{k}" for k in range(2, 7)]
        missing = [name for name in wanted if not (path / name).is_file()]
        if missing:
            raise ValueError(f"{path} is not an HPatches sequence: missing {', '.join(missing)}")
        sequences.append(path)
    if not sequences:
        raise ValueError(f"no HPatches sequences (i_* or v_* folders) in {root}")
    return sequences


def _detect(feature: Any, image: np.ndarray) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    keypoints, descriptors = feature.detectAndCompute(image, None)
    return cv2.KeyPoint_convert(keypoints).reshape(-1, 2), descriptors


def _sequence_pairs(path: Path, feature: Any, device: Optional[str],
                    rotations: int = 1) -> Tuple[List[PairData], List[int]]:
    """The five pairs of one sequence and each image's keypoint count."""
    images = [read_image(path / f"{k}.ppm") for k in range(1, 7)]
    detected = [_detect(feature, image) for image in images]
    norm = feature.defaultNorm()
    steering = dict(rotations=rotations, steerers=feature) if _steered(feature, rotations) else {}
    keypoints_a, descriptors_a = detected[0]
    pairs = []
    for k in range(2, 7):
        keypoints_b, descriptors_b = detected[k - 1]
        if descriptors_a is None or descriptors_b is None:
            matches = np.zeros((0, 2), np.int64)
        else:
            matches, _ = mutual_nearest_neighbours(descriptors_a, descriptors_b, norm,
                                                   device=device, **steering)
        pairs.append(PairData(
            keypoints_a, keypoints_b, matches, np.loadtxt(path / f"H_1_{k}").reshape(3, 3),
            images[0].shape[1::-1], images[k - 1].shape[1::-1],
        ))
    return pairs, [len(keypoints) for keypoints, _ in detected]


def _steered(feature: Any, rotations: int) -> bool:
    """Whether ``feature`` is matched with steerers: an R2D2 method, rotations > 1."""
    return rotations != 1 and hasattr(feature, "getSteerers")


def _by_kind(values: Dict[str, List[Any]]) -> Dict[str, Any]:
    """Means per kind ('i', 'v') and overall of per-pair values (scalars or arrays)."""
    out = {}
    for kind in ("i", "v", "overall"):
        chosen = values["i"] + values["v"] if kind == "overall" else values[kind]
        mean = np.mean(chosen, axis=0) if chosen else None
        out[kind] = None if mean is None else np.asarray(mean).tolist()
    return out


def evaluate_hpatches(
    root: PathLike,
    methods: Mapping[str, Any],
    thresholds: Sequence[float] = THRESHOLDS,
    metrics: Sequence[str] = tuple(METRICS),
    device: Optional[str] = None,
    show_progress: bool = False,
    rotations: int = 1,
) -> Dict[str, Any]:
    """Evaluate feature methods on the HPatches sequences in ``root``.

    Args:
        root: ``hpatches-sequences-release`` or any folder of such sequences.
        methods: name -> an object with ``detectAndCompute(image, mask)`` and
            ``defaultNorm()``: ``cv2r2d2.R2D2Feature``, ``cv2.SIFT_create()``...
        thresholds: pixel thresholds (default 1..10).
        metrics: names from :data:`METRICS` (default: all).
        device: the matcher's torch device.
        rotations: > 1: R2D2 methods match with their steerers, estimating each
            pair's in-plane rotation among ``rotations`` angles
            (:func:`cv2r2d2.matching.match_batch`); SIFT and ORB match as they are.

    Returns:
        A JSON-ready dict: ``thresholds``, ``metrics``, ``sequences`` (counts per kind),
        and per method the metrics (per kind: a list over thresholds), mean
        ``keypoints`` per image and mean ``matches`` per pair (per kind).
    """
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
    if not methods:
        raise ValueError("no methods to evaluate")
    torch_device(device)  # before the first method's extractions
    rotation_angles(rotations)
    sequences = list_sequences(root)
    results: Dict[str, Any] = {
        "protocol": "HPatches sequences, D2-Net protocol (mutual nearest neighbours, "
                    "8 high-resolution sequences left out); repeatability and matching "
                    "score over the smaller count of keypoints in the common region",
        "thresholds": list(thresholds),
        "metrics": list(metrics),
        "rotations": rotations,
        "sequences": {kind: sum(p.name.startswith(kind + "_") for p in sequences) for kind in KINDS},
        "methods": {},
    }
    for method, feature in methods.items():
        scores: Dict[str, Dict[str, List[Any]]] = {m: {"i": [], "v": []} for m in metrics}
        counts: Dict[str, List[int]] = {"i": [], "v": []}
        matches: Dict[str, List[int]] = {"i": [], "v": []}
        for path in progress(sequences, len(sequences), show_progress, method, unit="sequence"):
            kind = path.name[0]
            pairs, keypoint_counts = _sequence_pairs(path, feature, device, rotations)
            counts[kind] += keypoint_counts
            for pair in pairs:
                matches[kind].append(len(pair.matches))
                for metric in metrics:
                    scores[metric][kind].append(METRICS[metric](pair, thresholds))
        results["methods"][method] = {
            **{metric: _by_kind(scores[metric]) for metric in metrics},
            "keypoints": _by_kind(counts),
            "matches": _by_kind(matches),
        }
    return results


def _label(metric: str) -> str:
    return metric.replace("_", " ").upper()


def _chosen(results: Mapping[str, Any], metrics: Union[None, str, Sequence[str]]) -> List[str]:
    """The metrics to show: all evaluated (None), one name, or names."""
    chosen = list(results["metrics"] if metrics is None else
                  [metrics] if isinstance(metrics, str) else metrics)
    missing = [m for m in chosen if m not in results["metrics"]]
    if missing:
        raise ValueError(f"metrics {missing} were not evaluated; the results hold "
                         f"{', '.join(results['metrics'])}")
    return chosen


def format_table(results: Mapping[str, Any],
                 metrics: Union[None, str, Sequence[str]] = None) -> str:
    """The results as text: per metric (default: all evaluated), a table with one row
    per method and kind."""
    thresholds = results["thresholds"]
    header = f"{'method':<10} {'sequences':<13} {'kpts':>7} {'matches':>8}  " + \
        " ".join(f"@{t:<5g}" for t in thresholds)
    lines: List[str] = []
    for metric in _chosen(results, metrics):
        if lines:
            lines.append("")
        lines += [f"{_label(metric)} on HPatches ({results['sequences']['i']} i_, "
                  f"{results['sequences']['v']} v_ sequences)", header]
        for method, scores in results["methods"].items():
            for kind, label in (*KINDS.items(), ("overall", "overall")):
                values = scores[metric][kind]
                if values is None:
                    continue
                lines.append(
                    f"{method:<10} {label:<13} {scores['keypoints'][kind]:>7.0f} "
                    f"{scores['matches'][kind]:>8.0f}  " + " ".join(f"{v:<6.3f}" for v in values)
                )
    return "\n".join(lines)


def write_json(results: Mapping[str, Any], path: PathLike) -> None:
    """Write the results as JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def plot_metrics(results: Mapping[str, Any], path: PathLike,
                 metrics: Union[None, str, Sequence[str]] = None) -> None:
    """Plot each metric (default: all evaluated, a row each) against the threshold,
    overall, for illumination and for viewpoint, as the paper's MMA figure does, into a
    PNG file of 1200 x 400 pixels per row, atomically. Needs matplotlib."""
    import_optional("matplotlib", "the HPatches plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = _chosen(results, metrics)
    # A Figure without pyplot keeps matplotlib's global state untouched.
    figure = Figure(figsize=(12, 4 * len(metrics)), dpi=100)
    FigureCanvasAgg(figure)
    thresholds = results["thresholds"]
    for row, metric in enumerate(metrics):
        for column, (kind, title) in enumerate((("overall", "Overall"), ("i", "Illumination"),
                                                 ("v", "Viewpoint"))):
            axes = figure.add_subplot(len(metrics), 3, 3 * row + column + 1)
            for method, scores in results["methods"].items():
                if scores[metric][kind] is not None:
                    axes.plot(thresholds, scores[metric][kind], linewidth=2, label=method)
            axes.set_title(title)
            axes.set_xlabel("threshold [px]")
            axes.set_xlim(thresholds[0], thresholds[-1])
            axes.set_ylim(0, 1)
            axes.grid(True)
            if column == 0:
                axes.set_ylabel(_label(metric))
                axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
