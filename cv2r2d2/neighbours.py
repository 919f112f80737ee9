"""The k nearest neighbours of every row of a matrix by dot product, in blocks.

For N vectors of D values, all pairs are compared (about N^2 D multiply-adds, each pair
of blocks once: the similarity is symmetric) with memory bounded by the block size, not
by N^2: the rows are read block by block, so the matrix may be an ``np.memmap`` or an
h5py dataset larger than memory. :mod:`cv2r2d2.retrieval` ranks image vectors with it.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np

__all__ = ["top_k_neighbours"]


def top_k_neighbours(vectors: Any, k: int, rows: Optional[np.ndarray] = None,
                     block_size: int = 2048) -> Tuple[np.ndarray, np.ndarray]:
    """For each vector, the k others with the largest dot product, in blocks.

    Each pair of blocks is compared once (the similarity is symmetric), so the cost is
    about N^2 D multiply-adds for N vectors of D values.

    Args:
        vectors: (N, D) rows that slicing ``vectors[a:b]`` reads: a numpy array, an
            ``np.memmap`` or an h5py dataset (read block by block, never whole).
        k: neighbours per vector (at most M - 1 are returned).
        rows: sorted indices of the M rows taking part (None: all).
        block_size: rows per block; the working memory grows as its square (about
            120 MB at 2048 rows of 1024 values, 440 MB at 4096 for the same time), plus
            12 bytes per neighbour of the result.

    Returns:
        (M, k') int64 neighbour indices (into ``vectors``) and (M, k') float32 dot
        products, best first (equal ones by index), k' = min(k, M - 1).
    """
    total = len(vectors)
    selected = np.arange(total) if rows is None else np.asarray(rows, np.int64)
    keep = np.zeros(total, bool)
    keep[selected] = True
    count = max(min(k, len(selected) - 1), 0)
    best = np.full((len(selected), count), -np.inf, np.float32)
    best_ids = np.full((len(selected), count), -1, np.int64)
    if count < 1:
        return best_ids, best
    blocks = []  # (first row, last row + 1, selected rows in it, where they are in the result)
    done = 0
    for first in range(0, total, block_size):
        local = np.flatnonzero(keep[first:first + block_size])
        if len(local):
            blocks.append((first, first + block_size, local, slice(done, done + len(local))))
            done += len(local)

    def read(block: Tuple[int, int, np.ndarray, slice]) -> np.ndarray:
        return np.asarray(vectors[block[0]:block[1]], np.float32)[block[2]]

    for i, block in enumerate(blocks):
        queries = read(block)
        for other in blocks[i:]:
            if other is block:
                similarity = queries @ queries.T
                np.fill_diagonal(similarity, -np.inf)
            else:
                similarity = queries @ read(other).T
                _merge(best[other[3]], best_ids[other[3]], np.ascontiguousarray(similarity.T),
                       block[0] + block[2])
            _merge(best[block[3]], best_ids[block[3]], similarity, other[0] + other[2])
    return best_ids, best


def _merge(best: np.ndarray, best_ids: np.ndarray, similarity: np.ndarray,
           ids: np.ndarray) -> None:
    """Keep in ``best`` / ``best_ids`` (M, k), best first, the k largest of themselves
    and of the (M, C) ``similarity`` to the vectors ``ids`` (C,), in place.

    Only the similarities above a row's k-th best can enter it, and after the first
    blocks those are few (about k C / n for n vectors seen): they are picked out and
    sorted alone, which costs less than a partition of every row.
    """
    count = best.shape[1]
    candidates = similarity > best[:, -1:]
    number = np.count_nonzero(candidates)
    if not number:
        return
    if number > 4 * best.size:
        merged = np.concatenate([best, similarity], axis=1)
        top = np.argpartition(-merged, count - 1, axis=1)[:, :count]
        values = np.take_along_axis(merged, top, 1)
        found = np.where(top < count,
                         np.take_along_axis(best_ids, np.minimum(top, count - 1), 1),
                         ids[np.maximum(top - count, 0)])
        order = np.lexsort((found, -values), axis=1)
        best[:] = np.take_along_axis(values, order, 1)
        best_ids[:] = np.take_along_axis(found, order, 1)
        return
    rows, columns = np.divmod(np.flatnonzero(candidates), similarity.shape[1])
    touched = np.unique(rows)
    owner = np.concatenate([np.repeat(touched, count), rows])
    values = np.concatenate([best[touched].ravel(), similarity[rows, columns]])
    found = np.concatenate([best_ids[touched].ravel(), ids[columns]])
    order = np.lexsort((found, -values, owner))
    first = np.searchsorted(owner[order], touched)[:, None] + np.arange(count)
    best[touched] = values[order][first]
    best_ids[touched] = found[order][first]
