"""Mutual nearest-neighbour matching of descriptor sets, batched with torch.

:func:`mutual_nearest_neighbours` gives the pairs ``cv2.BFMatcher(norm,
crossCheck=True).match`` gives (for ``NORM_L2`` float and ``NORM_HAMMING`` binary
descriptors), computed as one matrix product per batch of image pairs on the CPU or
a GPU. Distances are found with ``|a|^2 + |b|^2 - 2 a.b`` in float32; where the two
nearest candidates of a descriptor lie closer than that product's rounding bound, they
are compared again exactly (float64), so that rounding never picks another neighbour
than OpenCV's direct computation. Ties go to the lower index, as in OpenCV.

Pair generation lives in :mod:`cv2r2d2.pairs` and matching a whole collection in
:mod:`cv2r2d2.collection`; their names are reachable from here as before
(``cv2r2d2.matching.parse_pairs``, ``cv2r2d2.matching.match_collection``).
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np

from .pairs import SEQUENTIAL_OVERLAP, exhaustive_pairs, parse_pairs, sequential_pairs
from .utils import torch_device

__all__ = [
    "mutual_nearest_neighbours",
    "match_batch",
    "exhaustive_pairs",
    "sequential_pairs",
    "parse_pairs",
    "SEQUENTIAL_OVERLAP",
    "MatchingReport",
    "match_collection",
]

logger = logging.getLogger(__name__)

NORMS = {cv2.NORM_L2: "NORM_L2", cv2.NORM_HAMMING: "NORM_HAMMING"}
# Distance-matrix elements computed at once (float32): 2**26 is 256 MiB.
DEFAULT_MAX_ELEMENTS = 2**26

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


def _check_descriptors(descriptors: np.ndarray, norm: int, name: str) -> np.ndarray:
    if not isinstance(descriptors, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(descriptors).__name__}")
    if descriptors.ndim != 2:
        raise ValueError(f"{name} must be N x D, got shape {descriptors.shape}")
    if norm == cv2.NORM_HAMMING:
        if descriptors.dtype != np.uint8:
            raise TypeError(f"{name} must be uint8 for NORM_HAMMING, got {descriptors.dtype}")
        return descriptors
    if descriptors.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name} must be float32 for NORM_L2, got {descriptors.dtype}")
    if not np.isfinite(descriptors).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return descriptors.astype(np.float32, copy=False)


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

    Returns:
        Per pair, (M, 2) int64 indices (in a, in b), sorted by the index in a, and
        (M,) float32 distances (L2, or Hamming bit counts).
    """
    import torch

    if norm not in NORMS:
        raise ValueError(f"norm must be cv2.NORM_L2 or cv2.NORM_HAMMING, got {norm!r}")
    if max_distance is not None and not max_distance >= 0:
        raise ValueError(f"max_distance must be >= 0 or None, got {max_distance!r}")
    if ratio is not None and not 0 < ratio <= 1:
        raise ValueError(f"ratio must lie in (0, 1] or be None, got {ratio!r}")
    device = torch_device(device)
    checked = []
    for i, (a, b) in enumerate(pairs):
        a = _check_descriptors(a, norm, f"pairs[{i}][0]")
        b = _check_descriptors(b, norm, f"pairs[{i}][1]")
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
) -> Match:
    """Mutual nearest neighbours of two descriptor sets (``BFMatcher`` with crossCheck).

    Args:
        descriptors_a: (Na, D) float32 (``NORM_L2``) or uint8 (``NORM_HAMMING``).
        descriptors_b: (Nb, D), same type.
        norm, max_distance, ratio, device: as :func:`match_batch`.

    Returns:
        (M, 2) int64 indices (in a, in b) sorted by the index in a, (M,) float32 distances.
    """
    return match_batch([(descriptors_a, descriptors_b)], norm, max_distance, ratio, device)[0]


# The collection driver sits above this kernel (it reads stores and writes match files);
# its names are served from here on first use, as they were before it moved.
_MOVED_TO_COLLECTION = ("MatchingReport", "match_collection")


def __getattr__(name: str) -> Any:
    if name in _MOVED_TO_COLLECTION:
        from . import collection

        return getattr(collection, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
