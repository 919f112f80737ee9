"""Mutual nearest-neighbour matching of descriptor sets, batched with torch.

:func:`mutual_nearest_neighbours` gives the pairs ``cv2.BFMatcher(norm,
crossCheck=True).match`` gives (for ``NORM_L2`` float and ``NORM_HAMMING`` binary
descriptors), computed as one matrix product per batch of image pairs on the CPU or
a GPU. Distances are found with ``|a|^2 + |b|^2 - 2 a.b`` in float32; where the two
nearest candidates of a descriptor lie closer than that product's rounding bound, they
are compared again exactly (float64), so that rounding never picks another neighbour
than OpenCV's direct computation. Ties go to the lower index, as in OpenCV.

Views rotated against each other in the image plane are matched with ``rotations=N``
and the descriptors' steerers (:mod:`cv2r2d2.steerers`): :func:`estimate_rotation`
picks, per pair, the steering angle k * 360 / N with the most mutual nearest
neighbours, and :func:`match_rotated` matches under it;
:class:`~cv2r2d2.steered_matcher.SteeredMatcher` does both behind the ``cv2.BFMatcher``
interface.

Pair generation lives in :mod:`cv2r2d2.pairs` and matching a whole collection in
:mod:`cv2r2d2.collection`.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .checks import check_count, check_descriptors, check_positions, check_radius
from .steerers import as_steerers, rotation_angles, steer_descriptors
from .utils import torch_device

__all__ = [
    "mutual_nearest_neighbours",
    "match_batch",
    "estimate_rotation",
    "match_rotated",
    "nearest_places",
    "PLACE_RADIUS",
    "steered_by",
]

logger = logging.getLogger(__name__)

NORMS = {cv2.NORM_L2: "NORM_L2", cv2.NORM_HAMMING: "NORM_HAMMING"}
# Distance-matrix elements computed at once (float32): 2**26 is 256 MiB.
DEFAULT_MAX_ELEMENTS = 2**26
# Descriptors of each image (R2D2's best-scoring first) whose mutual nearest neighbours
# vote for a pair's rotation (benchmarks/bench_rotation.py).
ESTIMATE_ON = 1024
# A rotation vote over more steering angles starts on every 2**m-th of them while that
# leaves this many or more, then refines around the winner: 30-degree steps found the
# nearest steering angle on every pair of benchmarks/bench_rotation.py.
COARSE_VOTES = 12
PLACE_RADIUS = 4.0
"""Pixels: keypoints of one image this close are one place for ``nearest_places`` and
``SteeredMatcher.knnMatch(trainKeypoints=)``. R2D2 finds a place on two or three pyramid
levels a few pixels apart: Lowe's test (0.9) at 45 degrees kept 3207 correct matches with
4 px, 3274 with 12 px and 1468 without (two photos, benchmarks/bench_steered_ratio.py)."""

Match = Tuple[np.ndarray, np.ndarray]


@contextlib.contextmanager
def _exact_float32_matmul() -> Iterator[None]:
    """Full float32 matrix products (no TF32/bf16), restoring the caller's setting."""
    import torch

    precision = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _as_vectors(descriptors: np.ndarray, norm: int) -> np.ndarray:
    # Bits as 0/1 floats make the Hamming distance |a| + |b| - 2 a.b, exact in float32.
    if norm == cv2.NORM_HAMMING:
        return np.unpackbits(descriptors, axis=1).astype(np.float32)
    return descriptors


def _exact_distances(a: np.ndarray, b: np.ndarray, norm: int) -> np.ndarray:
    """Distances between rows a[i] and b[i], float64; a, b (M, D)."""
    if norm == cv2.NORM_HAMMING:
        return np.unpackbits(a ^ b, axis=1).sum(axis=1).astype(np.float64)
    diff = a.astype(np.float64) - b.astype(np.float64)
    return np.sqrt(np.einsum("ij,ij->i", diff, diff))


def _nearest(matrix, tolerance, queries: np.ndarray, candidates: np.ndarray, norm: int):
    """Nearest candidate of each query along the last axis of one (Nq, Nc) matrix.

    ``tolerance`` (Nq,) bounds the matrix's rounding error: where the second nearest
    lies within it of the nearest, the close candidates are compared exactly. None:
    the matrix is exact.

    Returns:
        (Nq,) int64 indices and (Nq, 2) float32 nearest and second-nearest matrix
        values (inf where there is no second).
    """
    import torch

    values, order = torch.topk(matrix, min(2, matrix.shape[1]), dim=1, largest=False)
    best = values[:, 0]
    second = values[:, 1] if values.shape[1] == 2 else torch.full_like(best, float("inf"))
    index = order[:, 0]
    if tolerance is None:
        # topk does not promise the lower index among equal values; argmin does, as OpenCV.
        tied = torch.nonzero(second == best).flatten()
        index[tied] = torch.argmin(matrix[tied], dim=1)
        index = index.cpu().numpy()
    else:
        index = index.cpu().numpy()
        for q in torch.nonzero(second - best <= tolerance).flatten().cpu().numpy():
            close = torch.nonzero(matrix[q] <= best[q] + tolerance[q]).flatten().cpu().numpy()
            exact = _exact_distances(np.repeat(queries[q : q + 1], len(close), axis=0),
                                     candidates[close], norm)
            index[q] = close[int(np.argmin(exact))]
    return index, torch.stack([best, second], dim=1).cpu().numpy()


def _match_one(matrix, tolerance_a, tolerance_b, a: np.ndarray, b: np.ndarray, norm: int,
               max_distance: Optional[float], ratio: Optional[float]) -> Match:
    """Mutual nearest neighbours from one (Na, Nb) matrix of squared L2 distances, or
    of Hamming distances."""
    a_to_b, row = _nearest(matrix, tolerance_a, a, b, norm)
    # Reducing along rows of a contiguous copy is several times faster on the CPU.
    b_to_a, column = _nearest(matrix.T.contiguous(), tolerance_b, b, a, norm)
    first = np.flatnonzero(b_to_a[a_to_b] == np.arange(len(a)))
    second = a_to_b[first]
    if ratio is not None:
        factor = ratio if norm == cv2.NORM_HAMMING else ratio**2
        keep = (row[first, 0] <= factor * row[first, 1]) & \
               (column[second, 0] <= factor * column[second, 1])
        first, second = first[keep], second[keep]
    distances = _exact_distances(a[first], b[second], norm)
    if max_distance is not None:
        keep = distances <= max_distance
        first, second, distances = first[keep], second[keep], distances[keep]
    return np.stack([first, second], axis=1).astype(np.int64), distances.astype(np.float32)


def _batches(sizes: Sequence[Tuple[int, int]], max_elements: int) -> Iterator[List[int]]:
    """Consecutive groups of pair indices whose padded distance matrices fit the budget."""
    batch: List[int] = []
    rows = columns = 0
    for index, (n_a, n_b) in enumerate(sizes):
        grown = (len(batch) + 1) * max(rows, n_a) * max(columns, n_b)
        if batch and grown > max_elements:
            yield batch
            batch, rows, columns = [], 0, 0
        batch.append(index)
        rows, columns = max(rows, n_a), max(columns, n_b)
    if batch:
        yield batch


def _padded(vectors: Sequence[np.ndarray], length: int, device: str):
    import torch

    dim = vectors[0].shape[1]
    out = torch.zeros((len(vectors), length, dim), dtype=torch.float32, device=device)
    for i, v in enumerate(vectors):
        out[i, : len(v)] = torch.from_numpy(np.ascontiguousarray(v)).to(device)
    return out


def match_batch(
    pairs: Sequence[Tuple[np.ndarray, np.ndarray]],
    norm: int = cv2.NORM_L2,
    max_distance: Optional[float] = None,
    ratio: Optional[float] = None,
    device: Optional[str] = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    rotations: int = 1,
    steerers: Any = None,
) -> List[Match]:
    """Mutual nearest neighbours of many descriptor-set pairs, batched.

    Args:
        pairs: (descriptors_a (Na, D), descriptors_b (Nb, D)) per pair: float32 for
            ``cv2.NORM_L2``, uint8 for ``cv2.NORM_HAMMING``.
        norm: ``cv2.NORM_L2`` or ``cv2.NORM_HAMMING``.
        max_distance: keep matches at distance <= this (None: all).
        ratio: keep matches whose distance is <= ratio x the second nearest's, in both
            directions (Lowe's test; None: no test).
        device: torch device; None: CUDA when available, else the CPU (a device this
            machine lacks is a ValueError, raised before any work).
        max_elements: distance-matrix elements computed at once (memory: 4 bytes each);
            a pair larger than this is computed alone.
        rotations: 1 matches the descriptors as they are; N > 1 (a divisor of 360) first
            estimates each pair's in-plane rotation among k * 360 / N degrees and matches
            a, steered by it, with b (:func:`match_rotated`; ``NORM_L2`` only).
        steerers: with ``rotations`` > 1, the ``R2D2Feature`` that computed the
            descriptors (its model's steerers, fitted on first use) or its
            ``getSteerers(rotations)``.

    Returns:
        Per pair, (M, 2) int64 indices (in a, in b), sorted by the index in a, and
        (M,) float32 distances (L2, or Hamming bit counts; with rotations, between
        steered a and b).
    """
    import torch

    if rotation_angles(rotations) != (0,):
        if norm != cv2.NORM_L2:
            raise ValueError(f"rotations={rotations} steers R2D2 descriptors: it needs "
                             f"norm=cv2.NORM_L2, got {NORMS.get(norm, norm)!r}")
        if steerers is None:
            raise ValueError(f"rotations={rotations} needs steerers=: the R2D2Feature that "
                             "computed the descriptors, or its getSteerers()")
        matrices = as_steerers(steerers, rotations).for_rotations(rotations)
        return [(indices, distances) for indices, distances, _ in
                match_rotated(pairs, matrices, max_distance, ratio, device, max_elements)]
    if norm not in NORMS:
        raise ValueError(f"norm must be cv2.NORM_L2 or cv2.NORM_HAMMING, got {norm!r}")
    if max_distance is not None and not max_distance >= 0:
        raise ValueError(f"max_distance must be >= 0 or None, got {max_distance!r}")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1] or be None, got {ratio!r}")
    device = torch_device(device)
    checked = []
    for i, (a, b) in enumerate(pairs):
        a = check_descriptors(a, f"pairs[{i}][0]", norm)
        b = check_descriptors(b, f"pairs[{i}][1]", norm)
        if a.shape[1] != b.shape[1]:
            raise ValueError(f"pairs[{i}]: descriptor sizes differ: {a.shape[1]} and {b.shape[1]}")
        checked.append((a, b))
    results: List[Match] = [(np.zeros((0, 2), np.int64), np.zeros(0, np.float32))] * len(checked)
    todo = [i for i, (a, b) in enumerate(checked) if len(a) and len(b)]
    sizes = [(len(checked[i][0]), len(checked[i][1])) for i in todo]
    # Hamming distances of 0/1 vectors are small integers: exact in float32.
    exact = norm == cv2.NORM_HAMMING
    with torch.inference_mode(), _exact_float32_matmul():
        for batch in _batches(sizes, max_elements):
            members = [todo[i] for i in batch]
            vectors_a = [_as_vectors(checked[i][0], norm) for i in members]
            vectors_b = [_as_vectors(checked[i][1], norm) for i in members]
            rows = max(len(v) for v in vectors_a)
            columns = max(len(v) for v in vectors_b)
            a = _padded(vectors_a, rows, device)
            b = _padded(vectors_b, columns, device)
            norms_a = (a * a).sum(-1)
            norms_b = (b * b).sum(-1)
            matrix = torch.bmm(a, b.transpose(1, 2)).mul_(-2)
            matrix.add_(norms_a[:, :, None]).add_(norms_b[:, None, :]).clamp_(min=0)
            # Rounding of |a|^2 + |b|^2 - 2 a.b in float32 is at most 2 D u (|a|^2 + |b|^2)
            # (u the unit roundoff; Higham's bound for sums of D products), and the gap
            # between two such values is off by at most twice that.
            scale = 4 * a.shape[-1] * np.finfo(np.float32).eps / 2
            for slot, pair in enumerate(members):
                n_a, n_b = len(vectors_a[slot]), len(vectors_b[slot])
                tolerance_a = tolerance_b = None
                if not exact:
                    squares_a, squares_b = norms_a[slot, :n_a], norms_b[slot, :n_b]
                    tolerance_a = scale * (squares_a + squares_b.max())
                    tolerance_b = scale * (squares_b + squares_a.max())
                results[pair] = _match_one(matrix[slot, :n_a, :n_b], tolerance_a, tolerance_b,
                                           checked[pair][0], checked[pair][1], norm,
                                           max_distance, ratio)
    return results


def mutual_nearest_neighbours(
    descriptors_a: np.ndarray,
    descriptors_b: np.ndarray,
    norm: int = cv2.NORM_L2,
    max_distance: Optional[float] = None,
    ratio: Optional[float] = None,
    device: Optional[str] = None,
    rotations: int = 1,
    steerers: Any = None,
) -> Match:
    """Mutual nearest neighbours of two descriptor sets (``BFMatcher`` with crossCheck).

    Args:
        descriptors_a: (Na, D) float32 (``NORM_L2``) or uint8 (``NORM_HAMMING``).
        descriptors_b: (Nb, D), same type.
        norm: as :func:`match_batch`.
        max_distance: as :func:`match_batch`.
        ratio: as :func:`match_batch`.
        device: as :func:`match_batch`.
        rotations: as :func:`match_batch` (``rotations=24, steerers=r2d2`` for views
            that may be rotated).
        steerers: as :func:`match_batch`.

    Returns:
        (M, 2) int64 indices (in a, in b) sorted by the index in a, (M,) float32 distances.
    """
    return match_batch([(descriptors_a, descriptors_b)], norm, max_distance, ratio, device,
                       rotations=rotations, steerers=steerers)[0]


def nearest_places(
    queries: np.ndarray,
    candidates: np.ndarray,
    positions: Any,
    k: int,
    radius: float = PLACE_RADIUS,
    device: Optional[str] = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> Tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest candidates of each query (L2), each more than ``radius`` from
    those before it.

    The first is the nearest candidate; each next one the nearest whose position lies
    farther than ``radius`` from all those taken: the second neighbour of Lowe's ratio
    test taken at another place, not at a copy of the first on another pyramid level.
    Neighbours are ranked by float32 distances, the distances returned are exact.

    Args:
        queries: (Nq, D) float32 descriptors.
        candidates: (Nc, D) float32 descriptors.
        positions: the candidates' (Nc, 2) pixel positions, or their ``cv2.KeyPoint``.
        k: neighbours per query.
        radius: pixels (0: the k nearest, as ``cv2.BFMatcher.knnMatch``).
        device: as :func:`match_batch`.
        max_elements: as :func:`match_batch`.

    Returns:
        (Nq, k) int64 candidate indices (-1 where fewer places remain) and (Nq, k)
        float32 L2 distances (inf there), nearest first.
    """
    queries = check_descriptors(queries, "queries")
    candidates = check_descriptors(candidates, "candidates")
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(f"descriptor sizes differ: {queries.shape[1]} and {candidates.shape[1]}")
    positions = check_positions(positions, len(candidates), "positions")
    check_count(k, "k")
    radius = check_radius(radius)
    import torch

    device = torch_device(device)
    indices = np.full((len(queries), k), -1, np.int64)
    distances = np.full((len(queries), k), np.inf, np.float32)
    if not len(queries) or not len(candidates):
        return indices, distances
    rows = max(1, max_elements // len(candidates))
    with torch.inference_mode(), _exact_float32_matmul():
        b = torch.from_numpy(np.ascontiguousarray(candidates)).to(device)
        xs = torch.from_numpy(np.ascontiguousarray(positions[:, 0], np.float32)).to(device)
        ys = torch.from_numpy(np.ascontiguousarray(positions[:, 1], np.float32)).to(device)
        squares_b = (b * b).sum(1)
        for start in range(0, len(queries), rows):
            a = torch.from_numpy(np.ascontiguousarray(queries[start:start + rows])).to(device)
            matrix = torch.addmm(squares_b[None, :] + (a * a).sum(1)[:, None], a, b.T,
                                 alpha=-2).clamp_(min=0)
            for j in range(k):
                value, index = matrix.min(dim=1)
                found = torch.isfinite(value)
                indices[start:start + len(a), j] = torch.where(found, index, -1).cpu().numpy()
                if j + 1 < k:
                    taken = (xs[None, :] - xs[index][:, None]).square_()
                    taken.add_((ys[None, :] - ys[index][:, None]).square_())
                    matrix.masked_fill_(taken <= radius * radius, float("inf"))
                    matrix[torch.arange(len(a), device=device), index] = float("inf")
    rows_found, columns = np.nonzero(indices >= 0)
    distances[rows_found, columns] = _exact_distances(
        queries[rows_found], candidates[indices[rows_found, columns]], cv2.NORM_L2)
    return indices, distances


# --- rotated views -----------------------------------------------------------------


def steered_by(descriptors: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, D) descriptors steered by a (D, D) steerer (:func:`~cv2r2d2.steerers.steer_descriptors`);
    the identity leaves them as they are."""
    if np.array_equal(matrix, np.eye(len(matrix), dtype=matrix.dtype)):
        return descriptors  # unchanged: rotation 0 is exactly the plain matching
    return steer_descriptors(descriptors, matrix)


def _check_steered(pairs: Sequence[Tuple[np.ndarray, np.ndarray]],
                   matrices: np.ndarray) -> List[Tuple[np.ndarray, np.ndarray]]:
    if not isinstance(matrices, np.ndarray) or matrices.ndim != 3 or len(matrices) < 1 \
            or matrices.shape[1] != matrices.shape[2]:
        raise ValueError(f"matrices must be R x D x D steerers, got "
                         f"{getattr(matrices, 'shape', type(matrices).__name__)}")
    checked = []
    for i, (a, b) in enumerate(pairs):
        a = check_descriptors(a, f"pairs[{i}][0]")
        b = check_descriptors(b, f"pairs[{i}][1]")
        for name, d in (("0", a), ("1", b)):
            if d.shape[1] != matrices.shape[1]:
                raise ValueError(f"pairs[{i}][{name}] has {d.shape[1]}-dimensional descriptors, "
                                 f"the steerers are {matrices.shape[1]}-dimensional")
        checked.append((a, b))
    return checked


def _coarse_step(rotations: int) -> int:
    """Index step of the first vote: every angle, or every 2**m-th while that leaves
    COARSE_VOTES angles or more (the others are voted on around the winner)."""
    step = 1
    while rotations % (2 * step) == 0 and rotations // (2 * step) >= COARSE_VOTES:
        step *= 2
    return step


def _votes(checked: Sequence[Tuple[np.ndarray, np.ndarray]], matrices: np.ndarray,
           device: Optional[str], max_elements: int,
           estimate_on: Optional[int]) -> Tuple[List[int], List[List[Optional[Match]]]]:
    """Per pair, the index of the steerer with the most mutual nearest neighbours, and
    the matches of each steerer voted on (None for the others).

    With many steerers the vote is coarse to fine: first every ``step``-th one
    (:func:`_coarse_step`), then, ``step`` halved each time, the two between the
    winner and its voted neighbours; the most matches win, the lower index among
    equal counts.
    """
    rotations = len(matrices)
    per_pair: List[List[Optional[Match]]] = [[None] * rotations for _ in checked]

    def vote(candidates: List[List[int]]) -> None:
        jobs = [(i, r) for i, rs in enumerate(candidates) for r in rs if per_pair[i][r] is None]
        found = match_batch([(steered_by(checked[i][0][:estimate_on], matrices[r]),
                              checked[i][1][:estimate_on]) for i, r in jobs],
                            cv2.NORM_L2, device=device, max_elements=max_elements)
        for (i, r), match in zip(jobs, found):
            per_pair[i][r] = match

    def winner(i: int, candidates: List[int]) -> int:
        ordered = sorted(set(candidates))
        return ordered[int(np.argmax([len(per_pair[i][r][0]) for r in ordered]))]

    step = _coarse_step(rotations)
    coarse = list(range(0, rotations, step))
    vote([coarse] * len(checked))
    best = [winner(i, coarse) for i in range(len(checked))]
    while step > 1:
        step //= 2
        around = [[r, (r - step) % rotations, (r + step) % rotations] for r in best]
        vote(around)
        best = [winner(i, rs) for i, rs in enumerate(around)]
    return best, per_pair


def estimate_rotation(
    pairs: Sequence[Tuple[np.ndarray, np.ndarray]],
    matrices: np.ndarray,
    device: Optional[str] = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    estimate_on: Optional[int] = ESTIMATE_ON,
) -> List[int]:
    """The in-plane rotation of each pair: the steerer with the most matches.

    For a steerer S_r, a's descriptors steered by it are matched with b's (mutual
    nearest neighbours, the first ``estimate_on`` of each: R2D2's best-scoring); the
    steerer with the most matches wins ("max matches", Bokman et al., CVPR 2024). When
    R / 2 is whole and at least ``COARSE_VOTES`` (12), every 2nd steerer votes first
    (every 4th when R / 4 is, ...), then the two halfway between the winner and its
    neighbours, down to single steps: R = 24 costs 12 + 2 votes, R = 48 12 + 2 + 2.

    Args:
        pairs: (a (Na, D), b (Nb, D)) float32 descriptors per pair.
        matrices: (R, D, D) steerers, e.g. ``Steerers.for_rotations(R)`` (index r:
            r * 360 / R degrees).
        estimate_on: descriptors of each image that vote (None: all).

    Returns:
        Per pair, the index in ``matrices`` of the winning steerer (0, the first, when
        a or b is empty; the lower index among equal counts).
    """
    checked = _check_steered(pairs, matrices)
    if len(matrices) == 1:
        return [0] * len(checked)
    return _votes(checked, matrices, device, max_elements, estimate_on)[0]


def match_rotated(
    pairs: Sequence[Tuple[np.ndarray, np.ndarray]],
    matrices: np.ndarray,
    max_distance: Optional[float] = None,
    ratio: Optional[float] = None,
    device: Optional[str] = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    estimate_on: Optional[int] = ESTIMATE_ON,
) -> List[Tuple[np.ndarray, np.ndarray, int]]:
    """Mutual nearest neighbours of views rotated against each other in the image plane.

    Each pair's rotation is estimated first (:func:`estimate_rotation`), then a, steered
    by it, is matched with b, so that no false match from another angle enters.

    Args:
        pairs: as :func:`estimate_rotation`.
        matrices: as :func:`estimate_rotation`.
        estimate_on: as :func:`estimate_rotation`.
        max_distance: as :func:`match_batch`.
        ratio: as :func:`match_batch`.
        device: as :func:`match_batch`.
        max_elements: as :func:`match_batch`.

    Returns:
        Per pair, (M, 2) int64 indices (in a, in b) sorted by the index in a, (M,)
        float32 distances between steered a and b, and the index of the steerer used.
    """
    checked = _check_steered(pairs, matrices)
    if len(matrices) == 1:
        best, per_pair = [0] * len(checked), [[None]] * len(checked)
    else:
        best, per_pair = _votes(checked, matrices, device, max_elements, estimate_on)
    results: List[Optional[Match]] = [None] * len(checked)
    todo = []
    for i, ((a, b), r) in enumerate(zip(checked, best)):
        complete = estimate_on is None or max(len(a), len(b)) <= estimate_on
        if complete and max_distance is None and ratio is None and per_pair[i][r] is not None:
            results[i] = per_pair[i][r]  # the vote matched all descriptors already
        else:
            todo.append(i)
    found = match_batch([(steered_by(checked[i][0], matrices[best[i]]), checked[i][1])
                         for i in todo], cv2.NORM_L2, max_distance, ratio, device, max_elements)
    for i, match in zip(todo, found):
        results[i] = match
    return [(indices, distances, r) for (indices, distances), r in zip(results, best)]
