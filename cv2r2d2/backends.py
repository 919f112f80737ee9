"""The network runner behind an ``R2D2Feature``: which backend and precision, built from
which model file, and the thread count it runs with.

Torch backends (``"torch"``, ``"reference"``) load a checkpoint (:mod:`cv2r2d2.weights`)
into :class:`~cv2r2d2.torch_runner.TorchRunner`, in fp32 or bf16; ONNX backends
(``"onnxruntime"``, ``"opencv"``) run an exported file (:mod:`cv2r2d2.onnx_runner`),
exporting a registry model once when no file is found. ``precision="int8"`` runs the
int8 network built on first use (:mod:`cv2r2d2.derived`) on ONNX Runtime (or
``cv2.dnn`` with ``backend="opencv"``); ``"auto"`` picks one for this machine
(:func:`resolve_precision`). Torch and the exporter are imported only when needed, so
the ONNX backends run without PyTorch.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional, Union

from .checks import check_backend
from .config import BACKENDS, ONNX_BACKENDS, TORCH_BACKENDS
from .runner import NetworkRunner
from .onnx_runner import OnnxRuntimeRunner, OpenCVRunner
from .precision import (
    CpuCapability, check_precision, choose_precision, is_onnx_file, probe_cpu, warn_if_slower,
)
from .weights import MODELS, WeightsNotFoundError, cache_dir, find_onnx_model

__all__ = ["make_runner", "make_onnx_runner", "onnx_model_file"]

logger = logging.getLogger(__name__)


def make_runner(model: str, device: Optional[str], backend: str, precision: str = "fp32",
                num_threads: Optional[int] = None) -> NetworkRunner:
    """A runner of ``model`` (registry name, checkpoint or ``.onnx`` path) on ``backend``
    in ``precision`` (see :func:`resolve_precision`).

    ``num_threads`` is the ONNX session's (torch's count is process-wide: see
    :func:`torch_threads`).
    """
    check_backend(backend, BACKENDS)
    precision = resolve_precision(model, device, backend, precision)
    if precision == "int8":
        from .derived import int8_model

        onnx_backend = backend if backend in ONNX_BACKENDS else "onnxruntime"
        return make_onnx_runner(int8_model(model), device=device, backend=onnx_backend,
                                num_threads=num_threads)
    if backend in TORCH_BACKENDS:
        from .torch_runner import TorchRunner
        from .weights import load_model

        net = load_model(model, device=device)
        if precision != "fp32" and next(net.parameters()).device.type == "cpu":
            warn_if_slower(precision)
        return TorchRunner(net, optimize=backend == "torch", precision=precision)
    return make_onnx_runner(model, device=device, backend=backend, num_threads=num_threads)


def _on_cpu(device: Optional[str], backend: str) -> bool:
    if backend in ONNX_BACKENDS:
        return device in (None, "cpu")
    from .utils import torch_device

    return torch_device(device).type == "cpu"


def resolve_precision(model: Union[str, os.PathLike], device: Optional[str], backend: str,
                      precision: str, capability: Optional[CpuCapability] = None) -> str:
    """The precision a runner of these settings computes in: ``"fp32"``, ``"bf16"`` or
    ``"int8"``.

    ``"auto"`` becomes :func:`~cv2r2d2.precision.choose_precision`'s choice for this CPU
    (``capability``: :func:`~cv2r2d2.precision.probe_cpu`'s by default) on the torch
    backend (bf16 or int8), int8 or fp32 on onnxruntime, and fp32 where no other was
    measured: an ``.onnx`` file (it runs as exported), ``backend="reference"`` or
    ``"opencv"``, a GPU.

    Raises:
        ValueError: an unknown precision, or one these settings cannot run
            (:func:`~cv2r2d2.precision.check_precision`).
    """
    check_precision(precision, backend, model)
    if precision != "auto":
        return precision
    if is_onnx_file(model) or backend in ("reference", "opencv") or not _on_cpu(device, backend):
        return "fp32"
    capability = probe_cpu() if capability is None else capability
    can_build = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx", "torch"))
    chosen, reason = choose_precision(capability, torch_available=backend == "torch",
                                      onnxruntime_available=can_build)
    _tell_auto(chosen, reason, capability.describe())
    return chosen


@functools.lru_cache(maxsize=None)
def _tell_auto(precision: str, reason: str, cpu: str) -> None:
    """Say once per process what precision='auto' chose, and why."""
    logger.info("precision='auto' runs %s on %s: %s", precision, cpu, reason)


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
    if not num_threads or backend not in TORCH_BACKENDS or "torch" not in sys.modules:
        yield  # no torch runner here (an int8 one runs on onnxruntime)
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
