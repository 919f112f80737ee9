"""The torch device a computation runs on: the default choice, and the check of a given one.

A device is checked where it is given (``R2D2Feature.create``, ``load_model``, the
matching functions, the command line), so that a machine without it gets a one-line
error naming the devices it has, before any work is done or any file written, rather
than torch's ``AssertionError`` from deep inside the first computation.

Torch is imported only when a function here is called. This module sits at the bottom
of the package: it imports nothing from it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Union

if TYPE_CHECKING:
    import torch

__all__ = ["available_devices", "torch_device"]


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def available_devices() -> List[str]:
    """The torch devices of this machine: ``"cpu"``, then ``"cuda:0"``... and ``"mps"``."""
    import torch

    devices = ["cpu"] + [f"cuda:{i}" for i in range(_cuda_count())]
    if torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def torch_device(device: Optional[Union[str, "torch.device"]] = None) -> "torch.device":
    """``device`` as a ``torch.device`` once checked; None: CUDA when available, else the CPU.

    Raises:
        TypeError: ``device`` is neither None, a string nor a ``torch.device``.
        ValueError: it is not a device name torch knows, or this machine (or this
            PyTorch build) does not have it; the message lists the devices it has.
    """
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', or a torch.device, "
                        f"got {type(device).__name__}")
    available = ", ".join(available_devices())
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device must be a torch device such as 'cpu', 'cuda' or 'cuda:1', got "
                         f"{device!r}; available here: {available}") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        count = _cuda_count()
        if (parsed.index or 0) < count:
            return parsed
        if torch.version.cuda is None:
            reason = f"this PyTorch ({torch.__version__}) was built without CUDA"
        elif not count:
            reason = "PyTorch finds no CUDA GPU"
        else:
            reason = f"this machine has {count} CUDA device(s)"
    else:
        try:
            torch.empty(0, device=parsed)
            return parsed
        except (RuntimeError, AssertionError) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else "PyTorch cannot use it"
    raise ValueError(f"device {str(device)!r} is not available: {reason}; available: {available}")
