"""ONNX backends of the extractor's :class:`~cv2r2d2.runner.NetworkRunner` seam.

An exported R2D2 graph (see :mod:`cv2r2d2.export`) runs in ONNX Runtime or in OpenCV's
``cv2.dnn``; everything around it (pyramid resizing, the heads' activations,
descriptor sampling and normalisation) is numpy and mirrors the torch backend
operation for operation, so that the whole extraction runs without PyTorch.
Neither this module nor anything it imports at module level imports torch.

Like the torch backend, a runner asked for a box of a level's map runs the graph on
the box grown by the network's receptive-field halo only, so memory is bounded by the
tile size. The halo and the crop alignment are written into the file's metadata at
export (:data:`HALO_KEY`, :data:`ALIGNMENT_KEY`); a file without them (an older
export) runs every level whole, with a warning.
"""
from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path
from typing import Dict, Iterator, Mapping, Optional, Tuple, Union

import cv2
import numpy as np

from .config import NUM_THREADS_ENV, thread_count
from .tiling import halo_window
from .weights import CheckpointError

__all__ = [
    "ALIGNMENT_KEY",
    "HALO_KEY",
    "INPUT_NAME",
    "OUTPUT_NAMES",
    "NUM_THREADS_ENV",
    "OnnxRuntimeRunner",
    "OpenCVRunner",
    "read_metadata",
]

logger = logging.getLogger(__name__)

# The exported graph's interface (written by cv2r2d2.export).
INPUT_NAME = "image"
OUTPUT_NAMES = ("descriptors_raw", "reliability_logits", "repeatability_logit")
"""The exported graph's outputs, in order."""
# Metadata keys of the receptive-field halo and the crop alignment, in input pixels
# (see torch_runner.receptive_halo), as decimal strings.
HALO_KEY = "cv2r2d2.receptive_halo"
ALIGNMENT_KEY = "cv2r2d2.alignment"
"""Metadata key of the pooling alignment of tile boxes (a decimal string)."""

Box = Tuple[int, int, int, int]


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a (C, H, W) float32 array, as ``F.interpolate`` computes it.

    align_corners=False, no antialiasing, float32 source positions and weights.
    ``cv2.resize`` is not used: on float images its INTER_LINEAR results differ from
    torch's by up to 1e-4 relative (OpenCV 5.0), beyond float rounding.
    """

    def taps(size_in: int, size_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        scale = np.float32(size_in) / np.float32(size_out)
        # torch computes scale * (i + 0.5) - 0.5 with one fused multiply-add in float32;
        # the float64 product of two float32 numbers, rounded once, is that result.
        source = (np.float64(scale) * (np.arange(size_out) + 0.5) - 0.5).astype(np.float32)
        source = np.maximum(source, np.float32(0))
        first = source.astype(np.int64)
        second = np.minimum(first + 1, size_in - 1)
        weight = np.clip(source - first.astype(np.float32), 0, 1).astype(np.float32)
        return first, second, np.float32(1) - weight, weight

    x0, x1, wx0, wx1 = taps(image.shape[2], width)
    y0, y1, wy0, wy1 = taps(image.shape[1], height)
    # Along the width first, then the height: the order of torch's CPU kernel.
    rows = image[:, :, x0] * wx0 + image[:, :, x1] * wx1
    out = rows[:, y0, :] * wy0[:, None] + rows[:, y1, :] * wy1[:, None]
    return np.ascontiguousarray(out, np.float32)


def _l2_normalize(vectors: np.ndarray, axis: int) -> np.ndarray:
    # As F.normalize: divide by max(norm, 1e-12).
    norm = np.sqrt(np.sum(vectors * vectors, axis=axis, keepdims=True, dtype=np.float32))
    return vectors / np.maximum(norm, np.float32(1e-12))


def _reliability(logits: np.ndarray) -> np.ndarray:
    """(2, h, w) logits -> (h, w) softmax probability of channel 1."""
    top = np.maximum(logits[0], logits[1])
    e0 = np.exp(logits[0] - top)
    e1 = np.exp(logits[1] - top)
    return np.ascontiguousarray(e1 / (e0 + e1), np.float32)


def _repeatability(logit: np.ndarray) -> np.ndarray:
    """(h, w) logit u -> softplus(u) / (1 + softplus(u)), softplus as torch's (threshold 20)."""
    softplus = np.where(logit > 20, logit, np.log1p(np.exp(np.minimum(logit, np.float32(20)))))
    return np.ascontiguousarray(softplus / (np.float32(1) + softplus), np.float32)


class OnnxLevelOutput:
    """One level's outputs, computed from the graph's raw outputs in numpy."""

    def __init__(self, raw: np.ndarray, reliability_logits: np.ndarray, repeatability_logit: np.ndarray):
        self._raw = raw  # (dim, h, w), not normalised
        self.reliability = _reliability(reliability_logits)
        self.repeatability = _repeatability(repeatability_logit)

    def descriptors_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n,) map coordinates -> (n, dim) L2-normalised bilinear samples, borders clamped."""
        raw = self._raw
        _, h, w = raw.shape
        x = np.clip(np.asarray(x, np.float32), 0, w - 1)
        y = np.clip(np.asarray(y, np.float32), 0, h - 1)
        x0 = np.floor(x).astype(np.int64)
        y0 = np.floor(y).astype(np.int64)
        if w > 1:
            x0 = np.minimum(x0, w - 2)
        if h > 1:
            y0 = np.minimum(y0, h - 2)
        x1 = np.minimum(x0 + 1, w - 1)
        y1 = np.minimum(y0 + 1, h - 1)
        fx = x - x0.astype(np.float32)
        fy = y - y0.astype(np.float32)
        top = raw[:, y0, x0] * (1 - fx) + raw[:, y0, x1] * fx
        bottom = raw[:, y1, x0] * (1 - fx) + raw[:, y1, x1] * fx
        samples = np.ascontiguousarray((top * (1 - fy) + bottom * fy).T)
        return _l2_normalize(samples, axis=1)

    def dense_descriptors(self) -> np.ndarray:
        return _l2_normalize(self._raw, axis=0)


class _OnnxRunner:
    """What both ONNX backends share: numpy image handles, cropping, the heads outside the graph."""

    def __init__(self, path: Union[str, os.PathLike], num_threads: Optional[int]) -> None:
        self.path = Path(path)
        self.num_threads = thread_count(num_threads)
        # Input pixels of context a box needs, or None: the file does not say, so every
        # run covers the whole image (and the extractor does not tile).
        self.halo: Optional[int] = None
        self._alignment = 1

    def _probe(self) -> None:
        """Learn the descriptor size and the map size rule from one tiny forward pass.

        A network whose middle layers are pooled by k (a power of two) gives maps of
        k * floor(n / k) pixels for n; on 63 x 64 pixels that is (64 - k) x 64.
        """
        raw = self._forward(np.zeros((1, 3, 63, 64), np.float32))[0]
        self.descriptor_size = int(raw.shape[1])
        self._stride = 64 - int(raw.shape[2])
        if raw.shape[3] != 64 or self._stride < 1 or self._stride & (self._stride - 1):
            raise CheckpointError(f"{self.path}: unexpected map size {raw.shape[2:]} for a 63 x 64 input")

    def _set_halo(self, metadata: Mapping[str, str]) -> None:
        """Read the halo and alignment from the file's metadata (after :meth:`_probe`)."""
        if HALO_KEY not in metadata or ALIGNMENT_KEY not in metadata:
            logger.warning(
                "%s has no %s / %s metadata (an export by an older cv2r2d2): every pyramid "
                "level runs whole, so tile_size does not bound memory; export it again to "
                "run tiles", self.path, HALO_KEY, ALIGNMENT_KEY)
            return
        values = {}
        for key in (HALO_KEY, ALIGNMENT_KEY):
            text = metadata[key]
            if not text.isdigit():
                raise CheckpointError(f"{self.path}: metadata {key} must be an integer >= 0, got {text!r}")
            values[key] = int(text)
        halo, alignment = values[HALO_KEY], values[ALIGNMENT_KEY]
        # The pooling factor sets both the crop alignment and the map size rule.
        if alignment != self._stride:
            raise CheckpointError(
                f"{self.path}: metadata {HALO_KEY}={halo}, {ALIGNMENT_KEY}={alignment} do not fit "
                f"the graph, whose maps are pooled by {self._stride}"
            )
        self.halo, self._alignment = halo, alignment

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Map size (h', w') for a height x width input."""
        return height // self._stride * self._stride, width // self._stride * self._stride

    def prepare(self, image: np.ndarray) -> np.ndarray:
        """(3, H, W) normalised float32 image -> a C-contiguous float32 handle (no copy if it is one)."""
        return np.ascontiguousarray(image, np.float32)

    def resize(self, image: np.ndarray, height: int, width: int) -> np.ndarray:
        return resize_bilinear(image, height, width)

    def run(self, image: np.ndarray, box: Optional[Box] = None) -> OnnxLevelOutput:
        """Network outputs on the whole (3, H, W) image, or on ``box`` = (y0, y1, x0, x1) of its map.

        The graph runs on the box grown by the halo (the whole image when the file
        gives none); the maps inside the box equal those of a whole-image run.
        """
        in_rows, in_cols, rows, cols = halo_window(
            box, self.output_size(*image.shape[1:]), image.shape[1:], self.halo, self._alignment
        )
        crop = np.ascontiguousarray(image[None, :, in_rows, in_cols])
        raw, reliability_logits, repeatability_logit = self._forward(crop)
        return OnnxLevelOutput(
            raw[0, :, rows, cols],
            reliability_logits[0, :, rows, cols],
            repeatability_logit[0, 0, rows, cols],
        )

    def forward(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The graph's raw outputs (descriptors_raw, reliability_logits,
        repeatability_logit) for a (B, 3, H, W) float32 normalised batch."""
        return self._forward(batch)

    def _forward(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError


class OnnxRuntimeRunner(_OnnxRunner):
    """Runs an exported R2D2 graph (fp32 or int8) with ONNX Runtime.

    The session runs with the CPU memory arena and memory patterns off (with the arena,
    peak memory roughly doubles as the pyramid walks through sizes) and ``num_threads``
    intra-op threads.
    """

    def __init__(self, path: Union[str, os.PathLike], device: Optional[str] = None,
                 num_threads: Optional[int] = None) -> None:
        try:
            import onnxruntime
        except ImportError as exc:
            raise ImportError(
                "backend='onnxruntime' needs the onnxruntime package: pip install onnxruntime"
            ) from exc
        super().__init__(path, num_threads)
        options = onnxruntime.SessionOptions()
        options.enable_cpu_mem_arena = False
        # Memory patterns are planned per input shape, and tiles come in many shapes:
        # off, the int8 network's peak on brooklyn fell from 650-730 to 616 MB, at the
        # same speed.
        options.enable_mem_pattern = False
        options.intra_op_num_threads = self.num_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = onnxruntime.InferenceSession(
            str(self.path), sess_options=options, providers=_providers(device, onnxruntime)
        )
        _check_interface([i.name for i in self.session.get_inputs()],
                         [o.name for o in self.session.get_outputs()], self.path)
        self._probe()
        self._set_halo(self.session.get_modelmeta().custom_metadata_map)

    def _forward(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch}))


def _providers(device: Optional[str], onnxruntime) -> list:
    if device is None or device == "cpu":
        return ["CPUExecutionProvider"]
    if isinstance(device, str) and (device == "cuda" or device.startswith("cuda:")):
        available = onnxruntime.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise ValueError(
                f"device={device!r} needs onnxruntime-gpu (CUDAExecutionProvider); "
                f"available providers: {', '.join(available)}"
            )
        index = device.partition(":")[2] or "0"
        if not index.isdigit():
            raise ValueError(f"device must be 'cuda' or 'cuda:N', got {device!r}")
        return [("CUDAExecutionProvider", {"device_id": int(index)}), "CPUExecutionProvider"]
    raise ValueError(f"device must be None, 'cpu', 'cuda' or 'cuda:N' for onnxruntime, got {device!r}")


class OpenCVRunner(_OnnxRunner):
    """Runs an exported R2D2 graph (fp32 or int8) with ``cv2.dnn`` (CPU); needs only OpenCV.

    OpenCV's thread pool is process-wide: with ``num_threads`` set, it is changed
    around each forward pass and restored afterwards.
    """

    def __init__(self, path: Union[str, os.PathLike], device: Optional[str] = None,
                 num_threads: Optional[int] = None) -> None:
        if device not in (None, "cpu"):
            raise ValueError(f"backend='opencv' runs on the CPU only (device None or 'cpu'), got {device!r}")
        super().__init__(path, num_threads)
        try:
            self._net = cv2.dnn.readNetFromONNX(str(self.path))
        except cv2.error as exc:
            raise CheckpointError(f"OpenCV cannot read {self.path} as an ONNX R2D2 model: {exc}") from exc
        self._probe()
        self._set_halo(read_metadata(self.path))

    def _forward(self, batch: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        previous = cv2.getNumThreads()
        if self.num_threads:
            cv2.setNumThreads(self.num_threads)
        try:
            self._net.setInput(batch, INPUT_NAME)
            outputs = self._net.forward(list(OUTPUT_NAMES))
        finally:
            if self.num_threads:
                cv2.setNumThreads(previous)
        return tuple(np.asarray(o, np.float32) for o in outputs)


# ModelProto.metadata_props and StringStringEntryProto's key and value (onnx.proto).
_METADATA_FIELD, _KEY_FIELD, _VALUE_FIELD = 14, 1, 2


def _varint(data: Union[bytes, mmap.mmap], position: int) -> Tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, position


def _fields(data: Union[bytes, mmap.mmap], start: int, end: int) -> Iterator[Tuple[int, int, int]]:
    """(field number, start, end) of the length-delimited fields of one protobuf message."""
    position = start
    while position < end:
        tag, position = _varint(data, position)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, position = _varint(data, position)
            continue
        if wire_type == 2:
            length, position = _varint(data, position)
            if position + length > end:
                raise ValueError("a field runs past the end of its message")
            yield number, position, position + length
            position += length
            continue
        if wire_type not in (1, 5):
            raise ValueError(f"unexpected protobuf wire type {wire_type}")
        position += 8 if wire_type == 1 else 4


def read_metadata(path: Union[str, os.PathLike]) -> Dict[str, str]:
    """The metadata (``metadata_props``) of an ``.onnx`` file, without the onnx package.

    Only the model's top-level protobuf fields are walked: the graph is skipped, not
    read, so this costs about nothing whatever the file's size.
    """
    metadata = {}
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for number, start, end in _fields(data, 0, len(data)):
                if number == _METADATA_FIELD:
                    entry = {n: data[a:b].decode("utf-8") for n, a, b in _fields(data, start, end)}
                    metadata[entry.get(_KEY_FIELD, "")] = entry.get(_VALUE_FIELD, "")
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a readable ONNX file: {exc}") from exc
    return metadata


def _check_interface(inputs: list, outputs: list, path: Path) -> None:
    if inputs != [INPUT_NAME] or list(outputs) != list(OUTPUT_NAMES):
        raise CheckpointError(
            f"{path} is not a cv2r2d2 ONNX export: expected input {INPUT_NAME!r} and outputs "
            f"{', '.join(OUTPUT_NAMES)}, got {inputs} -> {outputs}"
        )
