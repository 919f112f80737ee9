"""Samplers: which pixels of a training pair are compared, and which comparisons match.

Every sampler takes the network outputs of both images of a pair (the dicts that
:meth:`cv2r2d2.nets.R2D2Net.forward` returns) and the absolute flow ``aflow``
(B, 2, H1, W1): for each pixel (x1, y1) of image 1, the position (x2, y2) in image 2
of the same point, in image-2 pixels, NaN where it has none.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Outputs", "Samples", "flow_to_grid", "FullSampler", "SubSampler", "NghSampler2"]

# A network's output on a batch: descriptors (B, D, H, W), reliability and repeatability
# (B, 1, H, W).
Outputs = Dict[str, torch.Tensor]

# Normalised grid coordinate standing for "no target": far outside any image.
_OUTSIDE = 1e4


class Samples(NamedTuple):
    """What a sampler gives the AP losses.

    Attributes:
        scores: (N, M) cosine similarities of N queries with M candidates each.
        labels: (N, M) bool, True where the candidate is the query's match.
        mask: (N,) bool, True for queries with a target inside image 2.
        reliability: (N,) reliability of each query, in [0, 1].
    """

    scores: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor
    reliability: torch.Tensor


def flow_to_grid(aflow: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Absolute flow -> a ``grid_sample`` grid (``align_corners=True``).

    Args:
        aflow: (B, 2, H1, W1) target positions (x, y) in pixels of an image of
            ``height`` x ``width``; NaN where undefined.

    Returns:
        (B, H1, W1, 2) normalised coordinates, NaN sent far outside the image.
    """
    if height < 2 or width < 2:
        raise ValueError(f"image 2 must be at least 2 x 2 pixels, got {height} x {width}")
    scale = aflow.new_tensor([2.0 / (width - 1), 2.0 / (height - 1)]).view(1, 2, 1, 1)
    grid = torch.nan_to_num(aflow * scale - 1, nan=_OUTSIDE)
    return grid.permute(0, 2, 3, 1)


def _check_pair(
    output1: Outputs, output2: Outputs, aflow: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate the inputs of a sampler; returns desc1, desc2, rel1, rel2, aflow (float32)."""
    for name, output in (("output1", output1), ("output2", output2)):
        if not isinstance(output, dict) or not {"descriptors", "reliability"} <= set(output):
            raise TypeError(f"{name} must be a dict with 'descriptors' and 'reliability'")
    if not isinstance(aflow, torch.Tensor):
        raise TypeError(f"aflow must be a tensor, got {type(aflow).__name__}")
    desc1, desc2 = output1["descriptors"].float(), output2["descriptors"].float()
    rel1, rel2 = output1["reliability"].float(), output2["reliability"].float()
    if desc1.ndim != 4 or desc2.ndim != 4 or desc1.shape[:2] != desc2.shape[:2]:
        raise ValueError(
            f"descriptors must be (B, D, H, W) with equal B and D, got "
            f"{tuple(desc1.shape)} and {tuple(desc2.shape)}"
        )
    for rel, desc, name in ((rel1, desc1, "output1"), (rel2, desc2, "output2")):
        if rel.shape != (desc.shape[0], 1) + desc.shape[2:]:
            raise ValueError(
                f"{name}['reliability'] must be (B, 1, H, W) = "
                f"{(desc.shape[0], 1) + tuple(desc.shape[2:])}, got {tuple(rel.shape)}"
            )
    expected = (desc1.shape[0], 2) + desc1.shape[2:]
    if aflow.shape != expected:
        raise ValueError(f"aflow must be (B, 2, H1, W1) = {expected}, got {tuple(aflow.shape)}")
    return desc1, desc2, rel1, rel2, aflow.float()


def _check_int(name: str, value: object, low: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return value


class FullSampler(nn.Module):
    """Warps image 2's descriptors and reliability into image 1's frame along ``aflow``."""

    @staticmethod
    def _warp(
        desc2: torch.Tensor, rel2: torch.Tensor, aflow: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        grid = flow_to_grid(aflow, *desc2.shape[-2:])
        sample = dict(mode="bilinear", padding_mode="zeros", align_corners=True)
        descriptors = F.grid_sample(desc2, grid, **sample)
        reliability = F.grid_sample(rel2, grid, **sample)
        ones = torch.ones_like(rel2)
        mask = F.grid_sample(ones, grid, mode="nearest", padding_mode="zeros", align_corners=True)
        return descriptors, reliability, mask[:, 0] > 0.5

    def forward(
        self, output1: Outputs, output2: Outputs, aflow: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Bilinear warp (zero padding) of image 2's maps to image 1's pixels.

        Returns:
            descriptors (B, D, H1, W1), reliability (B, 1, H1, W1) of image 2 seen from
            image 1, and the validity mask (B, H1, W1) bool: True where the target lies
            in image 2 (nearest sampling of ones).
        """
        _, desc2, _, rel2, aflow = _check_pair(output1, output2, aflow)
        return self._warp(desc2, rel2, aflow)


class SubSampler(FullSampler):
    """Queries and database on regular grids after warping image 2 into image 1.

    Queries are image 1's pixels on a grid of step ``subq``, the database the warped
    image 2's pixels on a grid of step ``subd``, both at least ``border`` pixels from
    the edges; a query matches the database entry at the same pixel (of the same image).

    Args:
        border: margin in pixels (>= 0).
        subq: query grid step (> 0), a multiple of ``subd``.
        subd: database grid step (> 0).
        perimage: compare each query with its own image's database only; otherwise with
            the database of the whole batch.
    """

    def __init__(
        self, border: int = 16, subq: int = 8, subd: int = 8, perimage: bool = False
    ) -> None:
        super().__init__()
        self.border = _check_int("border", border, 0)
        self.subq = _check_int("subq", subq, 1)
        self.subd = _check_int("subd", subd, 1)
        if subq % subd:
            raise ValueError(f"subq must be a multiple of subd, got subq={subq}, subd={subd}")
        self.perimage = bool(perimage)

    def forward(
        self, output1: Outputs, output2: Outputs, aflow: torch.Tensor
    ) -> Samples:
        """Score every query against the database.

        Returns:
            :class:`Samples` with N = B x (queries per image) rows and M = database size
            per image (``perimage``) or B x that; a query's reliability is the mean of
            image 1's and the warped image 2's at its pixel.
        """
        desc1, desc2, rel1, rel2, aflow = _check_pair(output1, output2, aflow)
        desc2, rel2, valid = self._warp(desc2, rel2, aflow)
        batch, dim, height, width = desc1.shape
        b = self.border
        if height <= 2 * b or width <= 2 * b:
            raise ValueError(f"border {b} leaves no pixel in a {height} x {width} map")
        qy = torch.arange(b, height - b, self.subq, device=desc1.device)
        qx = torch.arange(b, width - b, self.subq, device=desc1.device)
        dy = torch.arange(b, height - b, self.subd, device=desc1.device)
        dx = torch.arange(b, width - b, self.subd, device=desc1.device)
        queries = desc1[:, :, qy][:, :, :, qx].flatten(2).transpose(1, 2)  # (B, nq, D)
        database = desc2[:, :, dy][:, :, :, dx].flatten(2).transpose(1, 2)  # (B, nd, D)
        mask = valid[:, qy][:, :, qx].flatten(1)
        reliability = (rel1 + rel2)[:, 0, qy][:, :, qx].flatten(1) / 2
        qyy, qxx = torch.meshgrid(qy, qx, indexing="ij")
        dyy, dxx = torch.meshgrid(dy, dx, indexing="ij")
        same_pixel = (qyy.reshape(-1, 1) == dyy.reshape(1, -1)) & (
            qxx.reshape(-1, 1) == dxx.reshape(1, -1)
        )  # (nq, nd)
        if self.perimage:
            scores = torch.bmm(queries, database.transpose(1, 2)).flatten(0, 1)
            labels = same_pixel.repeat(batch, 1)
        else:
            scores = queries.reshape(-1, dim) @ database.reshape(-1, dim).t()
            labels = torch.block_diag(*[same_pixel] * batch)
        return Samples(scores, labels, mask.flatten(), reliability.flatten())


class NghSampler2(nn.Module):
    """The paper's training sampler: positives and negatives around each query's target.

    For each query pixel of image 1, its target in image 2 is ``aflow`` rounded to the
    nearest pixel. Candidates are image 2's pixels at offsets (i, j) from the target,
    on a grid of step ``subd``: positives where i^2 + j^2 <= pos_d^2, negatives where
    neg_d^2 <= i^2 + j^2 <= ngh^2; plus distractors from every image of the batch.
    Image 2 is not warped. Defaults are the paper's training settings.

    Args:
        ngh: radius of the neighbourhood (pixels).
        subq: query grid step; negative: (H - 2 border)(W - 2 border) / subq^2 random
            queries per image instead of a grid.
        subd: step of the offset grid around the target (1 <= subd <= ngh).
        pos_d: radius of the positives (0 <= pos_d < neg_d).
        neg_d: inner radius of the negative ring (neg_d <= ngh).
        border: margin of the queries and distractors (>= ngh; None: ngh).
        maxpool_pos: keep only the best-scoring positive of each query.
        subd_neg: distractor grid step in image 2 (negative: as many random pixels;
            0: no distractors).
    """

    def __init__(
        self,
        ngh: int = 7,
        subq: int = -8,
        subd: int = 1,
        pos_d: int = 3,
        neg_d: int = 5,
        border: Optional[int] = 16,
        maxpool_pos: bool = True,
        subd_neg: int = -8,
    ) -> None:
        super().__init__()
        for name, value in (("ngh", ngh), ("subq", subq), ("subd", subd), ("pos_d", pos_d),
                            ("neg_d", neg_d), ("subd_neg", subd_neg)):
            _check_int(name, value)
        if subq == 0:
            raise ValueError("subq must be non-zero (a grid step, or minus one for random queries)")
        if not 0 <= pos_d < neg_d <= ngh:
            raise ValueError(
                f"expected 0 <= pos_d < neg_d <= ngh, got pos_d={pos_d}, neg_d={neg_d}, ngh={ngh}"
            )
        if not 1 <= subd <= ngh:
            raise ValueError(f"expected 1 <= subd <= ngh, got subd={subd}, ngh={ngh}")
        border = ngh if border is None else _check_int("border", border)
        if border < ngh:
            raise ValueError(f"border must be >= ngh, got border={border}, ngh={ngh}")
        self.ngh, self.subq, self.subd = ngh, subq, subd
        self.pos_d, self.neg_d, self.border = pos_d, neg_d, border
        self.maxpool_pos, self.subd_neg = bool(maxpool_pos), subd_neg
        steps = range(-(ngh // subd) * subd, ngh + 1, subd)
        offsets = torch.tensor([(i, j) for j in steps for i in steps]).t()  # (2, K): dx, dy
        radius2 = (offsets**2).sum(0)
        self.register_buffer("pos_offsets", offsets[:, radius2 <= pos_d**2], persistent=False)
        ring = (radius2 >= neg_d**2) & (radius2 <= ngh**2)
        self.register_buffer("neg_offsets", offsets[:, ring], persistent=False)

    def _positions(
        self, step: int, batch: int, height: int, width: int, device: torch.device
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(n,) image index, y and x of the pixels of a grid of ``step`` (random if < 0)."""
        b = self.border
        if height <= 2 * b or width <= 2 * b:
            raise ValueError(f"border {b} leaves no pixel in a {height} x {width} map")
        if step > 0:
            y, x = torch.meshgrid(
                torch.arange(b, height - b, step), torch.arange(b, width - b, step), indexing="ij"
            )
            y, x = y.reshape(1, -1).expand(batch, -1), x.reshape(1, -1).expand(batch, -1)
        else:
            # Drawn on the CPU so that a seeded run is the same on every device.
            n = max(1, (height - 2 * b) * (width - 2 * b) // step**2)
            y = torch.randint(b, height - b, (batch, n))
            x = torch.randint(b, width - b, (batch, n))
        index = torch.arange(batch).view(-1, 1).expand_as(y)
        return index.reshape(-1).to(device), y.reshape(-1).to(device), x.reshape(-1).to(device)

    def forward(
        self, output1: Outputs, output2: Outputs, aflow: torch.Tensor
    ) -> Samples:
        """Sample queries, their positives, negatives and distractors.

        Returns:
            :class:`Samples` whose columns are [positive(s) | negatives | distractors];
            with ``maxpool_pos`` one positive column, and a query's reliability is the
            mean of image 1's at the query and image 2's at the chosen positive (at the
            target otherwise).
        """
        desc1, desc2, rel1, rel2, aflow = _check_pair(output1, output2, aflow)
        batch, dim, height, width = desc1.shape
        height2, width2 = desc2.shape[-2:]
        device = desc1.device
        b, y1, x1 = self._positions(self.subq, batch, height, width, device)
        target = aflow[b, :, y1, x1].round()  # (N, 2)
        valid = torch.isfinite(target).all(1)
        valid &= (target[:, 0] >= 0) & (target[:, 0] < width2)
        valid &= (target[:, 1] >= 0) & (target[:, 1] < height2)
        target = torch.where(valid[:, None], target, torch.zeros_like(target)).long()
        x2, y2 = target[:, 0], target[:, 1]
        queries = desc1[b, :, y1, x1]  # (N, D)
        flat2 = desc2.permute(0, 2, 3, 1).reshape(batch, height2 * width2, dim)

        def around(offsets: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            xs = (x2[:, None] + offsets[0]).clamp(0, width2 - 1)
            ys = (y2[:, None] + offsets[1]).clamp(0, height2 - 1)
            candidates = flat2[b[:, None], ys * width2 + xs]  # (N, K, D)
            return (candidates * queries[:, None]).sum(-1), xs, ys

        positives, px, py = around(self.pos_offsets)
        if self.maxpool_pos:
            positives, best = positives.max(dim=1, keepdim=True)
            px, py = px.gather(1, best)[:, 0], py.gather(1, best)[:, 0]
        else:
            px, py = x2, y2
        reliability = (rel1[b, 0, y1, x1] + rel2[b, 0, py, px]) / 2
        negatives, _, _ = around(self.neg_offsets)
        columns = [positives, negatives]
        if self.subd_neg:
            db, dy, dx = self._positions(self.subd_neg, batch, height2, width2, device)
            distractors = queries @ desc2[db, :, dy, dx].t()  # (N, Nd)
            near = (b[:, None] == db[None]) & (
                (dx[None] - x2[:, None]) ** 2 + (dy[None] - y2[:, None]) ** 2 < self.neg_d**2
            )
            columns.append(distractors.masked_fill(near, 0.0))
        scores = torch.cat(columns, dim=1)
        labels = torch.zeros_like(scores, dtype=torch.bool)
        labels[:, : positives.shape[1]] = True
        return Samples(scores, labels, valid, reliability)
