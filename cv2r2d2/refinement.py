"""Featuremetric keypoint refinement for structure from motion.

Before triangulation, the keypoints of each track (a connected set of verified matches
across images) are moved so that R2D2's dense descriptors sampled at them agree across
the track: the keypoint adjustment of Lindenberger, Sarlin, Larsson and Pollefeys,
"Pixel-Perfect Structure-from-Motion with Featuremetric Refinement" (ICCV 2021), with
R2D2's own descriptor map as the dense features.

- :func:`build_tracks`: tracks from matches by union-find; a match that would put two
  keypoints of one image into a track is left out (the track splits at its weakest
  matches, as matches are joined best first).
- :func:`adjust_windows`: the optimisation on descriptor windows, in numpy.
- :func:`refine_keypoints`: windows around each track keypoint (the network runs once
  per image and pyramid level the tracks call for, on the box of their keypoints in
  each tile; only the windows are kept), then :func:`adjust_windows`. With
  ``RefinementParams.upsample`` > 1 the pyramid reaches levels finer than the
  extraction's; the network may be another than the extractor's (an int8 export).

:func:`cv2r2d2.sfm.refine_database` runs the same on the verified matches of a COLMAP
database, whose keypoints it updates, with a cache file so that a rerun does not redo it.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .checks import check_count, check_flag, check_upsample
from .params import inside_image
from .pyramid import upsampled_pyramid
from .image import read_image
from .utils import PathLike, progress

if TYPE_CHECKING:
    from .feature2d import R2D2Feature

__all__ = [
    "RefinementParams",
    "RefinementReport",
    "Tracks",
    "build_tracks",
    "window_offsets",
    "adjust_windows",
    "scale_matched_sizes",
    "refine_keypoints",
]

logger = logging.getLogger(__name__)



@dataclass
class RefinementParams:
    """Keypoint refinement settings (lengths in pixels of the refinement level's map).

    Attributes:
        window_radius: descriptors are sampled on the integer grid of offsets
            [-window_radius, window_radius]^2 around each keypoint.
        max_displacement: a keypoint moves at most this far from where it was detected.
        iterations: rounds of (track targets, then every keypoint's best position).
        loss_scale: scale of the Cauchy loss on a keypoint's descriptor distance to its
            track's target (distances of unit vectors lie in [0, 2]).
        min_inliers: image pairs with fewer verified matches give no tracks (COLMAP's
            mapper leaves such pairs out too).
        half: keep the windows in float16 (half the memory).
        upsample: the refinement's pyramid is the extraction's extended by finer levels,
            down to this factor times the finest's resolution
            (:func:`cv2r2d2.pyramid.upsampled_pyramid`): 2 refines the tracks' finest
            members at twice it. Use :meth:`upsampled` to scale the window with it.
        subcell_step: a keypoint's position between the window's samples is searched on
            a grid of this step (window pixels) around its best sample, on the bilinear
            interpolation of the descriptors.
    """

    window_radius: int = 2
    max_displacement: float = 1.5
    iterations: int = 3
    loss_scale: float = 0.25
    min_inliers: int = 15
    half: bool = True
    upsample: float = 1.0
    subcell_step: float = 0.0625

    def __post_init__(self) -> None:
        check_count(self.window_radius, "window_radius")
        if not 0 < self.max_displacement <= self.window_radius - 0.5:
            raise ValueError(f"max_displacement must lie in (0, window_radius - 0.5 = "
                             f"{self.window_radius - 0.5}], got {self.max_displacement!r}")
        for name in ("iterations", "min_inliers"):
            check_count(getattr(self, name), name)
        if not self.loss_scale > 0:
            raise ValueError(f"loss_scale must be > 0, got {self.loss_scale!r}")
        if isinstance(self.subcell_step, bool) or not isinstance(self.subcell_step, (int, float, np.number)):
            raise TypeError(f"subcell_step must be a number, got {self.subcell_step!r}")
        if not 0 < self.subcell_step <= 1:
            raise ValueError(f"subcell_step must lie in (0, 1], got {self.subcell_step!r}")
        check_flag(self.half, "half")
        self.upsample = check_upsample(self.upsample)

    @classmethod
    def upsampled(cls, upsample: float, **kwargs: Any) -> "RefinementParams":
        """Settings refining on a pyramid ``upsample`` times finer, with the window and the
        displacement bound scaled to cover the same image pixels as the defaults on the
        extraction's pyramid: ``window_radius = round(2 * upsample)``,
        ``max_displacement = window_radius - 0.5`` (``upsample=2``: 4 and 3.5, the
        ``sfm`` preset's, measured in docs/benchmarks.md); other settings as ``kwargs``
        give them."""
        radius = max(1, int(round(2 * check_upsample(upsample))))
        kwargs.setdefault("window_radius", radius)
        kwargs.setdefault("max_displacement", kwargs["window_radius"] - 0.5)
        return cls(upsample=upsample, **kwargs)


@dataclass
class RefinementReport:
    """What a refinement did.

    Attributes:
        num_tracks: tracks (of 2 or more keypoints).
        num_observations: the keypoints of those tracks.
        num_conflicts: matches left out because they would have joined two keypoints of
            one image in a track.
        num_outside: track keypoints outside their image (or not finite), e.g. stored by
            an older version or another tool: left where they are, and without a say in
            their track's target.
        median_displacement: of the moved keypoints, image pixels.
        window_bytes: memory of the descriptor windows.
        seconds: time spent by the network (``network``) and the optimisation
            (``adjust``).
        cached: the result came from the cache file.
    """

    num_tracks: int = 0
    num_observations: int = 0
    num_conflicts: int = 0
    num_outside: int = 0
    median_displacement: float = 0.0
    window_bytes: int = 0
    seconds: Dict[str, float] = field(default_factory=dict)
    cached: bool = False


# --- tracks ------------------------------------------------------------------------


@dataclass
class Tracks:
    """Keypoints grouped into tracks, track by track.

    Attributes:
        images: (M,) int64 image index of each observation.
        keypoints: (M,) int64 keypoint index, in its image, of each observation.
        starts: (T + 1,) int64: track t holds observations ``starts[t]:starts[t + 1]``.
        num_conflicts: matches left out because they would have put two keypoints of
            one image into a track.
    """

    images: np.ndarray
    keypoints: np.ndarray
    starts: np.ndarray
    num_conflicts: int = 0

    def __len__(self) -> int:
        return len(self.starts) - 1

    def lengths(self) -> np.ndarray:
        """(T,) observations per track."""
        return np.diff(self.starts)

    def track_of(self) -> np.ndarray:
        """(M,) track index of each observation."""
        return np.repeat(np.arange(len(self)), self.lengths())


def _check_edges(edges: Any, scores: Any) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    edges = np.asarray(edges)
    if edges.size == 0:
        edges = edges.reshape(0, 4)
    if edges.ndim != 2 or edges.shape[1] != 4 or not np.issubdtype(edges.dtype, np.integer):
        raise TypeError(f"edges must be an E x 4 integer array (image0, keypoint0, image1, "
                        f"keypoint1), got {edges.dtype} {edges.shape}")
    if (edges < 0).any():
        raise ValueError("edges must hold indices >= 0")
    same = edges[:, 0] == edges[:, 2]
    if same.any():
        raise ValueError(f"a match must join two images, got one within image "
                         f"{int(edges[same][0, 0])}")
    if scores is not None:
        scores = np.asarray(scores, np.float64).reshape(-1)
        if len(scores) != len(edges):
            raise ValueError(f"scores must hold one score per edge ({len(edges)}), got "
                             f"{len(scores)}")
    return edges.astype(np.int64), scores


def build_tracks(edges: np.ndarray, scores: Optional[np.ndarray] = None) -> Tracks:
    """Tracks: the connected keypoints of a match graph, at most one keypoint per image.

    Matches are joined by union-find, best score first (in the given order without
    scores); a match that would join two tracks sharing an image is left out, so a
    track that would hold two keypoints of one image splits at its weakest matches.

    Args:
        edges: (E, 4) integer (image0, keypoint0, image1, keypoint1) per match.
        scores: (E,) higher is better (e.g. descriptor similarity); None: given order.

    Returns:
        :class:`Tracks` of 2 or more keypoints, each sorted by image, ordered by their
        first keypoint.
    """
    edges, scores = _check_edges(edges, scores)
    ends = np.concatenate([edges[:, :2], edges[:, 2:]])
    nodes, inverse = np.unique(ends, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    first, second = inverse[:len(edges)].tolist(), inverse[len(edges):].tolist()
    order = np.argsort(-scores, kind="stable") if scores is not None else range(len(edges))
    parent = list(range(len(nodes)))
    images: List[Optional[set]] = [{image} for image in nodes[:, 0].tolist()]

    def find(node: int) -> int:
        root = node
        while parent[root] != root:
            root = parent[root]
        while parent[node] != root:
            parent[node], node = root, parent[node]
        return root

    conflicts = 0
    for edge in order:
        a, b = find(first[edge]), find(second[edge])
        if a == b:
            continue
        if len(images[a]) < len(images[b]):
            a, b = b, a
        if not images[a].isdisjoint(images[b]):
            conflicts += 1
            continue
        parent[b] = a
        images[a] |= images[b]
        images[b] = None
    roots = np.array([find(node) for node in range(len(nodes))], np.int64)
    _, label, count = np.unique(roots, return_inverse=True, return_counts=True)
    # A track is named by its first node; nodes are sorted by (image, keypoint), so
    # sorting by (name, node) orders tracks by their first keypoint, each by image.
    first_node = np.full(len(count), len(nodes), np.int64)
    np.minimum.at(first_node, label, np.arange(len(nodes)))
    name = first_node[label]
    kept = np.flatnonzero(count[label] >= 2)
    kept = kept[np.lexsort((kept, name[kept]))]
    breaks = np.flatnonzero(np.diff(name[kept]) != 0) + 1
    starts = np.concatenate([[0], breaks, [len(kept)]]) if len(kept) else np.zeros(1)
    return Tracks(images=nodes[kept, 0], keypoints=nodes[kept, 1],
                  starts=starts.astype(np.int64), num_conflicts=conflicts)


# --- the optimisation ----------------------------------------------------------------


def window_offsets(radius: int) -> np.ndarray:
    """(K, 2) float32 (dx, dy) of the integer grid [-radius, radius]^2, row-major (dy
    outer), K = (2 radius + 1)^2: the window layout :func:`adjust_windows` expects."""
    steps = np.arange(-radius, radius + 1, dtype=np.float32)
    dy, dx = np.meshgrid(steps, steps, indexing="ij")
    return np.stack([dx.reshape(-1), dy.reshape(-1)], axis=1)


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


def _interpolate(windows: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Unit descriptors at (dx, dy) from each window's centre, bilinear: (M, D) float32."""
    side = windows.shape[1]
    x = delta[:, 0] + side // 2
    y = delta[:, 1] + side // 2
    x0 = np.clip(np.floor(x), 0, side - 2).astype(np.int64)
    y0 = np.clip(np.floor(y), 0, side - 2).astype(np.int64)
    fx = (x - x0)[:, None].astype(np.float32)
    fy = (y - y0)[:, None].astype(np.float32)
    m = np.arange(len(windows))

    def at(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        return windows[m, yy, xx].astype(np.float32)

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return _normalise(top * (1 - fy) + bottom * fy)


def _subcell_peaks(square: np.ndarray, similarity: np.ndarray, iy: np.ndarray, ix: np.ndarray,
                   step: float, chunk: int = 4096) -> np.ndarray:
    """(M, 2) sub-sample (dx, dy), within [-1, 1]^2, from interior grid maxima (iy, ix)
    of (M, h, w, D) windows to the best cosine similarity with each row's target of the
    descriptor as :func:`_interpolate` reads it (bilinear in the four samples around,
    then normalised), searched on a grid of ``step`` over the four cells around (iy, ix).
    ``similarity`` (M, h, w) holds the samples' similarities with the targets.

    The similarity of the normalised bilinear mix of samples d_i with weights w_i is
    (w . s) / sqrt(w^T G w), s_i = d_i . target, G the Gram matrix of the d_i: per
    cell, 4 similarities and a 4 x 4 Gram matrix give every position's value."""
    f = np.arange(0, 1 + 1e-6, step, dtype=np.float32)
    fy, fx = (grid.reshape(-1) for grid in np.meshgrid(f, f, indexing="ij"))
    # Bilinear weights of the corners (top-left, top-right, bottom-left, bottom-right).
    weights = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], axis=1)
    out = np.zeros((len(square), 2), np.float32)
    for start in range(0, len(square), chunk):
        rows = np.arange(start, min(start + chunk, len(square)))
        ys = iy[rows, None, None] + np.arange(-1, 2)[:, None]
        xs = ix[rows, None, None] + np.arange(-1, 2)
        block = square[rows[:, None, None], ys, xs].astype(np.float32)  # (m, 3, 3, D)
        samples = similarity[rows[:, None, None], ys, xs]  # (m, 3, 3)
        best = np.full(len(rows), -np.inf, np.float32)
        for cy in (0, 1):
            for cx in (0, 1):
                corners = block[:, cy:cy + 2, cx:cx + 2].reshape(len(rows), 4, -1)
                gram = np.matmul(corners, corners.transpose(0, 2, 1))
                numerator = samples[:, cy:cy + 2, cx:cx + 2].reshape(len(rows), 4) @ weights.T
                norm2 = np.einsum("pi,mij,pj->mp", weights, gram, weights, optimize=True)
                value = numerator / np.sqrt(np.maximum(norm2, 1e-12))
                k = value.argmax(axis=1)
                top = value[np.arange(len(rows)), k]
                better = top > best
                best = np.where(better, top, best)
                offset = np.stack([fx[k] + cx - 1, fy[k] + cy - 1], axis=1)
                out[rows] = np.where(better[:, None], offset, out[rows])
    return out


def _similarities(windows: np.ndarray, targets: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """(M, K) cosine similarity of each window sample with its row's target."""
    flat = windows.reshape(len(windows), -1, windows.shape[-1])
    out = np.empty(flat.shape[:2], np.float32)
    for start in range(0, len(flat), chunk):
        part = slice(start, start + chunk)
        out[part] = np.matmul(flat[part].astype(np.float32), targets[part, :, None])[..., 0]
    return out


def _track_means(vectors: np.ndarray, weights: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(M, D) unit weighted mean of each observation's track, row for row."""
    sums = np.add.reduceat(vectors * weights[:, None], starts[:-1], axis=0)
    return _normalise(np.repeat(sums, np.diff(starts), axis=0))


def adjust_windows(
    windows: np.ndarray,
    starts: np.ndarray,
    params: RefinementParams = RefinementParams(),
    movable: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Move each observation to where its descriptor agrees best with its track.

    Each round takes every track's robust mean descriptor (Cauchy weights of the
    members' distances to the previous mean) as its target, then moves every member to
    the best cosine similarity with that target on its window's integer grid, refined to
    the best similarity of the bilinearly interpolated descriptor within one sample of it
    (on a grid of ``params.subcell_step``), within ``max_displacement`` of the centre.
    The members converge on a common place: the features' consensus, with no keypoint
    singled out as reference.

    Args:
        windows: (M, K, D) unit descriptors, K = (2 r + 1)^2 in :func:`window_offsets`
            order (r = ``params.window_radius``), observations grouped by track.
        starts: (T + 1,) track t holds observations ``starts[t]:starts[t + 1]``.
        movable: (M,) bool, False for observations that stay (e.g. whose window
            leaves the image); None: all move.

    Returns:
        (M, 2) float32 (dx, dy) displacements in window pixels, and (M,) float32 the
        final cosine similarity of each observation with its track's target.
    """
    side = 2 * params.window_radius + 1
    if windows.ndim != 3 or windows.shape[1] != side * side:
        raise ValueError(f"windows must be M x {side * side} x D for window_radius "
                         f"{params.window_radius}, got {windows.shape}")
    starts = np.asarray(starts, np.int64)
    if len(starts) < 1 or starts[0] != 0 or starts[-1] != len(windows) or (np.diff(starts) < 1).any():
        raise ValueError("starts must rise from 0 to the number of windows, one track of "
                         "at least one observation per step")
    count = len(windows)
    movable = np.ones(count, bool) if movable is None else np.asarray(movable, bool)
    delta = np.zeros((count, 2), np.float32)
    if count == 0:
        return delta, np.zeros(0, np.float32)
    grid = window_offsets(params.window_radius)
    # Candidates keep a neighbour on every side, for the sub-sample search.
    inner = (np.abs(grid) <= params.window_radius - 1).all(axis=1)
    allowed = inner & (np.hypot(grid[:, 0], grid[:, 1]) <= params.max_displacement)
    square = windows.reshape(count, side, side, -1)
    descriptors = _interpolate(square, delta)
    weights = np.ones(count, np.float32)
    targets = _track_means(descriptors, weights, starts)
    for _ in range(params.iterations):
        similarity = _similarities(windows, targets)
        best = np.where(allowed, similarity, -np.inf).argmax(axis=1)
        iy, ix = np.divmod(best, side)
        moved = np.stack([ix, iy], axis=1) - params.window_radius + _subcell_peaks(
            square, similarity.reshape(count, side, side), iy, ix, params.subcell_step)
        length = np.hypot(moved[:, 0], moved[:, 1])
        moved *= np.minimum(1, params.max_displacement / np.maximum(length, 1e-12))[:, None]
        delta = np.where(movable[:, None], moved, 0).astype(np.float32)
        descriptors = _interpolate(square, delta)
        distance2 = np.maximum(0, 2 - 2 * (descriptors * targets).sum(axis=1))
        weights = (1 / (1 + distance2 / params.loss_scale**2)).astype(np.float32)
        targets = _track_means(descriptors, weights, starts)
    return delta, (descriptors * targets).sum(axis=1).astype(np.float32)


# --- on images -----------------------------------------------------------------------


def _per_image(name: str, arrays: Sequence[Any], shapes: Sequence[Tuple[int, ...]],
               dtype: Any = np.float32) -> List[np.ndarray]:
    if len(arrays) != len(shapes):
        raise ValueError(f"{name} must hold one array per image ({len(shapes)}), got {len(arrays)}")
    checked = []
    for i, (array, shape) in enumerate(zip(arrays, shapes)):
        array = np.asarray(array)
        if array.shape != shape:
            raise ValueError(f"{name}[{i}] must have shape {shape}, got {array.shape}")
        checked.append(array.astype(dtype))
    return checked


def _check_edges_in(edges: np.ndarray, counts: Sequence[int]) -> None:
    for column in (0, 2):
        if len(edges) and edges[:, column].max() >= len(counts):
            raise ValueError(f"edges name image {int(edges[:, column].max())}, but there are "
                             f"{len(counts)} images")
        for i in np.unique(edges[:, column]).tolist():
            largest = edges[edges[:, column] == i, column + 1].max()
            if largest >= counts[i]:
                raise ValueError(f"edges name keypoint {int(largest)} of image {i}, which has "
                                 f"{counts[i]}")


def _finest_sizes(feature: "R2D2Feature", image_sizes: Sequence[Tuple[int, int]],
                  upsample: float = 1.0) -> np.ndarray:
    """(n,) keypoint size, image pixels, of each image's finest processed level of the
    refinement's pyramid (nan: none)."""
    params = feature.getConfig().params
    finest = []
    for width, height in image_sizes:
        levels = [level for level in upsampled_pyramid(int(height), int(width), params, upsample)
                  if level.processed]
        finest.append(levels[0].size / upsample if levels else np.nan)
    return np.array(finest, np.float64)


def scale_matched_sizes(sizes: np.ndarray, finest: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sizes choosing the level on which to refine each observation of each track.

    Where a track's keypoints were detected at different sizes, its images see the place
    at different scales, and descriptors of one level would describe different patches.
    Each observation gets the size ``sizes * k`` with one factor ``k`` per track: the
    largest that keeps every member on or above its image's finest level, so the member
    that sees the place smallest (relative to its finest level) is refined on its finest
    level and the others on levels as much coarser as their sizes are larger. Only
    ratios of sizes within a track count: any detector's unit of size works.

    Args:
        sizes: (M,) detected keypoint sizes, observations grouped by track.
        finest: (M,) keypoint size of the finest level of each observation's image
            (nan where it has none).
        starts: (T + 1,) track boundaries.

    Returns:
        (M,) sizes to pass as the keypoint sizes choosing each observation's level.
    """
    ratio = np.asarray(finest, np.float64) / np.maximum(np.asarray(sizes, np.float64), 1e-12)
    # fmax: an image without levels (nan) does not count.
    factor = np.fmax.reduceat(ratio, starts[:-1]) if len(ratio) else ratio
    return (np.asarray(sizes, np.float64) * np.repeat(factor, np.diff(starts))).astype(np.float32)


def refine_keypoints(
    feature: "R2D2Feature",
    images: Sequence[PathLike],
    keypoints: Sequence[np.ndarray],
    edges: np.ndarray,
    sizes: Optional[Sequence[np.ndarray]] = None,
    image_sizes: Optional[Sequence[Tuple[int, int]]] = None,
    scores: Optional[np.ndarray] = None,
    params: RefinementParams = RefinementParams(),
    show_progress: bool = False,
) -> Tuple[List[np.ndarray], RefinementReport]:
    """Featuremetric refinement of the keypoints of the tracks that matches form.

    Tracks are built with :func:`build_tracks`. With keypoint ``sizes``, each
    observation is refined on the pyramid level that :func:`scale_matched_sizes` gives
    (the track's images then describe the place at one scale); without, on the finest
    level. The network runs once per image and level used; a window of descriptors is
    kept per observation (a few kB each, the only memory that grows with the
    collection), and :func:`adjust_windows` moves the observations.

    Args:
        feature: the extractor that runs the network.
        images: image paths, one per keypoint array.
        keypoints: per image, (N_i, 2) positions in pixels (OpenCV's convention).
        edges: (E, 4) integer (image0, keypoint0, image1, keypoint1) verified matches.
        sizes: per image, (N_i,) detected keypoint sizes (any unit), or None.
        image_sizes: (width, height) of each image; needed with ``sizes``.
        scores: (E,) match similarities, best matches joined first (None: in order).
        params: refinement settings.

    Returns:
        The refined keypoints (copies; keypoints in no track are unchanged; moved ones
        stay inside their image) and a report. A track keypoint outside its image
        (0 <= x < width, 0 <= y < height) or not finite is not refined and does not
        guide its track; the others are refined as without it, and a warning counts them.
    """
    edges, scores = _check_edges(edges, scores)
    keypoints = [np.asarray(points, np.float32) for points in keypoints]
    keypoints = _per_image("keypoints", keypoints, [(len(k), 2) for k in keypoints])
    if len(keypoints) != len(images):
        raise ValueError(f"keypoints must hold one array per image ({len(images)}), got "
                         f"{len(keypoints)}")
    _check_edges_in(edges, [len(points) for points in keypoints])
    report = RefinementReport()
    refined = [points.copy() for points in keypoints]
    tracks = build_tracks(edges, scores)
    report.num_tracks, report.num_observations = len(tracks), len(tracks.images)
    report.num_conflicts = tracks.num_conflicts
    level_sizes = np.zeros(len(tracks.images), np.float32)  # non-positive: the finest level
    if sizes is not None:
        if image_sizes is None:
            raise ValueError("image_sizes (width, height per image) are needed with sizes")
        sizes = _per_image("sizes", sizes, [(len(points),) for points in keypoints])
        image_sizes = _per_image("image_sizes", image_sizes, [(2,)] * len(images), np.int64)
        first = np.cumsum([0] + [len(points) for points in keypoints])
        detected = np.concatenate(sizes)[first[tracks.images] + tracks.keypoints]
        finest = _finest_sizes(feature, image_sizes, params.upsample)[tracks.images]
        level_sizes = scale_matched_sizes(detected, finest, tracks.starts)
    offsets = window_offsets(params.window_radius)
    dtype = np.float16 if params.half else np.float32
    windows = np.zeros((len(tracks.images), len(offsets), feature.descriptorSize()), dtype)
    report.window_bytes = int(windows.nbytes)
    steps = np.ones((len(tracks.images), 2), np.float32)
    movable = np.zeros(len(tracks.images), bool)
    # (width, height) of each observation's image; positions stay below them.
    limits = np.ones((len(tracks.images), 2), np.float32)
    num_outside, example = 0, ""
    start = time.perf_counter()
    by_image = np.argsort(tracks.images, kind="stable")
    used, bounds = np.unique(tracks.images[by_image], return_index=True)
    groups = np.split(by_image, bounds[1:]) if len(by_image) else []
    for i, rows in progress(list(zip(used.tolist(), groups)), len(groups), show_progress,
                            "refine", "image"):
        image = read_image(images[i])
        limits[rows] = image.shape[1::-1]
        points = keypoints[i][tracks.keypoints[rows]]
        # One bad keypoint must not stop the collection: it keeps a zero window (no
        # say in its track's target) and stays where it is.
        inside = inside_image(points, *image.shape[:2])
        if not inside.all():
            if not num_outside:
                example = (f"{points[~inside][0].tolist()} in {os.fspath(images[i])!r} "
                           f"({image.shape[1]}x{image.shape[0]})")
            num_outside += int((~inside).sum())
            rows, points = rows[inside], points[inside]
            if not len(rows):
                continue
        windows[rows], steps[rows] = feature._descriptor_windows(
            image, points, offsets, sizes=level_sizes[rows], dtype=dtype,
            upsample=params.upsample)
        # Windows that reach past the map's border hold clamped samples: those stay.
        size = np.array(image.shape[1::-1], np.float32) / steps[rows]
        centre = (points + 0.5) / steps[rows] - 0.5
        reach = params.window_radius
        movable[rows] = ((centre >= reach) & (centre <= size - 1 - reach)).all(axis=1)
        # An image without pyramid levels gives no descriptors.
        movable[rows] &= np.abs(windows[rows, len(offsets) // 2]).max(axis=1) > 0
    report.num_outside = num_outside
    if num_outside:
        logger.warning("%d track keypoints lie outside their image and are left unrefined, "
                       "e.g. %s", num_outside, example)
    report.seconds["network"] = time.perf_counter() - start
    start = time.perf_counter()
    delta, _ = adjust_windows(windows, tracks.starts, params, movable)
    shift = delta * steps
    for i, rows in zip(used.tolist(), groups):
        points = refined[i][tracks.keypoints[rows]] + shift[rows]
        # Levels finer than twice the image's resolution (upsample > 2) can move a
        # border keypoint up to half a level pixel past the image: hold it inside.
        moving = rows[movable[rows]]
        points[movable[rows]] = np.clip(points[movable[rows]], 0,
                                        np.nextafter(limits[moving], np.float32(0)))
        refined[i][tracks.keypoints[rows]] = points
    moved = np.hypot(shift[:, 0], shift[:, 1])[movable]
    report.seconds["adjust"] = time.perf_counter() - start
    report.median_displacement = float(np.median(moved)) if len(moved) else 0.0
    logger.info("refined %d keypoints in %d tracks (median move %.2f px, %d conflicting "
                "matches left out; windows %.0f MB)", len(tracks.images), len(tracks),
                report.median_displacement, tracks.num_conflicts, report.window_bytes / 2**20)
    return refined, report
