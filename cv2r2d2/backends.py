"""The network runner behind an ``R2D2Feature``: which backend, built from which model
file, and the thread count it runs with.

Torch backends (``"torch"``, ``"reference"``) load a checkpoint (:mod:`cv2r2d2.weights`)
into :class:`~cv2r2d2.torch_runner.TorchRunner`; ONNX backends (``"onnxruntime"``,
``"opencv"``) run an exported file (:mod:`cv2r2d2.onnx_runner`), exporting a registry
model once when no file is found. Torch and the exporter are imported only when needed,
so the ONNX backends run without PyTorch.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Iterator, Optional, Union

from .config import ONNX_BACKENDS, TORCH_BACKENDS, check_backend
from .extractor import NetworkRunner
from .onnx_runner import OnnxRuntimeRunner, OpenCVRunner
from .weights import MODELS, WeightsNotFoundError, cache_dir, find_onnx_model

__all__ = ["make_runner", "make_onnx_runner", "onnx_model_file", "torch_threads"]

logger = logging.getLogger(__name__)


def make_runner(model: str, device: Optional[str], backend: str, half: bool = False,
                num_threads: Optional[int] = None) -> NetworkRunner:
    """A runner of ``model`` (registry name, checkpoint or ``.onnx`` path) on ``backend``.

    ``half`` (float16) needs the torch backend; ``num_threads`` is the ONNX session's
    (torch's count is process-wide: see :func:`torch_threads`).
    """
    check_backend(backend)
    if half and backend != "torch":
        raise ValueError(f"half=True needs the torch backend on CUDA, got backend={backend!r}")
    if backend in TORCH_BACKENDS:
        from .torch_runner import TorchRunner
        from .weights import load_model

        return TorchRunner(load_model(model, device=device), optimize=backend == "torch", half=half)
    return make_onnx_runner(model, device=device, backend=backend, num_threads=num_threads)


def onnx_model_file(model: Union[str, os.PathLike]) -> Path:
    """The ``.onnx`` file of a path or a registry name (:func:`~cv2r2d2.weights.find_onnx_model`),
    exporting a registry model once into :func:`~cv2r2d2.weights.cache_dir` when no
    file is found (which needs PyTorch)."""
    try:
        return find_onnx_model(model)
    except WeightsNotFoundError as exc:
        name = os.fspath(model)
        if name not in MODELS:
            raise
        if importlib.util.find_spec("torch") is None:
            raise WeightsNotFoundError(f"{exc} (Exporting it here needs PyTorch.)") from None
        target = cache_dir() / f"{name}.onnx"
        logger.warning("no exported %s.onnx found: exporting it once to %s (this uses PyTorch)",
                       name, target)
        from .onnx_export import export_fp32

        export_fp32(name, target)
        return target


def make_onnx_runner(
    model: Union[str, os.PathLike],
    device: Optional[str] = None,
    backend: str = "onnxruntime",
    num_threads: Optional[int] = None,
) -> Union[OnnxRuntimeRunner, OpenCVRunner]:
    """A runner for an exported R2D2 model.

    Args:
        model: a ``.onnx`` path (fp32 or int8 export) or a registry name (see
            :func:`onnx_model_file`).
        device: None or ``"cpu"``; ``"cuda[:N]"`` with onnxruntime-gpu.
        backend: ``"onnxruntime"`` or ``"opencv"`` (``cv2.dnn``).
        num_threads: intra-op threads; None reads ``$CV2R2D2_NUM_THREADS``, 0 keeps the
            runtime's default (onnxruntime: one per physical core).
    """
    check_backend(backend, ONNX_BACKENDS)
    path = onnx_model_file(model)
    runner_class = OnnxRuntimeRunner if backend == "onnxruntime" else OpenCVRunner
    return runner_class(path, device=device, num_threads=num_threads)


@contextlib.contextmanager
def torch_threads(num_threads: Optional[int], backend: str) -> Iterator[None]:
    """torch's process-wide thread count set to ``num_threads`` (None or 0: unchanged)
    for the duration of the block, on a torch backend, and restored after it."""
    if not num_threads or backend not in TORCH_BACKENDS:
        yield
        return
    import torch  # already imported by the torch runner

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
