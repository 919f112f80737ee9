"""The R2D2 network architectures and the parser of a checkpoint's ``net`` string.

Both networks keep the module list of the original implementation (``ops.<i>``,
``clf``, ``sal``) so that the official state dicts load without renaming. Each
forward pass returns the three dense outputs of the paper:

* ``descriptors``: (B, dim, H', W'), L2-normalised over channels;
* ``reliability``: (B, 1, H', W') in [0, 1];
* ``repeatability``: (B, 1, H', W') in [0, 1].

``H' x W'`` equals the input size for ``Quad_L2Net_ConfCFS`` and is
``floor(H/2)*2 x floor(W/2)*2`` for ``Fast_Quad_L2Net_ConfCFS``.
"""
from __future__ import annotations

import ast
import copy
from typing import Any, Dict, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = [
    "R2D2Net",
    "Quad_L2Net_ConfCFS",
    "Fast_Quad_L2Net_ConfCFS",
    "NETWORKS",
    "parse_net_string",
    "build_net",
    "reliability_map",
    "repeatability_map",
]


def reliability_map(logits: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W) reliability head output -> (B, 1, H, W) reliability in [0, 1]."""
    return F.softmax(logits, dim=1)[:, 1:2]


def repeatability_map(logit: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) repeatability head output -> repeatability softplus/(1+softplus)."""
    softplus = F.softplus(logit)
    return softplus / (1 + softplus)


def heads_from_raw(
    raw: torch.Tensor, reliability_logits: torch.Tensor, repeatability_logit: torch.Tensor
) -> Dict[str, torch.Tensor]:
    """Turn raw network outputs into R2D2's three maps.

    Args:
        raw: (B, dim, H, W) output of the last convolution.
        reliability_logits: (B, 2, H, W) output of the reliability 1x1 head.
        repeatability_logit: (B, 1, H, W) output of the repeatability 1x1 head.

    Returns:
        dict with ``descriptors`` (B, dim, H, W) L2-normalised, ``reliability`` and
        ``repeatability`` (B, 1, H, W) in [0, 1].
    """
    return {
        "descriptors": F.normalize(raw, p=2, dim=1),
        "reliability": reliability_map(reliability_logits),
        "repeatability": repeatability_map(repeatability_logit),
    }


class R2D2Net(nn.Module):
    """A stack of (dilated) convolutions followed by R2D2's two 1x1 heads.

    Subclasses call :meth:`_add_conv` in order; the module indices in ``ops``
    reproduce the original layout (conv, [BN], [ReLU], [pool]).
    """

    def __init__(
        self,
        inchan: int = 3,
        dilated: bool = True,
        dilation: int = 1,
        bn: bool = True,
        bn_affine: bool = False,
    ) -> None:
        super().__init__()
        self.inchan = inchan
        self.dilated = dilated
        self.bn = bn
        self.bn_affine = bn_affine
        self.ops = nn.ModuleList()
        self._curchan = inchan
        self._dilation = dilation

    def _add_conv(
        self,
        outd: int,
        k: int = 3,
        stride: int = 1,
        dilation: int = 1,
        bn: bool = True,
        relu: bool = True,
        k_pool: int = 1,
    ) -> None:
        d = self._dilation * dilation
        if self.dilated:
            # A stride of the original L2-Net becomes a dilation of every later layer,
            # so the output keeps the input's resolution.
            params = dict(padding=((k - 1) * d) // 2, dilation=d, stride=1)
            self._dilation *= stride
        else:
            params = dict(padding=((k - 1) * d) // 2, dilation=d, stride=stride)
        self.ops.append(nn.Conv2d(self._curchan, outd, kernel_size=k, **params))
        if bn and self.bn:
            self.ops.append(nn.BatchNorm2d(outd, affine=self.bn_affine))
        if relu:
            self.ops.append(nn.ReLU(inplace=True))
        self._curchan = outd
        if k_pool > 1:
            self.ops.append(nn.MaxPool2d(kernel_size=k_pool))

    def _add_heads(self, dim: int) -> None:
        self.out_dim = dim
        self.clf = nn.Conv2d(dim, 2, kernel_size=1)
        self.sal = nn.Conv2d(dim, 1, kernel_size=1)

    def forward_raw(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Run the trunk and the heads without their final activations.

        Args:
            x: (B, inchan, H, W) image normalised with the ImageNet mean and std.

        Returns:
            raw (B, dim, H', W'), reliability logits (B, 2, H', W'),
            repeatability logit (B, 1, H', W').
        """
        for op in self.ops:
            x = op(x)
        squared = x**2
        return x, self.clf(squared), self.sal(squared)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """(B, 3, H, W) normalised image -> dict of descriptors, reliability, repeatability."""
        return heads_from_raw(*self.forward_raw(x))


class Quad_L2Net_ConfCFS(R2D2Net):
    """L2-Net with its last 8x8 convolution replaced by three 2x2 ones (the R2D2 network)."""

    def __init__(self, dim: int = 128, mchan: int = 4, relu22: bool = False, **kw: Any) -> None:
        super().__init__(**kw)
        self._add_conv(8 * mchan)
        self._add_conv(8 * mchan)
        self._add_conv(16 * mchan, stride=2)
        self._add_conv(16 * mchan)
        self._add_conv(32 * mchan, stride=2)
        self._add_conv(32 * mchan)
        self._add_conv(32 * mchan, k=2, stride=2, relu=relu22)
        self._add_conv(32 * mchan, k=2, stride=2, relu=relu22)
        self._add_conv(dim, k=2, stride=2, bn=False, relu=False)
        self._add_heads(dim)


class Fast_Quad_L2Net_ConfCFS(R2D2Net):
    """The faster R2D2 variant: max-pooled after layer 3, upsampled back after layer 9."""

    def __init__(
        self,
        dim: int = 128,
        mchan: int = 4,
        relu22: bool = False,
        downsample_factor: int = 2,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self._add_conv(8 * mchan)
        self._add_conv(8 * mchan)
        self._add_conv(16 * mchan, k_pool=downsample_factor)
        self._add_conv(16 * mchan)
        self._add_conv(32 * mchan, stride=2)
        self._add_conv(32 * mchan)
        self._add_conv(32 * mchan, k=2, stride=2, relu=relu22)
        self._add_conv(32 * mchan, k=2, stride=2, relu=relu22)
        self._add_conv(dim, k=2, stride=2, bn=False, relu=False)
        self.ops.append(
            nn.Upsample(scale_factor=downsample_factor, mode="bilinear", align_corners=False)
        )
        self._add_heads(dim)


class FoldedNet(nn.Module):
    """Inference-only copy of an :class:`R2D2Net` with BatchNorm folded into the convolutions.

    Same outputs as the source network up to float rounding, one pass fewer over
    memory per layer. Built by :func:`fold_batchnorm`.
    """

    def __init__(self, trunk: nn.Sequential, clf: nn.Conv2d, sal: nn.Conv2d, out_dim: int) -> None:
        super().__init__()
        self.trunk = trunk
        self.clf = clf
        self.sal = sal
        self.out_dim = out_dim

    def forward_raw(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`R2D2Net.forward_raw`."""
        x = self.trunk(x)
        squared = x**2
        return x, self.clf(squared), self.sal(squared)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        return heads_from_raw(*self.forward_raw(x))


def fold_batchnorm(net: R2D2Net) -> FoldedNet:
    """Fold each BatchNorm's running statistics into the convolution before it.

    The source network must be in eval mode (running statistics are used); it is not
    modified.
    """
    if net.training:
        raise ValueError("fold_batchnorm needs a network in eval mode (net.eval())")
    layers = []
    ops = list(net.ops)
    i = 0
    while i < len(ops):
        op = ops[i]
        if isinstance(op, nn.Conv2d) and i + 1 < len(ops) and isinstance(ops[i + 1], nn.BatchNorm2d):
            layers.append(fuse_conv_bn_eval(op, ops[i + 1]))
            i += 2
            continue
        layers.append(copy.deepcopy(op))
        i += 1
    return FoldedNet(
        nn.Sequential(*layers), copy.deepcopy(net.clf), copy.deepcopy(net.sal), net.out_dim
    ).eval()


NETWORKS: Dict[str, Type[R2D2Net]] = {
    "Quad_L2Net_ConfCFS": Quad_L2Net_ConfCFS,
    "Fast_Quad_L2Net_ConfCFS": Fast_Quad_L2Net_ConfCFS,
}
"""The architectures a checkpoint's ``net`` string may name."""

# Keyword arguments each architecture accepts, with the type a literal must have.
_ALLOWED_KWARGS: Dict[str, Dict[str, type]] = {
    "Quad_L2Net_ConfCFS": {
        "dim": int, "mchan": int, "relu22": bool, "inchan": int,
        "dilated": bool, "dilation": int, "bn": bool, "bn_affine": bool,
    },
}
_ALLOWED_KWARGS["Fast_Quad_L2Net_ConfCFS"] = dict(
    _ALLOWED_KWARGS["Quad_L2Net_ConfCFS"], downsample_factor=int
)


def parse_net_string(net: str) -> Tuple[str, Dict[str, Any]]:
    """Parse a checkpoint's ``net`` string such as ``"Quad_L2Net_ConfCFS(mchan=6)"``.

    Only a call of a known architecture with literal keyword arguments is accepted;
    nothing is evaluated.

    Returns:
        (class name, keyword arguments).

    Raises:
        ValueError: for anything else, naming what was refused.
    """
    if not isinstance(net, str):
        raise TypeError(f"net must be a string, got {type(net).__name__}")
    try:
        tree = ast.parse(net.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"net string {net!r} is not a valid architecture call") from exc
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)):
        raise ValueError(
            f"net string {net!r} must be a call such as 'Quad_L2Net_ConfCFS(mchan=6)'"
        )
    name = call.func.id
    if name not in NETWORKS:
        raise ValueError(
            f"unknown architecture {name!r} in net string {net!r}; "
            f"known: {', '.join(sorted(NETWORKS))}"
        )
    if call.args:
        raise ValueError(f"net string {net!r}: only keyword arguments are accepted")
    allowed = _ALLOWED_KWARGS[name]
    kwargs: Dict[str, Any] = {}
    for kw in call.keywords:
        if kw.arg is None or kw.arg not in allowed:
            raise ValueError(
                f"net string {net!r}: unknown argument {kw.arg!r} for {name}; "
                f"accepted: {', '.join(sorted(allowed))}"
            )
        try:
            value = ast.literal_eval(kw.value)
        except ValueError as exc:
            raise ValueError(
                f"net string {net!r}: argument {kw.arg!r} must be a literal"
            ) from exc
        expected = allowed[kw.arg]
        if type(value) is not expected:
            raise ValueError(
                f"net string {net!r}: argument {kw.arg!r} must be {expected.__name__}, "
                f"got {value!r}"
            )
        kwargs[kw.arg] = value
    return name, kwargs


def build_net(net: str) -> R2D2Net:
    """Instantiate the architecture a ``net`` string names (see :func:`parse_net_string`)."""
    name, kwargs = parse_net_string(net)
    return NETWORKS[name](**kwargs)
