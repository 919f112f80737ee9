"""What an ``R2D2Feature`` is configured with: :class:`R2D2Config`, one object for every
argument of ``R2D2Feature.create``.

It holds the preset it starts from (:mod:`cv2r2d2.presets`), the extraction parameters
(:class:`~cv2r2d2.params.ExtractionParams`), the model, and how the network runs
(device, backend, tiles, precision, threads). ``create()``, ``write``/``read`` (OpenCV's
FileStorage), ``repr``, the command line's R2D2 options and the Ray workers all derive
from it; :meth:`R2D2Config.from_arguments` applies a preset and the arguments that
override it. Each option is validated when the configuration is made (with the checks of
:mod:`cv2r2d2.checks`), with an error that names the option, the value and what is
expected.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Optional, Tuple, Union

import cv2

from .checks import check_backend, check_num_threads, check_subpixel, check_tile_size
from .params import ExtractionParams
from .precision import check_precision
from .presets import DEFAULT_PRESET, get_preset
from .tiling import DEFAULT_TILE_SIZE
from .weights import DEFAULT_MODEL

__all__ = [
    "R2D2Config",
    "BACKENDS",
    "TORCH_BACKENDS",
    "ONNX_BACKENDS",
    "NUM_THREADS_ENV",
]

# "reference" runs the network as the original implementation does (a speed baseline).
TORCH_BACKENDS = ("torch", "reference")
ONNX_BACKENDS = ("onnxruntime", "opencv")
"""Backends that run an exported ``.onnx`` model, without torch."""
BACKENDS = TORCH_BACKENDS + ONNX_BACKENDS
"""Every ``backend=`` value."""
# Thread count of the ONNX backends when the caller gives none (0: the runtime's default).
NUM_THREADS_ENV = "CV2R2D2_NUM_THREADS"


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


# write() stores num_threads=None as -1 (FileStorage has no null).
_NO_THREADS = -1


@dataclass(frozen=True)
class R2D2Config:
    """Every argument of ``R2D2Feature.create``, validated; the defaults are the paper's.

    Build it with :meth:`from_arguments` to start from a preset other than ``"paper"``
    (the fields then hold the preset's values, and the arguments that override them).

    Attributes:
        preset: the name of the preset the configuration started from
            (:data:`cv2r2d2.presets.PRESETS`); the fields hold the resulting values.
        model: an official model name or a checkpoint / ``.onnx`` path.
        params: the extraction parameters (``nfeatures``, ``scale_f``... see
            :class:`~cv2r2d2.params.ExtractionParams`).
        device: torch device; None: CUDA when available, else the CPU. Machine-specific:
            not stored by :meth:`write`.
        backend: one of :data:`BACKENDS`.
        tile_size: pyramid levels over ``tile_size ** 2`` pixels run on tiles (0: never).
        precision: ``"fp32"`` (exact), ``"bf16"`` (torch backend), ``"int8"`` (ONNX Runtime,
            built on first use) or ``"auto"`` (the fastest measured within 0.01 MMA@3
            on this CPU); see :mod:`cv2r2d2.precision`.
        subpixel: sub-pixel keypoint positions (not the original's output): True (a
            parabola on the repeatability peak) or ``"descriptor"`` (then a mean-shift on
            the descriptor map).
        num_threads: CPU threads of the network (None: not set; 0: the runtime's default).
    """

    preset: str = DEFAULT_PRESET
    model: str = DEFAULT_MODEL
    params: ExtractionParams = field(default_factory=ExtractionParams)
    device: Optional[str] = None
    backend: str = "torch"
    tile_size: int = DEFAULT_TILE_SIZE
    precision: str = "fp32"
    subpixel: Union[bool, str] = False
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(
                f"model must be a model name or a checkpoint path, got {self.model!r} "
                "(for the number of keypoints use nfeatures=...)"
            )
        if not isinstance(self.params, ExtractionParams):
            raise TypeError(f"params must be an ExtractionParams, got {type(self.params).__name__}")
        if self.device is not None and not isinstance(self.device, str):
            raise TypeError(f"device must be None or a string such as 'cpu' or 'cuda:0', "
                            f"got {self.device!r}")
        get_preset(self.preset)
        object.__setattr__(self, "model", os.fspath(self.model))
        check_backend(self.backend, BACKENDS)
        object.__setattr__(self, "tile_size", check_tile_size(self.tile_size))
        object.__setattr__(self, "subpixel", check_subpixel(self.subpixel))
        if self.num_threads is not None:
            object.__setattr__(self, "num_threads", check_num_threads(self.num_threads))
        check_precision(self.precision, self.backend, self.model)

    # --- the flat form: create()'s keyword arguments --------------------------------

    @staticmethod
    def argument_names() -> Tuple[str, ...]:
        """The names of ``create()``'s arguments, in its order (``preset`` last)."""
        own = [f.name for f in fields(R2D2Config) if f.name not in ("params", "preset")]
        return (own[0], *(f.name for f in fields(ExtractionParams)), *own[1:], "preset")

    @classmethod
    def from_arguments(cls, **arguments: Any) -> "R2D2Config":
        """A configuration from ``create()``'s keyword arguments: the preset's values
        (``preset``, default ``"paper"``), overridden by the other arguments given."""
        unknown = set(arguments) - set(cls.argument_names())
        if unknown:
            raise TypeError(f"unknown R2D2 option(s): {', '.join(sorted(unknown))} "
                            f"(known: {', '.join(cls.argument_names())})")
        preset = arguments.pop("preset", DEFAULT_PRESET)
        arguments = dict(get_preset(preset).extraction, **arguments)
        names = {f.name for f in fields(ExtractionParams)}
        params = ExtractionParams(**{k: v for k, v in arguments.items() if k in names})
        return cls(preset=preset, params=params,
                   **{k: v for k, v in arguments.items() if k not in names})

    def arguments(self) -> Dict[str, Any]:
        """``create()``'s keyword arguments that give this configuration, in its order."""
        flat = dict(self.params.as_dict(), **{f.name: getattr(self, f.name)
                                             for f in fields(self) if f.name != "params"})
        return {name: flat[name] for name in self.argument_names()}

    def overrides(self) -> Dict[str, Any]:
        """The arguments whose values differ from the preset's (``preset`` excluded)."""
        own = type(self).from_arguments(preset=self.preset).arguments()
        return {name: value for name, value in self.arguments().items()
                if name != "preset" and value != own[name]}

    def replace(self, **arguments: Any) -> "R2D2Config":
        """A copy with some of ``create()``'s arguments changed (validated). A new
        ``preset`` keeps this configuration's overrides of its own preset."""
        return self.from_arguments(**{**self.overrides(), "preset": self.preset, **arguments})

    # --- cv2.FileStorage ------------------------------------------------------------

    def write(self, fs: cv2.FileStorage) -> None:
        """Write every argument but ``device`` (it names this machine's hardware: a file
        written on a GPU machine must load on a laptop) into an open FileStorage node."""
        for name, value in self.arguments().items():
            if name == "device":
                continue
            if isinstance(value, str):
                fs.write(name, value)
            elif value is None:
                fs.write(name, _NO_THREADS)
            elif isinstance(value, (bool, int)) or name in _integer_fields():
                fs.write(name, int(value))
            else:
                fs.write(name, float(value))

    def read(self, node: cv2.FileNode) -> "R2D2Config":
        """This configuration with the values stored in ``node`` by :meth:`write` (absent
        keys keep theirs; the device always does). A stored value that is refused raises
        ``ValueError``/``TypeError`` naming it."""
        changes: Dict[str, Any] = {}
        for name, current in self.arguments().items():
            item = node.getNode(name)
            if name == "device" or item.empty():
                continue
            if name in ("model", "backend", "preset") or item.isString():
                changes[name] = item.string()
                continue
            number = item.real()
            if name == "subpixel":
                if number not in (0, 1):
                    raise ValueError(f"the stored {name} must be 0 or 1, got {number!r}")
                changes[name] = bool(number)
            elif name in _integer_fields() or name in ("tile_size", "num_threads"):
                if number != int(number):
                    raise ValueError(f"the stored {name} must be an integer, got {number!r}")
                changes[name] = int(number)
            else:
                changes[name] = number
        if changes.get("num_threads") == _NO_THREADS:
            changes["num_threads"] = None
        # The stored values are complete: they win over the stored preset's.
        return self.from_arguments(**dict(self.arguments(), **changes))


def _integer_fields() -> Tuple[str, ...]:
    """The ExtractionParams fields that are integers (stored and read as such)."""
    return tuple(f.name for f in fields(ExtractionParams) if f.type in ("int", int))


def write_storage(fs: Union[str, os.PathLike, cv2.FileStorage],
                  write: Callable[[cv2.FileStorage], None], name: Optional[str] = None) -> None:
    """Call ``write`` on ``fs`` open for writing: a file name (created, then closed) or an
    open ``cv2.FileStorage`` (inside a map named ``name`` when one is given)."""
    if isinstance(fs, (str, os.PathLike)):
        storage = cv2.FileStorage(os.fspath(fs), cv2.FILE_STORAGE_WRITE)
        if not storage.isOpened():
            raise OSError(f"cannot open {os.fspath(fs)!r} for writing")
        try:
            write(storage)
        finally:
            storage.release()
        return
    if not isinstance(fs, cv2.FileStorage):
        raise TypeError(f"write() takes a file name or a cv2.FileStorage, got {type(fs).__name__}")
    if name:
        fs.startWriteStruct(name, cv2.FileNode_MAP)
        write(fs)
        fs.endWriteStruct()
    else:
        write(fs)


def read_storage(fn: Union[str, os.PathLike, cv2.FileStorage, cv2.FileNode],
                 read: Callable[[cv2.FileNode], None]) -> None:
    """Call ``read`` on the node ``fn`` names: the root of a file (by name) or of an open
    ``cv2.FileStorage``, or a ``cv2.FileNode`` itself."""
    if isinstance(fn, (str, os.PathLike)):
        path = os.fspath(fn)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such parameter file: {path!r}")
        storage = cv2.FileStorage(path, cv2.FILE_STORAGE_READ)
        try:
            read(storage.root())
        finally:
            storage.release()
    elif isinstance(fn, cv2.FileStorage):
        read(fn.root())
    elif isinstance(fn, cv2.FileNode):
        read(fn)
    else:
        raise TypeError(
            f"read() takes a file name, cv2.FileStorage or cv2.FileNode, got {type(fn).__name__}"
        )
