"""Arithmetic precision of the network, and the CPU probe behind ``precision="auto"``.

``"fp32"`` is the exact mode (the original's output); ``"bf16"`` runs the folded network
and its activations in bfloat16 on the torch backend; ``"int8"`` runs an int8 network on
ONNX Runtime (built on first use, :mod:`cv2r2d2.derived`); ``"auto"`` picks the fastest
of these whose accuracy loss was measured within 0.01 MMA@3 on the CPU kind it runs on.

Measured (``benchmarks/bench_extract.py``, brooklyn.png, paper settings, 2 threads):

- A CPU of the same family without native bf16 (AVX2 only): bf16 (autocast) ran at
  0.57 times the fp32 speed, so bf16 is chosen only where the CPU computes it natively.

This module imports nothing from the package and never imports torch itself: the
probe reads torch's capability only when torch is already loaded or can be loaded.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, FrozenSet, Optional, Tuple, Union

__all__ = [
    "PRECISIONS",
    "CpuCapability",
    "check_precision",
    "probe_cpu",
    "choose_precision",
]

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8", "auto")
"""The ``precision=`` values."""
# /proc/cpuinfo flags that compute bf16 products natively, and int8 dot products.
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
_REPORTED_FLAGS = frozenset({"avx2", "avx512f"}) | BF16_FLAGS | VNNI_FLAGS
# Why a precision is slower than fp32 on a CPU without the named support, as measured.
_SLOWER = {
    "bf16": "bf16 without native bf16 arithmetic (avx512_bf16 or amx_bf16) ran at 0.57 times "
            "the fp32 speed on an AVX2 CPU of this project's machines (torch 2.13, 2 threads)",
}


def check_precision(precision: Any, backend: str = "torch", model: Union[str, os.PathLike] = "") -> str:
    """Validate a precision name (one of :data:`PRECISIONS`), and that it can run on
    ``backend`` with ``model``: bf16 on the torch backend only, nothing but fp32 on
    ``"reference"`` (the original's way), and an exported ``.onnx`` file as it is (fp32
    or auto: bf16 and int8 are built from a checkpoint or a model name)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision in ("fp32", "auto"):
        return precision
    if backend == "reference":
        raise ValueError(f"precision={precision!r} needs backend='torch': 'reference' runs the "
                         "network as the original, in fp32")
    if precision == "bf16" and backend != "torch":
        raise ValueError(f"precision='bf16' needs backend='torch', got backend={backend!r} "
                         "(ONNX backends run fp32 or int8)")
    if is_onnx_file(model):
        raise ValueError(f"precision={precision!r} applies to a checkpoint or a model name, "
                         f"not to an exported file ({os.fspath(model)!r} runs as exported: use "
                         "precision='fp32' or 'auto')")
    return precision


def is_onnx_file(model: Union[str, os.PathLike]) -> bool:
    """Whether ``model`` names an exported ``.onnx`` file (model names never end so)."""
    return Path(os.fspath(model)).suffix.lower() == ".onnx"


@dataclass(frozen=True)
class CpuCapability:
    """What the CPU computes natively, as :func:`probe_cpu` finds it.

    Attributes:
        model: the CPU's name (``/proc/cpuinfo``'s model name, else the platform's).
        torch_capability: ``torch.backends.cpu.get_cpu_capability()`` (``"AVX512"``,
            ``"AVX2"``, ``"DEFAULT"``...), or ``""`` without torch.
        flags: those of avx2, avx512f, avx512_bf16, amx_bf16, avx512_vnni, avx_vnni and
            amx_int8 that ``/proc/cpuinfo`` lists (empty elsewhere than Linux).
    """

    model: str
    torch_capability: str
    flags: FrozenSet[str]

    @property
    def native_bf16(self) -> bool:
        """bf16 products at (at least) twice the fp32 rate: AVX512_BF16 or AMX."""
        return bool(BF16_FLAGS & self.flags)

    @property
    def vnni(self) -> bool:
        """int8 dot products in one instruction: AVX512_VNNI, AVX_VNNI or AMX."""
        return bool(VNNI_FLAGS & self.flags)

    def describe(self) -> str:
        """One line for logs and benchmark reports."""
        flags = " ".join(sorted(self.flags)) or "none of the bf16/int8 flags"
        torch_part = f"torch capability {self.torch_capability}, " if self.torch_capability else ""
        return f"{self.model} ({torch_part}flags: {flags})"


def _cpuinfo(path: Path) -> Tuple[str, FrozenSet[str]]:
    """The first processor's model name and flags in a ``/proc/cpuinfo``-style file."""
    model, flags = "", frozenset()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key == "flags" and not flags:
            flags = frozenset(value.split())
        if model and flags:
            break
    return model, flags


def _torch_capability() -> str:
    if "torch" not in sys.modules and importlib.util.find_spec("torch") is None:
        return ""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


@functools.lru_cache(maxsize=None)
def probe_cpu(cpuinfo: str = "/proc/cpuinfo") -> CpuCapability:
    """This machine's :class:`CpuCapability` (read once per process and file)."""
    model, flags = _cpuinfo(Path(cpuinfo))
    return CpuCapability(model or platform.processor() or platform.machine() or "unknown CPU",
                         _torch_capability(), flags & _REPORTED_FLAGS)


def choose_precision(capability: CpuCapability, torch_available: bool,
                     onnxruntime_available: bool) -> Tuple[str, str]:
    """What ``precision="auto"`` runs on a CPU of ``capability``, and why.

    The fastest precision measured within 0.01 MMA@3 of the exact mode: int8 where the
    CPU has VNNI (and onnxruntime is installed), else bf16 where it computes bf16
    natively (and torch is installed), else fp32.

    Returns:
        (precision, reason): one of ``"int8"``, ``"bf16"``, ``"fp32"``, and a sentence.
    """
    if capability.vnni and onnxruntime_available:
        return "int8", "the CPU has VNNI (int8 dot products)"
    if capability.native_bf16 and torch_available:
        return "bf16", "the CPU computes bf16 natively, without VNNI or onnxruntime for int8"
    missing = []
    if not capability.vnni:
        missing.append("no VNNI for int8")
    elif not onnxruntime_available:
        missing.append("int8 needs onnxruntime")
    if not capability.native_bf16:
        missing.append("no native bf16")
    elif not torch_available:
        missing.append("bf16 needs torch")
    return "fp32", "; ".join(missing)


def warn_if_slower(precision: str, capability: Optional[CpuCapability] = None) -> bool:
    """Warn (once per process and precision) where ``precision`` was measured slower than
    fp32 on a CPU like this one; whether it is."""
    capability = probe_cpu() if capability is None else capability
    slower = precision == "bf16" and not capability.native_bf16
    if slower:
        _warn_once(precision, capability.describe())
    return slower


@functools.lru_cache(maxsize=None)
def _warn_once(precision: str, cpu: str) -> None:
    logger.warning("precision=%r is likely slower than fp32 on this CPU, %s: %s", precision,
                   cpu, _SLOWER[precision])
