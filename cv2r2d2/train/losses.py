"""R2D2's training losses: differentiable average precision, repeatability losses.

Every loss is called as ``loss(output1, output2, aflow)`` with the network outputs of
both images of a pair (dicts of ``descriptors`` (B, D, H, W), ``reliability`` and
``repeatability`` (B, 1, H, W)) and the absolute flow ``aflow`` (B, 2, H1, W1) from
image 1 to image 2 (pixels, NaN where undefined); it returns a scalar tensor. The
losses compute in float32 whatever the network's precision.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .samplers import NghSampler2, Outputs, flow_to_grid

__all__ = [
    "APLoss",
    "PixelAPLoss",
    "ReliabilityLoss",
    "CosimLoss",
    "PeakyLoss",
    "MultiLoss",
    "default_loss",
]


class APLoss(nn.Module):
    """Differentiable average precision by soft quantisation of the scores into bins.

    ``nq`` bins are centred from ``max_score`` down to ``min_score``; a score is shared
    between its two nearest bins (triangle kernels), the end bins being open-ended.
    Bin counts then give precision and recall per bin, and AP = sum(precision x recall).

    Args:
        nq: number of bins (>= 2); the result tends to the exact AP as it grows.
        min_score: the lowest score (cosine similarities: 0).
        max_score: the highest score (cosine similarities: 1).
    """

    def __init__(self, nq: int = 20, min_score: float = 0.0, max_score: float = 1.0) -> None:
        super().__init__()
        if isinstance(nq, bool) or not isinstance(nq, int) or nq < 2:
            raise ValueError(f"nq must be an int >= 2, got {nq!r}")
        if not max_score > min_score:
            raise ValueError(f"expected min_score < max_score, got {min_score!r}, {max_score!r}")
        self.nq, self.min_score, self.max_score = nq, float(min_score), float(max_score)

    def forward(self, scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Average precision of each query's ranking (the loss is 1 - AP).

        Args:
            scores: (N, M) similarities of N queries with M candidates.
            labels: (N, M) bool or {0, 1}: which candidates are matches.

        Returns:
            (N,) soft AP in [0, 1] (0 for a query without any match).
        """
        if scores.ndim != 2 or labels.shape != scores.shape:
            raise ValueError(
                f"scores and labels must be (N, M) of one shape, got {tuple(scores.shape)} "
                f"and {tuple(labels.shape)}"
            )
        scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
        labels = labels.to(scores.dtype)
        gap = self.max_score - self.min_score
        # Position in bin units from the highest bin; each score lies between bins
        # k and k + 1 with weights 1 - frac and frac, which equals the triangle kernels.
        position = ((self.max_score - scores) * ((self.nq - 1) / gap)).clamp(0, self.nq - 1)
        lower = position.detach().floor().clamp(max=self.nq - 2).long()
        frac = position - lower
        counts = scores.new_zeros(scores.shape[0], self.nq)
        n = counts.scatter_add(1, lower, 1 - frac).scatter_add(1, lower + 1, frac)
        r = counts.scatter_add(1, lower, (1 - frac) * labels)
        r = r.scatter_add(1, lower + 1, frac * labels)
        precision = r.cumsum(1) / (1e-16 + n.cumsum(1))
        recall = r / r.sum(1, keepdim=True).clamp_min(1e-16)
        return (precision * recall).sum(1)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # With no valid query the loss is 0, still attached to the graph.
    if not bool(mask.any()):
        return values.sum() * 0
    return values[mask].mean()


class PixelAPLoss(nn.Module):
    """Mean over valid queries of 1 - AP of the sampler's rankings.

    Args:
        sampler: gives scores, labels, mask and reliabilities (default: the paper's
            :class:`NghSampler2`).
        nq: number of AP bins.
    """

    name = "pixAP"

    def __init__(self, sampler: Optional[nn.Module] = None, nq: int = 20) -> None:
        super().__init__()
        self.sampler = NghSampler2() if sampler is None else sampler
        self.aploss = APLoss(nq)

    def query_loss(self, ap: torch.Tensor, reliability: torch.Tensor) -> torch.Tensor:
        """(N,) AP and reliability -> (N,) per-query loss."""
        return 1 - ap

    def forward(
        self, output1: Outputs, output2: Outputs, aflow: torch.Tensor
    ) -> torch.Tensor:
        """Scalar loss of a batch of pairs (see the module docstring)."""
        samples = self.sampler(output1, output2, aflow)
        ap = self.aploss(samples.scores, samples.labels)
        return _masked_mean(self.query_loss(ap, samples.reliability), samples.mask)


class ReliabilityLoss(PixelAPLoss):
    """Per query 1 - AP x rel - (1 - rel) x base: the AP loss weighted by reliability.

    A query with reliability 0 costs ``1 - base`` whatever its AP, so the network learns
    to call reliable the pixels whose AP exceeds ``base``.

    Args:
        sampler: as :class:`PixelAPLoss`.
        base: the AP a reliable pixel must beat, in [0, 1].
        nq: number of AP bins.
    """

    name = "reliability"

    def __init__(
        self, sampler: Optional[nn.Module] = None, base: float = 0.5, nq: int = 20
    ) -> None:
        super().__init__(sampler, nq)
        if not isinstance(base, numbers.Real) or not 0.0 <= base <= 1.0:
            raise ValueError(f"base must be a number in [0, 1], got {base!r}")
        self.base = float(base)

    def query_loss(self, ap: torch.Tensor, reliability: torch.Tensor) -> torch.Tensor:
        return 1 - ap * reliability - (1 - reliability) * self.base


def _check_patch_size(N: int) -> int:
    if isinstance(N, bool) or not isinstance(N, int) or N < 2 or N % 2:
        raise ValueError(f"N must be an even int >= 2, got {N!r}")
    return N


class CosimLoss(nn.Module):
    """1 - mean cosine similarity of N x N patches of the two repeatability maps.

    Image 2's repeatability is warped into image 1 along ``aflow`` (bilinear, border
    padding); both maps are cut into N x N patches with stride N/2.

    Args:
        N: patch size in pixels (even).
    """

    def __init__(self, N: int = 16) -> None:
        super().__init__()
        self.N = _check_patch_size(N)
        self.name = f"cosim{N}"

    def patches(self, repeatability: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> (B, N*N, L) L2-normalised patches."""
        return F.normalize(F.unfold(repeatability, self.N, stride=self.N // 2), p=2, dim=1)

    def forward(
        self, output1: Outputs, output2: Outputs, aflow: torch.Tensor
    ) -> torch.Tensor:
        """Scalar loss of a batch of pairs (see the module docstring)."""
        rep1 = output1["repeatability"].float()
        rep2 = output2["repeatability"].float()
        if rep1.shape[-2] < self.N or rep1.shape[-1] < self.N:
            raise ValueError(f"maps of {tuple(rep1.shape[-2:])} are smaller than N={self.N}")
        grid = flow_to_grid(aflow.float(), *rep2.shape[-2:])
        warped = F.grid_sample(
            rep2, grid, mode="bilinear", padding_mode="border", align_corners=True
        )
        cosine = (self.patches(rep1) * self.patches(warped)).sum(1)
        return 1 - cosine.mean()


class PeakyLoss(nn.Module):
    """1 - mean(local max - local mean) of the repeatability over (N+1) x (N+1) windows.

    Low when each window holds a sharp peak; the map is first smoothed by a 3 x 3 mean.

    Args:
        N: window size minus one, in pixels (even).
    """

    def __init__(self, N: int = 16) -> None:
        super().__init__()
        self.N = _check_patch_size(N)
        self.name = f"peaky{N}"

    def peakiness(self, repeatability: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) -> scalar mean of local max minus local mean."""
        smooth = F.avg_pool2d(repeatability, 3, stride=1, padding=1)
        window = dict(kernel_size=self.N + 1, stride=1, padding=self.N // 2)
        return (F.max_pool2d(smooth, **window) - F.avg_pool2d(smooth, **window)).mean()

    def forward(
        self, output1: Outputs, output2: Outputs, aflow: torch.Tensor
    ) -> torch.Tensor:
        """Scalar loss of a batch of pairs (``aflow`` unused)."""
        peaky1 = self.peakiness(output1["repeatability"].float())
        peaky2 = self.peakiness(output2["repeatability"].float())
        return 1 - (peaky1 + peaky2) / 2


class MultiLoss(nn.Module):
    """Weighted sum of losses: ``MultiLoss(w1, loss1, w2, loss2, ...)``.

    Each loss needs a ``name``; calling returns the total and every term as
    ``{"loss_<name>": value, ..., "loss": total}`` (floats, for logging).
    """

    def __init__(self, *weights_and_losses: object) -> None:
        super().__init__()
        if not weights_and_losses or len(weights_and_losses) % 2:
            raise ValueError("expected alternating weights and losses: MultiLoss(w1, loss1, ...)")
        weights, losses = weights_and_losses[0::2], weights_and_losses[1::2]
        for weight in weights:
            if (isinstance(weight, bool) or not isinstance(weight, numbers.Real)
                    or not math.isfinite(weight)):
                raise TypeError(f"loss weights must be finite numbers, got {weight!r}")
        names = []
        for loss in losses:
            if not isinstance(loss, nn.Module) or not isinstance(getattr(loss, "name", None), str):
                raise TypeError(f"each loss must be an nn.Module with a 'name', got {loss!r}")
            names.append(loss.name)
        if len(set(names)) != len(names):
            raise ValueError(f"loss names must be distinct, got {names}")
        self.weights = [float(w) for w in weights]
        self.losses = nn.ModuleList(losses)

    def forward(
        self, output1: Outputs, output2: Outputs, aflow: torch.Tensor
    ) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Total loss (scalar tensor) and the value of each term."""
        total = 0.0
        details: Dict[str, float] = {}
        for weight, loss in zip(self.weights, self.losses):
            value = loss(output1, output2, aflow)
            total = total + weight * value
            details[f"loss_{loss.name}"] = float(value.detach())
        details["loss"] = float(total.detach())
        return total, details


def default_loss(N: int = 16) -> MultiLoss:
    """The paper's objective: reliability AP loss, cosine-similarity and peakiness (N)."""
    return MultiLoss(1, ReliabilityLoss(), 1, CosimLoss(N), 1, PeakyLoss(N))
