"""What an ``R2D2Feature`` is configured with: the backends and the checks of the options.

The extraction parameters (the paper's settings) are :class:`~cv2r2d2.extractor.ExtractionParams`;
the options here say how the network runs (backend, threads, tiles, precision). Each is
validated here and nowhere else, with an error that names the option, the value and
what is expected.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np

__all__ = [
    "BACKENDS",
    "TORCH_BACKENDS",
    "ONNX_BACKENDS",
    "NUM_THREADS_ENV",
    "check_backend",
    "check_flag",
    "check_num_threads",
    "check_tile_size",
    "thread_count",
]

# "reference" runs the network as the original implementation does (a speed baseline).
TORCH_BACKENDS = ("torch", "reference")
ONNX_BACKENDS = ("onnxruntime", "opencv")
BACKENDS = TORCH_BACKENDS + ONNX_BACKENDS
# Thread count of the ONNX backends when the caller gives none (0: the runtime's default).
NUM_THREADS_ENV = "CV2R2D2_NUM_THREADS"


def check_backend(backend: Any, choices: tuple = BACKENDS) -> str:
    """Validate a backend name (one of ``choices``)."""
    if backend not in choices:
        raise ValueError(f"backend must be one of {', '.join(choices)}, got {backend!r}")
    return backend


def check_flag(value: Any, name: str) -> bool:
    """Validate a boolean option (``True``/``False``, numpy's too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_tile_size(tile_size: Any) -> int:
    """Validate a tile side: 0 (never tile) or an integer >= 64 pixels."""
    if isinstance(tile_size, bool) or not isinstance(tile_size, (int, np.integer)) or tile_size < 0:
        raise ValueError(f"tile_size must be an integer >= 0, got {tile_size!r}")
    if 0 < tile_size < 64:
        raise ValueError(f"tile_size must be 0 or >= 64 pixels, got {tile_size!r}")
    return int(tile_size)


def check_num_threads(num_threads: Any, name: str = "num_threads") -> int:
    """Validate a thread count: an integer >= 0 (0: the runtime's default)."""
    if isinstance(num_threads, bool) or not isinstance(num_threads, (int, np.integer)):
        raise TypeError(f"{name} must be an integer >= 0 (0: the runtime's default), got {num_threads!r}")
    if num_threads < 0:
        raise ValueError(f"{name} must be an integer >= 0 (0: the runtime's default), got {num_threads!r}")
    return int(num_threads)


def thread_count(num_threads: Optional[int]) -> int:
    """The requested thread count: the argument, else ``$CV2R2D2_NUM_THREADS``, else 0
    (the runtime's default)."""
    source = "num_threads"
    if num_threads is None:
        text = os.environ.get(NUM_THREADS_ENV, "").strip()
        if not text:
            return 0
        source = NUM_THREADS_ENV
        try:
            num_threads = int(text)
        except ValueError:
            raise ValueError(f"{NUM_THREADS_ENV} must be an integer >= 0, got {text!r}") from None
    return check_num_threads(num_threads, source)
