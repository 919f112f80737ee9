"""Training losses: AP by quantisation against exact AP, gradients, and each loss's formula."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cv2r2d2.nets import Quad_L2Net_ConfCFS
from cv2r2d2.train.losses import (
    APLoss,
    CosimLoss,
    MultiLoss,
    PeakyLoss,
    PixelAPLoss,
    ReliabilityLoss,
    default_loss,
)
from cv2r2d2.train.samplers import Samples

from test_train_samplers import translation_flow


def exact_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Average precision of one ranking, by sorting (mean precision at each positive)."""
    order = np.argsort(-scores, kind="stable")
    hits = labels[order].astype(float)
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / hits.sum())


@pytest.fixture(scope="module")
def ranking():
    """64 queries x 300 candidates: uniform scores in [0, 1], ~10% positives (>= 1 each)."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.rand(64, 300, generator=generator) < 0.1
    labels[:, 0] = True
    # Positives score higher on average, so that AP is neither 0 nor 1; no ties.
    scores = torch.rand(64, 300, generator=generator) * 0.7 + 0.3 * labels
    exact = torch.tensor([exact_ap(s.numpy(), l.numpy()) for s, l in zip(scores, labels)])
    return scores, labels, exact


def test_ap_converges_to_the_exact_average_precision(ranking):
    scores, labels, exact = ranking
    errors = {
        nq: (APLoss(nq)(scores, labels) - exact).abs().max().item() for nq in (5, 20, 100, 1000)
    }
    assert errors[100] < 0.02
    assert errors[1000] < errors[100] < errors[20] < errors[5]


def test_ap_soft_assignment_is_the_triangle_kernel_with_open_ends(ranking):
    scores, labels, _ = ranking
    scores = scores * 1.4 - 0.2  # also outside [min, max]: the end bins take those
    nq, low, high = 12, 0.0, 1.0
    delta = (high - low) / (nq - 1)
    centres = high - torch.arange(nq) * delta
    q = (1 - (scores[..., None] - centres).abs() / delta).clamp(min=0)  # (N, M, nq)
    q[..., 0] = torch.where(scores >= centres[0], torch.ones_like(scores), q[..., 0])
    q[..., -1] = torch.where(scores <= centres[-1], torch.ones_like(scores), q[..., -1])
    n, r = q.sum(1), (q * labels[..., None]).sum(1)
    precision = r.cumsum(1) / (1e-16 + n.cumsum(1))
    expected = (precision * r / r.sum(1, keepdim=True)).sum(1)
    torch.testing.assert_close(APLoss(nq, low, high)(scores, labels), expected)


def test_ap_gradient_is_finite_nonzero_and_rewards_positives(ranking):
    scores, labels, _ = ranking
    scores = scores.clone().requires_grad_(True)
    APLoss(20)(scores, labels).sum().backward()
    grad = scores.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Raising a negative's score never raises AP; raising the positives' raises it.
    assert (grad[~labels] <= 0).all() and grad[~labels].sum() < 0
    assert grad[labels].sum() > 0


def test_ap_gradcheck():
    generator = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 15, generator=generator, dtype=torch.float64).requires_grad_(True)
    labels = torch.rand(3, 15, generator=generator) < 0.3
    labels[:, 0] = True
    assert torch.autograd.gradcheck(lambda s: APLoss(10)(s, labels), (scores,), eps=1e-7)


def test_ap_rejects_bad_arguments():
    with pytest.raises(ValueError):
        APLoss(1)
    with pytest.raises(ValueError):
        APLoss(10, min_score=1, max_score=0)
    with pytest.raises(ValueError):
        APLoss()(torch.zeros(3, 4), torch.zeros(3, 5, dtype=torch.bool))


class FixedSampler(torch.nn.Module):
    """Gives the same samples whatever the inputs."""

    def __init__(self, samples: Samples) -> None:
        super().__init__()
        self.samples = samples

    def forward(self, *args):
        return self.samples


@pytest.mark.parametrize("reliability", [0.0, 1.0, 0.3])
def test_reliability_loss_follows_its_formula(ranking, reliability):
    scores, labels, _ = ranking
    mask = torch.arange(len(scores)) % 4 != 0  # a quarter of the queries are invalid
    rel = torch.full((len(scores),), reliability)
    sampler = FixedSampler(Samples(scores, labels, mask, rel))
    base = 0.4
    loss = ReliabilityLoss(sampler, base=base, nq=20)(None, None, None)
    ap = APLoss(20)(scores, labels)[mask]
    expected = (1 - ap * reliability - (1 - reliability) * base).mean()
    torch.testing.assert_close(loss, expected)
    if reliability == 0:
        torch.testing.assert_close(loss, torch.tensor(1 - base))  # whatever the AP
    if reliability == 1:  # the plain AP loss
        torch.testing.assert_close(loss, PixelAPLoss(sampler, nq=20)(None, None, None))


def test_losses_are_zero_and_attached_without_valid_query(ranking):
    scores, labels, _ = ranking
    scores = scores.clone().requires_grad_(True)
    sampler = FixedSampler(Samples(scores, labels, torch.zeros(len(scores), dtype=torch.bool),
                                   torch.ones(len(scores))))
    loss = ReliabilityLoss(sampler)(None, None, None)
    assert loss.item() == 0 and loss.requires_grad


def test_reliability_loss_rejects_bad_base():
    with pytest.raises(ValueError):
        ReliabilityLoss(base=1.5)


def smooth_map(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.rand(batch, 1, height // 4, width // 4, generator=generator)
    return torch.nn.functional.interpolate(noise, (height, width), mode="bilinear",
                                           align_corners=False)


def rep(repeatability: torch.Tensor) -> dict:
    return {"repeatability": repeatability}


def test_cosim_loss_vanishes_for_maps_related_by_the_flow():
    batch, height, width = 2, 48, 64
    rep1 = smooth_map(batch, height, width)
    loss = CosimLoss(N=16)
    # Translation: image 2 is larger and holds image 1 at (5, 3).
    rep2 = torch.rand(batch, 1, height + 10, width + 10)
    rep2[:, :, 3:3 + height, 5:5 + width] = rep1
    translated = loss(rep(rep1), rep(rep2), translation_flow(batch, height, width, 5, 3))
    # Zoom: image 2 is image 1 upsampled x2 (corners aligned), aflow = 2 (x, y).
    rep2 = torch.nn.functional.interpolate(rep1, (2 * height - 1, 2 * width - 1), mode="bilinear",
                                           align_corners=True)
    zoomed = loss(rep(rep1), rep(rep2), 2 * translation_flow(batch, height, width, 0, 0))
    unrelated = loss(rep(rep1), rep(smooth_map(batch, height, width, seed=1)),
                     translation_flow(batch, height, width, 0, 0))
    assert translated.item() < 1e-5 and zoomed.item() < 1e-5
    assert unrelated.item() > 100 * max(translated.item(), zoomed.item(), 1e-6)


def test_peaky_loss_prefers_peaks():
    flat = torch.full((2, 1, 64, 64), 0.5)
    peaky = torch.zeros(2, 1, 64, 64)
    peaky[:, :, 8::16, 8::16] = 1.0
    loss = PeakyLoss(N=16)
    flat_loss, peaky_loss = loss(rep(flat), rep(flat), None), loss(rep(peaky), rep(peaky), None)
    assert peaky_loss < flat_loss
    assert flat_loss > 0.9  # a flat map has no peak (only the zero-padded borders differ)
    # The two images count equally.
    torch.testing.assert_close(loss(rep(flat), rep(peaky), None), (flat_loss + peaky_loss) / 2)


@pytest.mark.parametrize("N", [0, 7, 3.0])
def test_patch_losses_reject_bad_N(N):
    for cls in (CosimLoss, PeakyLoss):
        with pytest.raises(ValueError):
            cls(N)


def test_multi_loss_rejects_bad_arguments():
    with pytest.raises(ValueError):
        MultiLoss(1, CosimLoss(), 1)
    with pytest.raises(TypeError):
        MultiLoss("1", CosimLoss())
    with pytest.raises(ValueError, match="distinct"):
        MultiLoss(1, CosimLoss(), 1, CosimLoss())


def test_default_loss_on_a_network_reports_terms_and_gives_gradients():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = Quad_L2Net_ConfCFS(mchan=1, dim=16)
        images = torch.randn(2, 2, 3, 48, 48)
        aflow = translation_flow(2, 48, 48, 2.5, -1.5)
        loss, details = default_loss(N=16)(net(images[0]), net(images[1]), aflow)
    assert set(details) == {"loss_reliability", "loss_cosim16", "loss_peaky16", "loss"}
    assert details["loss"] == pytest.approx(
        details["loss_reliability"] + details["loss_cosim16"] + details["loss_peaky16"], rel=1e-6
    )
    weighted = MultiLoss(2, CosimLoss(16), 0.5, PeakyLoss(16))
    _, terms = weighted(net(images[0]), net(images[1]), aflow)
    assert terms["loss"] == pytest.approx(
        2 * terms["loss_cosim16"] + 0.5 * terms["loss_peaky16"], rel=1e-6
    )
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())
    # Every convolution learns (biases before a BatchNorm have no effect, hence no gradient).
    assert all(p.grad.abs().sum() > 0 for p in net.parameters() if p.ndim > 1)
