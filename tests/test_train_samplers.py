"""Samplers on constructed data: position-coded descriptors and known (translation) flows.

Descriptors are one-hot codes of a pixel (and image), so a dot product is 1 exactly
between the two pixels a flow relates and 0 elsewhere: a sampler's scores then show
where it looked.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cv2r2d2.train.samplers import FullSampler, NghSampler2, SubSampler, flow_to_grid


def translation_flow(batch: int, height: int, width: int, tx: float, ty: float) -> torch.Tensor:
    """(B, 2, H, W) aflow of a translation: pixel (x, y) of image 1 is (x + tx, y + ty)."""
    y, x = torch.meshgrid(torch.arange(height, dtype=torch.float32),
                          torch.arange(width, dtype=torch.float32), indexing="ij")
    return torch.stack([x + tx, y + ty])[None].repeat(batch, 1, 1, 1)


def one_hot_codes(batch: int, height: int, width: int, per_image: bool = True) -> torch.Tensor:
    """(B, D, H, W) descriptors: the one-hot code of (image, y, x) (or of (y, x) only)."""
    count = (batch if per_image else 1) * height * width
    codes = torch.eye(count).reshape(count, -1 if per_image else 1, height, width)
    codes = codes.permute(1, 0, 2, 3)
    return (codes if per_image else codes.repeat(batch, 1, 1, 1)).contiguous()


def translated_image2(desc1: torch.Tensor, tx: int, ty: int) -> torch.Tensor:
    """Image 2 maps showing image 1's content moved by (tx, ty); zero where nothing maps."""
    desc2 = torch.zeros_like(desc1)
    height, width = desc1.shape[-2:]
    def spans(shift: int, size: int):
        """(source, destination) slices of a shift along one axis."""
        if shift >= 0:
            return slice(0, size - shift), slice(shift, size)
        return slice(-shift, size), slice(0, size + shift)

    (ys, yd), (xs, xd) = spans(ty, height), spans(tx, width)
    desc2[:, :, yd, xd] = desc1[:, :, ys, xs]
    return desc2


def outputs(descriptors: torch.Tensor, reliability: torch.Tensor = None) -> dict:
    if reliability is None:
        reliability = torch.full_like(descriptors[:, :1], 0.5)
    return {"descriptors": descriptors, "reliability": reliability}


@pytest.mark.parametrize(
    "kwargs",
    [dict(pos_d=5, neg_d=5), dict(pos_d=-1), dict(neg_d=8, ngh=7), dict(subd=8, ngh=7),
     dict(subq=0), dict(border=4, ngh=7), dict(subd=0)],
)
def test_ngh_sampler_rejects_bad_constraints(kwargs):
    with pytest.raises(ValueError):
        NghSampler2(**kwargs)


def test_samplers_reject_bad_types_and_grids():
    with pytest.raises(TypeError):
        NghSampler2(ngh=7.5)
    with pytest.raises(ValueError, match="multiple"):
        SubSampler(subq=3, subd=2)
    with pytest.raises(ValueError, match="aflow"):
        FullSampler()(outputs(torch.zeros(1, 4, 8, 8)), outputs(torch.zeros(1, 4, 8, 8)),
                      torch.zeros(1, 2, 8, 9))


def test_paper_defaults():
    sampler = NghSampler2()
    assert (sampler.ngh, sampler.subq, sampler.subd) == (7, -8, 1)
    assert (sampler.pos_d, sampler.neg_d) == (3, 5)
    assert (sampler.border, sampler.maxpool_pos, sampler.subd_neg) == (16, True, -8)
    radius2 = (sampler.pos_offsets**2).sum(0)
    assert radius2.max() <= 9 and sampler.pos_offsets.shape[1] == 29
    radius2 = (sampler.neg_offsets**2).sum(0)
    assert radius2.min() >= 25 and radius2.max() <= 49


def test_flow_to_grid_identity_reproduces_the_image():
    image = torch.rand(2, 3, 9, 13)
    grid = flow_to_grid(translation_flow(2, 9, 13, 0, 0), 9, 13)
    warped = F.grid_sample(image, grid, mode="bilinear", align_corners=True)
    torch.testing.assert_close(warped, image)


def test_full_sampler_warps_along_an_integer_translation():
    batch, height, width, tx, ty = 2, 10, 12, 3, -2
    desc2 = torch.randn(batch, 5, height, width)
    rel2 = torch.rand(batch, 1, height, width)
    aflow = translation_flow(batch, height, width, tx, ty)
    aflow[1, :, 0, 0] = float("nan")
    warped, rel_warped, mask = FullSampler()(
        outputs(torch.zeros_like(desc2)), outputs(desc2, rel2), aflow
    )
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    inside = (x + tx < width) & (y + ty >= 0)
    expected_mask = inside.expand(batch, -1, -1).clone()
    expected_mask[1, 0, 0] = False
    assert torch.equal(mask, expected_mask)
    # Where the target exists, the warped maps are image 2's values at (x + tx, y + ty).
    b, yy, xx = torch.nonzero(mask, as_tuple=True)
    torch.testing.assert_close(warped[b, :, yy, xx], desc2[b, :, yy + ty, xx + tx])
    torch.testing.assert_close(rel_warped[b, 0, yy, xx], rel2[b, 0, yy + ty, xx + tx])
    assert warped[~mask.unsqueeze(1).expand_as(warped)].abs().max() < 1e-5


@pytest.mark.parametrize("subq, subd", [(4, 4), (4, 2)])
@pytest.mark.parametrize("perimage", [False, True])
def test_sub_sampler_ground_truth_matches_pixel_indices(subq, subd, perimage):
    batch, height, width = 2, 16, 20
    desc1 = one_hot_codes(batch, height, width)
    sampler = SubSampler(border=2, subq=subq, subd=subd, perimage=perimage)
    identity = translation_flow(batch, height, width, 0, 0)
    samples = sampler(outputs(desc1), outputs(desc1.clone()), identity)
    queries = len(range(2, height - 2, subq)) * len(range(2, width - 2, subq))
    database = len(range(2, height - 2, subd)) * len(range(2, width - 2, subd))
    assert samples.scores.shape == (batch * queries, database * (1 if perimage else batch))
    assert samples.mask.all()
    # With position codes a score is 1 exactly at the query's own pixel (and image)
    # (up to the rounding of grid_sample's normalised coordinates).
    torch.testing.assert_close(samples.scores, samples.labels.float(), rtol=0, atol=1e-5)
    assert torch.equal(samples.labels.sum(1), torch.ones(batch * queries, dtype=torch.long))
    if subq == subd and not perimage:
        assert torch.equal(samples.labels, torch.eye(batch * queries, dtype=torch.bool))


def test_ngh_sampler_positives_land_where_the_flow_says():
    batch, height, width, tx, ty = 2, 40, 44, 5, -3
    desc1 = one_hot_codes(batch, height, width)
    desc2 = translated_image2(desc1, tx, ty)
    # Image 2's reliability encodes its pixel index: the query reliability reveals the
    # chosen positive.
    position = torch.arange(height * width, dtype=torch.float32).reshape(1, 1, height, width)
    rel2 = (position / (height * width)).repeat(batch, 1, 1, 1)
    sampler = NghSampler2(ngh=4, subq=2, subd=1, pos_d=1, neg_d=2, border=4, subd_neg=1)
    samples = sampler(outputs(desc1, torch.zeros_like(rel2)), outputs(desc2, rel2),
                      translation_flow(batch, height, width, tx, ty))
    qy, qx = torch.meshgrid(torch.arange(4, height - 4, 2), torch.arange(4, width - 4, 2),
                            indexing="ij")
    qy, qx = qy.reshape(-1).repeat(batch), qx.reshape(-1).repeat(batch)
    expected_mask = (qx + tx < width) & (qy + ty >= 0)
    assert torch.equal(samples.mask, expected_mask)
    valid = samples.mask
    assert samples.labels[:, 0].all() and not samples.labels[:, 1:].any()
    # The positive is the exact target: score 1 and the reliability of that pixel.
    assert torch.equal(samples.scores[valid, 0], torch.ones(int(valid.sum())))
    target_rel = rel2[0, 0, qy + ty, qx + tx]
    torch.testing.assert_close(samples.reliability[valid] * 2, target_rel[valid])
    # Negatives, and distractors (every pixel of image 2 here), never score: the one
    # at the target itself is masked as too close. (Candidates are clamped to the
    # image, so a target on its edge would meet itself among the negatives.)
    x2, y2 = qx + tx, qy + ty
    interior = valid & (x2 >= 4) & (x2 < width - 4) & (y2 >= 4) & (y2 < height - 4)
    assert interior.sum() > 100
    assert samples.scores[interior, 1:].abs().max() == 0
    negatives = sampler.neg_offsets.shape[1]
    assert samples.scores[valid, 1 + negatives:].abs().max() == 0


def test_ngh_sampler_masks_distractors_of_the_same_image_only():
    batch, height, width = 2, 24, 24
    codes = one_hot_codes(batch, height, width, per_image=False)  # same codes in both images
    sampler = NghSampler2(ngh=3, subq=4, subd=1, pos_d=0, neg_d=2, border=4, subd_neg=1)
    identity = translation_flow(batch, height, width, 0, 0)
    samples = sampler(outputs(codes), outputs(codes.clone()), identity)
    negatives = sampler.neg_offsets.shape[1]
    distractors = samples.scores[:, 1 + negatives:]
    # Each query meets its own pixel once more among the other image's distractors.
    assert torch.equal(distractors.sum(1), torch.ones(len(distractors)))


def test_ngh_sampler_without_maxpool_keeps_every_positive():
    batch, height, width = 1, 32, 32
    desc1 = one_hot_codes(batch, height, width)
    sampler = NghSampler2(ngh=4, subq=4, subd=1, pos_d=1, neg_d=2, border=4,
                          maxpool_pos=False, subd_neg=0)
    identity = translation_flow(batch, height, width, 0, 0)
    samples = sampler(outputs(desc1), outputs(desc1.clone()), identity)
    positives = sampler.pos_offsets.shape[1]
    assert positives == 5
    assert samples.labels[:, :positives].all() and not samples.labels[:, positives:].any()
    centre = int(((sampler.pos_offsets == 0).all(0)).nonzero())
    assert torch.equal(samples.scores[:, centre], torch.ones(len(samples.scores)))
    assert samples.scores.sum() == len(samples.scores)


def test_random_queries_stay_inside_the_border_and_follow_the_seed():
    batch, height, width = 2, 40, 40
    sampler = NghSampler2(ngh=7, subq=-4, border=16)
    b, y, x = sampler._positions(-4, batch, height, width, torch.device("cpu"))
    assert len(b) == batch * (8 * 8) // 16
    assert y.min() >= 16 and y.max() < 24 and x.min() >= 16 and x.max() < 24
    desc = F.normalize(torch.randn(batch, 8, height, width), dim=1)
    flow = translation_flow(batch, height, width, 1, 1)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        first = sampler(outputs(desc), outputs(desc), flow).scores
        torch.manual_seed(3)
        second = sampler(outputs(desc), outputs(desc), flow).scores
    assert torch.equal(first, second)
