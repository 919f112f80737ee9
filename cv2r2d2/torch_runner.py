"""The PyTorch backend of the extractor's :class:`~cv2r2d2.runner.NetworkRunner` seam."""
from __future__ import annotations

import ctypes
import math
import os
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .tiling import halo_window
from .nets import FoldedNet, R2D2Net, fold_batchnorm, reliability_map, repeatability_map

__all__ = ["TorchRunner", "TorchLevelOutput", "receptive_halo"]

Box = Tuple[int, int, int, int]


def _layers(net: Union[R2D2Net, FoldedNet]) -> List[nn.Module]:
    return list(net.trunk if isinstance(net, FoldedNet) else net.ops)


def _factor(value: Union[int, float, Tuple]) -> float:
    return float(value[0] if isinstance(value, tuple) else value)


def receptive_halo(net: Union[R2D2Net, FoldedNet]) -> Tuple[int, int]:
    """Context an output pixel depends on, and the alignment crops must keep.

    Returns:
        (halo, alignment), pixels: map values further than ``halo`` from the edge of an
        input crop that starts at a multiple of ``alignment`` (the pooling factor)
        equal those of the whole image.
    """
    reach, scale, alignment = 0.0, 1.0, 1
    for layer in _layers(net):
        if isinstance(layer, nn.Conv2d):
            # "Same" convolutions: a tap reaches as far as the padding on each side.
            reach += scale * max(layer.padding)
        elif isinstance(layer, nn.MaxPool2d):
            k = int(_factor(layer.kernel_size))
            reach += scale * (k - 1)
            scale *= k
            alignment *= k
        elif isinstance(layer, nn.Upsample):
            reach += scale  # bilinear interpolation reads one coarse pixel further
            scale /= _factor(layer.scale_factor)
    halo = int(math.ceil(reach)) + 2
    return halo + (-halo) % alignment, alignment


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    """glibc's ``malloc_trim``, or None on other C libraries."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        return ctypes.CDLL(None).malloc_trim
    except (ValueError, OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def _release_freed_memory() -> None:
    """Return the C heap's free pages to the system (glibc only; changes no setting).

    glibc serves blocks under its adaptive mmap threshold (up to 32 MB: a tile's 32-
    and 64-channel activations) from its heap and keeps them there once freed; without
    this, a tile's freed activations stay resident under the next tile's 128-channel
    ones, adding tens of MB to the peak.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _bilinear_gather(raw: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample (dim, h, w) at float positions (n,) with border clamping -> (n, dim)."""
    _, h, w = raw.shape
    x = x.clamp(0, w - 1)
    y = y.clamp(0, h - 1)
    x0 = x.floor().long().clamp(max=max(w - 2, 0))
    y0 = y.floor().long().clamp(max=max(h - 2, 0))
    x1 = (x0 + 1).clamp(max=w - 1)
    y1 = (y0 + 1).clamp(max=h - 1)
    fx = (x - x0).unsqueeze(1)
    fy = (y - y0).unsqueeze(1)
    # Rows of a (h, w, dim) view: each sample reads its pixels' channels in one run on
    # channels-last maps (3-4x faster than gathering (dim, n) columns; same arithmetic).
    # A bf16 map's samples are interpolated in float32 (a no-op on float32 maps).
    pixels = raw.permute(1, 2, 0)
    top = pixels[y0, x0].float() * (1 - fx) + pixels[y0, x1].float() * fx
    bottom = pixels[y1, x0].float() * (1 - fx) + pixels[y1, x1].float() * fx
    return top * (1 - fy) + bottom * fy


class TorchLevelOutput:
    """One level's (or tile's) outputs: maps on the host, raw descriptors on the device."""

    def __init__(self, raw: torch.Tensor, reliability: torch.Tensor, repeatability: torch.Tensor):
        self._raw = raw  # (dim, h, w), not normalised
        self.reliability = np.ascontiguousarray(reliability.cpu().numpy())
        self.repeatability = np.ascontiguousarray(repeatability.cpu().numpy())

    def descriptors_at(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n,) map coordinates -> (n, dim) L2-normalised descriptors."""
        device = self._raw.device
        with torch.inference_mode():
            samples = _bilinear_gather(
                self._raw,
                torch.from_numpy(np.ascontiguousarray(x, np.float32)).to(device),
                torch.from_numpy(np.ascontiguousarray(y, np.float32)).to(device),
            )
            # Normalising the few kept vectors gives what normalising the whole map
            # would, at a fraction of the cost.
            return F.normalize(samples, p=2, dim=1).cpu().numpy()

    def dense_descriptors(self) -> np.ndarray:
        with torch.inference_mode():
            return F.normalize(self._raw.float(), p=2, dim=0).cpu().numpy()


def _half_dtype(device: torch.device) -> torch.dtype:
    """bfloat16, except on a CUDA GPU without it (before Ampere): float16."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


_DTYPES: Dict[str, Callable[[torch.device], torch.dtype]] = {
    "fp32": lambda device: torch.float32,
    "bf16": _half_dtype,
}


class _ConvReLU(nn.Module):
    """A convolution and the ReLU after it in one oneDNN call (CPU): the ReLU is applied
    as the convolution writes its output, sparing a pass over each map. The same values
    as the two modules; measured 1.11x on the bf16 trunk (Zen 4, 2 threads)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups, "relu", [], "")


def _fused(net: FoldedNet) -> FoldedNet:
    """``net`` with each convolution + ReLU pair of its trunk as one :class:`_ConvReLU`
    (unchanged where this torch has no oneDNN fused convolution)."""
    layers = list(net.trunk)
    if not torch.backends.mkldnn.is_available() or \
            not hasattr(torch.ops.mkldnn, "_convolution_pointwise") or \
            any(isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros" for layer in layers):
        return net
    fused: List[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.ReLU) and fused and isinstance(fused[-1], nn.Conv2d):
            fused[-1] = _ConvReLU(fused[-1])
        else:
            fused.append(layer)
    return FoldedNet(nn.Sequential(*fused), net.clf, net.sal, net.out_dim).eval()


class TorchRunner:
    """Runs an R2D2 network on one image (or one tile of it) at a time.

    With ``optimize=True`` (the default) BatchNorm is folded into the convolutions and
    tensors are channels-last: the outputs stay equal to the original's up to float
    rounding, at about half the CPU time (oneDNN is fastest on NHWC input).
    ``optimize=False`` runs the network as the original implementation does, as a
    baseline.

    ``precision="bf16"`` (with ``optimize=True``) runs the folded network and its
    activations in bfloat16 (on CUDA, float16 where the GPU lacks bfloat16); oneDNN
    accumulates in float32, and the maps and descriptors are returned in float32.
    """

    def __init__(
        self,
        net: Union[R2D2Net, FoldedNet],
        device: Optional[Union[str, torch.device]] = None,
        optimize: bool = True,
        precision: str = "fp32",
    ):
        if precision not in _DTYPES:
            raise ValueError(f"the torch runner computes in {' or '.join(_DTYPES)}, got "
                             f"precision={precision!r}")
        if precision != "fp32" and not optimize:
            raise ValueError(f"precision={precision!r} needs optimize=True: the un-optimised "
                             "network runs as the original, in fp32")
        if optimize and isinstance(net, R2D2Net):
            net = fold_batchnorm(net.eval())
        if device is not None:
            net = net.to(device)
        self.device = next(net.parameters()).device
        self.precision = precision
        self._format = torch.channels_last if optimize else torch.contiguous_format
        self._dtype = _DTYPES[precision](self.device)
        self.net = net.eval().to(dtype=self._dtype, memory_format=self._format)
        if precision == "bf16" and self.device.type == "cpu":
            self.net = _fused(self.net)
        self.descriptor_size = int(net.out_dim)
        self.halo, self._alignment = receptive_halo(net)
        self._layers = _layers(net)

    def _output_length(self, n: int) -> int:
        for layer in self._layers:
            if isinstance(layer, nn.MaxPool2d):
                n //= int(_factor(layer.kernel_size))
            elif isinstance(layer, nn.Upsample):
                n = int(n * _factor(layer.scale_factor))
        return n

    def output_size(self, height: int, width: int) -> Tuple[int, int]:
        """Map size (h', w') for a height x width input."""
        return self._output_length(height), self._output_length(width)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """(3, H, W) normalised float32 array -> (1, 3, H, W) tensor on the device."""
        tensor = torch.from_numpy(np.ascontiguousarray(image, np.float32))[None].to(self.device)
        return tensor.contiguous(memory_format=self._format)

    def resize(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        with torch.inference_mode():
            return F.interpolate(image, (height, width), mode="bilinear", align_corners=False)

    def run(self, image: torch.Tensor, box: Optional[Box] = None) -> TorchLevelOutput:
        """Network outputs on the whole image, or on ``box`` = (y0, y1, x0, x1) of its map."""
        if self.device.type == "cpu":
            _release_freed_memory()
        in_rows, in_cols, rows, cols = halo_window(
            box, self.output_size(*image.shape[2:]), image.shape[2:], self.halo, self._alignment
        )
        with torch.inference_mode():
            crop = image[:, :, in_rows, in_cols].to(self._dtype)
            raw, reliability_logits, repeatability_logit = self.net.forward_raw(crop)
            return TorchLevelOutput(
                raw[0, :, rows, cols],
                reliability_map(reliability_logits[:, :, rows, cols].float())[0, 0],
                repeatability_map(repeatability_logit[:, :, rows, cols].float())[0, 0],
            )
