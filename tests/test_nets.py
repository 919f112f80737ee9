"""Network architectures, the net-string parser and BatchNorm folding."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cv2r2d2.nets import (
    Fast_Quad_L2Net_ConfCFS,
    Quad_L2Net_ConfCFS,
    build_net,
    fold_batchnorm,
    parse_net_string,
)


def _conv_indices(net) -> list:
    return [i for i, op in enumerate(net.ops) if isinstance(op, nn.Conv2d)]


def test_module_layout_matches_the_official_state_dicts():
    assert _conv_indices(Quad_L2Net_ConfCFS()) == [0, 3, 6, 9, 12, 15, 18, 20, 22]
    assert _conv_indices(Fast_Quad_L2Net_ConfCFS()) == [0, 3, 6, 10, 13, 16, 19, 21, 23]
    dilations = [op.dilation[0] for op in Quad_L2Net_ConfCFS().ops if isinstance(op, nn.Conv2d)]
    assert dilations == [1, 1, 1, 2, 2, 4, 4, 8, 16]
    fast = [op.dilation[0] for op in Fast_Quad_L2Net_ConfCFS().ops if isinstance(op, nn.Conv2d)]
    assert fast == [1, 1, 1, 1, 1, 2, 2, 4, 8]
    assert Quad_L2Net_ConfCFS(mchan=6).ops[0].out_channels == 48


@pytest.mark.parametrize("height,width", [(37, 50), (64, 64)])
def test_output_shapes_and_ranges(height, width):
    torch.manual_seed(0)
    x = torch.randn(2, 3, height, width)
    quad = Quad_L2Net_ConfCFS().eval()(x)
    assert quad["descriptors"].shape == (2, 128, height, width)
    assert quad["reliability"].shape == quad["repeatability"].shape == (2, 1, height, width)
    for key in ("reliability", "repeatability"):
        assert 0 <= quad[key].min() and quad[key].max() <= 1
    torch.testing.assert_close(quad["descriptors"].norm(dim=1), torch.ones(2, height, width))
    fast = Fast_Quad_L2Net_ConfCFS().eval()(x)
    assert fast["descriptors"].shape == (2, 128, height // 2 * 2, width // 2 * 2)


def test_strided_variant_works_at_one_32nd():
    net = Quad_L2Net_ConfCFS(dilated=False).eval()
    assert net(torch.randn(1, 3, 128, 96))["descriptors"].shape == (1, 128, 4, 3)


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(0)
    net = Quad_L2Net_ConfCFS(mchan=2, dim=32)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    net.eval()
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(1, 3, 40, 40)
    for key, value in net(x).items():
        torch.testing.assert_close(folded(x)[key], value, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(net.train())


@pytest.mark.parametrize(
    "text,name,kwargs",
    [
        ("Quad_L2Net_ConfCFS()", "Quad_L2Net_ConfCFS", {}),
        ("Quad_L2Net_ConfCFS(mchan=6)", "Quad_L2Net_ConfCFS", {"mchan": 6}),
        (" Fast_Quad_L2Net_ConfCFS(dim=64, relu22=True) ", "Fast_Quad_L2Net_ConfCFS",
         {"dim": 64, "relu22": True}),
    ],
)
def test_parse_accepts_known_calls(text, name, kwargs):
    assert parse_net_string(text) == (name, kwargs)


@pytest.mark.parametrize(
    "text,message",
    [
        ("__import__('os').system('true')", "must be a call|unknown architecture"),
        ("Quad_L2Net_ConfCFS(mchan=__import__('os'))", "literal"),
        ("Quad_L2Net_ConfCFS(4)", "keyword"),
        ("Quad_L2Net_ConfCFS(bogus=1)", "unknown argument"),
        ("Quad_L2Net_ConfCFS(mchan='6')", "must be int"),
        ("Quad_L2Net_ConfCFS(**{'mchan': 6})", "unknown argument"),
        ("ResNet50()", "unknown architecture"),
        ("Quad_L2Net_ConfCFS(", "not a valid"),
        ("Quad_L2Net_ConfCFS", "must be a call"),
    ],
)
def test_parse_refuses_everything_else(text, message):
    with pytest.raises(ValueError, match=message):
        parse_net_string(text)


def test_build_net():
    net = build_net("Quad_L2Net_ConfCFS(mchan=6)")
    assert isinstance(net, Quad_L2Net_ConfCFS) and net.ops[0].out_channels == 48
    with pytest.raises(TypeError):
        build_net(None)
