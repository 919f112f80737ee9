"""Small helpers the rest of the package stands on: optional dependencies, progress bars,
atomic files and the torch device.

- Optional dependencies (h5py, pycolmap, tqdm, matplotlib, ray, onnx...) are imported
  where they are needed, with an error that names the pip command when missing.
- Progress bars are tqdm's, on a terminal only and never required.
- Outputs are written atomically, with the permissions a plain ``open()`` gives them: a
  run killed while writing leaves the old output or the new one, never half of one, so
  every file and folder the package writes is made under a temporary name beside its
  destination (``.<name>.<random>.tmp``) and renamed into place. The temporary file is
  created as ``open(path, "w")`` creates one, mode 0o666 masked by the umask (a folder
  as ``os.mkdir``: 0o777 masked by the umask), not as ``tempfile.mkstemp`` / ``mkdtemp``
  do (0o600 / 0o700 whatever the umask): renamed into place, those would stay unreadable
  to the other users and services of a shared file system.
- A torch device is checked where it is given (``R2D2Feature.create``, ``load_model``,
  the matching functions, the command line), so that a machine without it gets a
  one-line error naming the devices it has, before any work is done or any file
  written, rather than torch's ``AssertionError`` from deep inside the first
  computation. Torch is imported only when a device function is called.

This module sits at the bottom of the package: it imports nothing from it.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import secrets
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import (
    TYPE_CHECKING, Any, Callable, Iterable, Iterator, List, Optional, Sequence, Union,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "PathLike",
    "MissingDependencyError",
    "import_optional",
    "progress",
    "progress_bar",
    "logging_beside_progress",
    "map_blocks_here",
    "TEMPORARY_GLOB",
    "atomic_path",
    "atomic_dir",
    "available_devices",
    "torch_device",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
"""A path: ``str`` or ``os.PathLike``."""


# --- optional dependencies and progress -------------------------------------------


class MissingDependencyError(ImportError):
    """An optional dependency (an extra of the package) is not installed."""


def import_optional(module: str, purpose: str, extra: str = "sfm") -> ModuleType:
    """Import an optional dependency, or raise an error naming the pip command.

    Args:
        module: the module (and PyPI package) name: ``h5py``, ``pycolmap``, ``tqdm``,
            ``matplotlib``, ``ray``.
        purpose: what needs it, for the message (e.g. ``"HDF5 feature files"``).
        extra: the package extra that installs it, for the message.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module} is needed for {purpose} but is not installed: "
            f"pip install {module} (or pip install 'cv2r2d2[{extra}]')"
        ) from exc


def progress_bar(total: Optional[int] = None, enabled: bool = True, desc: str = "",
                 unit: str = "it", **options: Any) -> Optional[Any]:
    """A tqdm bar counting ``unit`` items when enabled and stderr is a terminal, else None.

    ``options`` go to tqdm (``initial``, ``unit_scale``, ``leave``...). Without tqdm no
    bar is shown (a progress bar is no reason to fail), after a log message naming the
    pip command.
    """
    if not enabled or not _stderr_is_terminal():
        return None
    try:
        tqdm = import_optional("tqdm", "progress bars")
    except MissingDependencyError as exc:
        logger.info("%s", exc)
        return None
    return tqdm.tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, **options)


def progress(iterable: Iterable, total: Optional[int] = None, enabled: bool = True,
             desc: str = "", unit: str = "it") -> Iterator:
    """``iterable``, counted by a :func:`progress_bar` (rate per second and time left
    included) that disappears when the iteration ends."""
    bar = progress_bar(total, enabled, desc, unit, leave=False)
    if bar is None:
        yield from iterable
        return
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()


def map_blocks_here(worker: Callable[[], Any], work: Callable[[Any, List[Any]], List[Any]],
                    items: Sequence[Any], show_progress: bool = False, desc: str = "",
                    unit: str = "it") -> List[Any]:
    """``work(state, [item])`` for each of ``items`` in this process, ``state = worker()``
    made once: the results in the order of ``items`` (one or more per item, as ``work``
    returns them). What an executor's ``map_blocks`` does on one machine."""
    state = worker()
    results: List[Any] = []
    for item in progress(items, len(items), show_progress, desc, unit=unit):
        results.extend(work(state, [item]))
    return results


def _stderr_is_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


@contextlib.contextmanager
def logging_beside_progress(*loggers: logging.Logger) -> Iterator[None]:
    """Print the log records of ``loggers`` (default: the root logger) above the
    progress bars, rather than onto the end of a bar (tqdm's logging redirection).

    Their console handlers are swapped for tqdm's and restored on exit; without tqdm,
    nothing changes.
    """
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:
        yield
        return
    with logging_redirect_tqdm(list(loggers) or None):
        yield


# --- atomic files ------------------------------------------------------------------


# The temporary names of this module, for those cleaning up after killed processes.
TEMPORARY_GLOB = ".*.tmp"


def _create_beside(path: Path, make: Callable[[Path], None]) -> Path:
    """Make (``make(name)``) a new temporary file or folder beside ``path``; its name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            make(candidate)
        except FileExistsError:
            continue
        return candidate


def _new_file(path: Path) -> None:
    # O_EXCL: never an existing file; 0o666: the kernel applies the umask, as for open().
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a new, empty temporary file beside ``path``; move it onto ``path`` on success.

    The file has the mode ``open(path, "w")`` would give ``path``; writers may truncate
    and rewrite it (``open(tmp, "wb")``, ``np.savez``, ``h5py.File(tmp, "w")``,
    ``torch.save``...), which keeps that mode. Missing parent folders are created (mode
    0o777 masked by the umask). On an exception the temporary file is removed and
    ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _create_beside(path, _new_file)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a new, empty temporary folder beside ``path``; on success it replaces ``path``.

    The folder has the mode ``os.mkdir(path)`` would give it (0o777 masked by the
    umask). A folder already at ``path`` is moved aside, replaced and then deleted; on
    an exception the temporary folder is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _create_beside(path, lambda name: os.mkdir(name, 0o777))
    try:
        yield tmp
        old = None
        if path.exists():
            old = _create_beside(path, lambda name: os.mkdir(name, 0o700))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


# --- torch devices -----------------------------------------------------------------


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
