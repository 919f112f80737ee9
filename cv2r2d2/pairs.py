"""Image pairs to match: every pair, sequential pairs (videos), the most similar images
(retrieval, :mod:`cv2r2d2.retrieval`), or a pairs file.

A pairs file (hloc's format) has one ``name0 name1`` per line.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Optional, Sequence, Tuple

from .utils import PathLike, atomic_path

if TYPE_CHECKING:
    from .stores import FeatureStore

__all__ = [
    "SEQUENTIAL_OVERLAP",
    "exhaustive_pairs",
    "sequential_pairs",
    "parse_pairs",
    "read_pairs",
    "write_pairs",
]

SEQUENTIAL_OVERLAP = 5
"""k of ``sequential`` pairs when not given: each image with the k next by name."""


def exhaustive_pairs(names: Sequence[str]) -> List[Tuple[str, str]]:
    """Every pair of distinct names, (names[i], names[j]) for i < j."""
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def sequential_pairs(names: Sequence[str], overlap: int = SEQUENTIAL_OVERLAP) -> List[Tuple[str, str]]:
    """Each name paired with the ``overlap`` names that follow it (for videos)."""
    if overlap < 1:
        raise ValueError(f"the sequential overlap must be >= 1, got {overlap!r}")
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1 : i + 1 + overlap]]


def parse_pairs(spec: str, names: Sequence[str], features: Optional["FeatureStore"] = None,
                show_progress: bool = False) -> List[Tuple[str, str]]:
    """Image pairs from ``exhaustive``, ``sequential[:k]``, ``retrieval:k`` or a pairs file.

    Args:
        spec: ``"exhaustive"``; ``"sequential"`` or ``"sequential:k"`` (each image with
            the k next in name order, default 5); ``"retrieval:k"`` (each image with its
            k most similar, see :func:`cv2r2d2.retrieval.retrieval_pairs`; the index is
            built or updated beside ``features``); or a file of ``name0 name1`` lines.
        names: the images that have features, sorted.
        features: the store holding them (needed by ``retrieval:k``).
        show_progress: a progress bar while retrieval describes images.

    Returns:
        Pairs of distinct names, each unordered pair once.

    Raises:
        ValueError: a malformed spec, ``retrieval:k`` without ``features``, or a pairs
            file naming images without features.
    """
    if spec == "exhaustive":
        return exhaustive_pairs(names)
    if spec == "sequential" or spec.startswith("sequential:"):
        count = spec.partition(":")[2] or str(SEQUENTIAL_OVERLAP)
        if not count.isdigit():
            raise ValueError(f"expected sequential:k with an integer k >= 1, got {spec!r}")
        return sequential_pairs(names, int(count))
    if spec == "retrieval" or spec.startswith("retrieval:"):
        count = spec.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"expected retrieval:k with an integer k >= 1, got {spec!r}")
        if features is None:
            raise ValueError("retrieval pairs need the features store (features=...)")
        from .retrieval import retrieval_pairs

        return retrieval_pairs(features, int(count), names, show_progress=show_progress)
    try:
        listed = read_pairs(spec)
    except FileNotFoundError:
        raise ValueError(
            "pairs must be 'exhaustive', 'sequential[:k]', 'retrieval:k' or a pairs file; "
            f"no file {spec!r}"
        ) from None
    known = set(names)
    unknown = sorted({n for pair in listed for n in pair} - known)
    if unknown:
        raise ValueError(f"{spec} names images without features: {', '.join(unknown[:5])}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    seen = set()
    pairs = []
    for a, b in listed:
        if a != b and (a, b) not in seen and (b, a) not in seen:
            seen.add((a, b))
            pairs.append((a, b))
    return pairs


def read_pairs(path: PathLike) -> List[Tuple[str, str]]:
    """Image pairs from a text file, one ``name0 name1`` per line (hloc's format).

    Blank lines and lines starting with ``#`` are ignored.
    """
    pairs = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{path}:{number}: expected 'name0 name1', got {line!r}")
        pairs.append((parts[0], parts[1]))
    return pairs


def write_pairs(path: PathLike, pairs: Iterable[Tuple[str, str]]) -> None:
    """Write image pairs in :func:`read_pairs`' format, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{a} {b}\n" for a, b in pairs), encoding="utf-8")


