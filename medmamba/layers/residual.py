"""Residual convolution blocks of U-Mamba (Ma, Li, Wang, arXiv:2401.04722), current and paper-era.

Two code generations of bowang-lab/U-Mamba (``networks.md`` §3.1-3.2):

- ``"2024.03"`` (current, 530739b): a stage is one :class:`BasicResBlock` (strided, 1×1 projection skip) followed by
  ``n - 1`` ResNet-D ``BasicBlockD``; the stem is such a stage with stride 1.
- ``"2024.01"`` (paper-era, 92a741a): a stage is dynamic_network_architectures' ``StackedResidualBlocks`` of
  ``BasicBlockD`` (first one strided, skip = avg-pool + 1×1 conv + norm); the stem is one conv-norm-act.

``BasicBlockD``/``StackedResidualBlocks``/``ConvDropoutNormReLU`` are dynamic_network_architectures' own (U-Mamba
imports them too); norm and activation are given MONAI-style (``"instance"`` or ``("instance", {"affine": True})``)
and resolved per dimension by MONAI's factories.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from dynamic_network_architectures.building_blocks.residual import BasicBlockD, StackedResidualBlocks
from dynamic_network_architectures.building_blocks.simple_conv_blocks import ConvDropoutNormReLU
from monai.networks.layers.factories import Conv
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

__all__ = [
    "BasicResBlock",
    "NormAct",
    "conv_norm_act",
    "he_init_",
    "residual_stage",
    "zero_init_last_norm_",
]

#: MONAI-style norm or activation: a name, or ``(name, kwargs)``.
NormAct = str | tuple[str, dict[str, Any]]
Version = Literal["2024.03", "2024.01"]


class _NormFactory:
    """``norm_op`` for dynamic_network_architectures' blocks (called as ``norm_op(channels)``), built by MONAI."""

    def __init__(self, norm: NormAct, spatial_dims: int) -> None:
        self.norm, self.spatial_dims = norm, spatial_dims

    def __call__(self, channels: int) -> nn.Module:
        return get_norm_layer(self.norm, self.spatial_dims, channels)


class _ActFactory:
    """``nonlin`` for dynamic_network_architectures' blocks (called with no arguments), built by MONAI."""

    def __init__(self, act: NormAct) -> None:
        self.act = act

    def __call__(self) -> nn.Module:
        return get_act_layer(self.act)


class BasicResBlock(nn.Module):
    """U-Mamba's current residual block: conv-norm-act → conv-norm, plus a (1×1, strided) skip, then act.

    From bowang-lab/U-Mamba @ 530739b (``BasicResBlock``). Both k×k convolutions and the 1×1 skip carry a bias
    whatever ``conv_bias`` the network uses, as upstream. Padding ``k // 2``, so odd kernels keep the size.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels. out_channels: output channels.
        kernel_size: per axis or one int (odd). stride: of the first conv and of the skip.
        norm: MONAI norm. act: MONAI activation.
        projection: skip through a 1×1 conv (needed when channels or stride change); else identity.

    Shapes:
        input ``(B, in_channels, *S)``; output ``(B, out_channels, *ceil(S / stride))``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        norm: NormAct = ("instance", {"affine": True, "eps": 1e-5}),
        act: NormAct = ("leakyrelu", {"negative_slope": 0.01, "inplace": True}),
        projection: bool = True,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        padding = _padding(kernel_size)
        self.conv1 = conv(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.norm1 = get_norm_layer(norm, spatial_dims, out_channels)
        self.act1 = get_act_layer(act)
        self.conv2 = conv(out_channels, out_channels, kernel_size, padding=padding)
        self.norm2 = get_norm_layer(norm, spatial_dims, out_channels)
        self.act2 = get_act_layer(act)
        self.skip = conv(in_channels, out_channels, 1, stride=stride) if projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``act(norm(conv(act(norm(conv(x))))) + skip(x))``."""
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.act2(y + self.skip(x))


def residual_stage(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    n_blocks: int,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int],
    conv_bias: bool,
    norm: NormAct,
    act: NormAct,
    version: Version,
) -> nn.Module:
    """One resolution stage of ``n_blocks`` residual blocks, the first one carrying the stride.

    ``"2024.03"``: :class:`BasicResBlock` (1×1 projection skip) + ``n_blocks - 1`` ``BasicBlockD``;
    ``"2024.01"``: ``StackedResidualBlocks`` of ``n_blocks`` ``BasicBlockD`` (ResNet-D skip). ``conv_bias`` applies
    to the ``BasicBlockD`` convolutions.
    """
    if n_blocks < 1:
        raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
    conv_op = Conv[Conv.CONV, spatial_dims]
    norm_op, nonlin = _NormFactory(norm, spatial_dims), _ActFactory(act)
    kernel = _as_list(kernel_size, spatial_dims)
    if version == "2024.01":
        return StackedResidualBlocks(
            n_blocks, conv_op, in_channels, out_channels, kernel, _as_list(stride, spatial_dims), conv_bias,
            norm_op, {}, None, None, nonlin, {},
        )  # fmt: skip
    first = BasicResBlock(
        spatial_dims, in_channels, out_channels, kernel_size=kernel, stride=stride, norm=norm, act=act, projection=True
    )
    rest = [
        BasicBlockD(conv_op, out_channels, out_channels, kernel, 1, conv_bias, norm_op, {}, None, None, nonlin, {})
        for _ in range(n_blocks - 1)
    ]
    return nn.Sequential(first, *rest)


def conv_norm_act(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    *,
    kernel_size: int | Sequence[int],
    conv_bias: bool,
    norm: NormAct,
    act: NormAct,
) -> nn.Module:
    """Conv (stride 1, padding ``k // 2``) → norm → act: the paper-era stem (dynamic_network_architectures)."""
    return ConvDropoutNormReLU(
        Conv[Conv.CONV, spatial_dims], in_channels, out_channels, _as_list(kernel_size, spatial_dims), 1, conv_bias,
        _NormFactory(norm, spatial_dims), {}, None, None, _ActFactory(act), {},
    )  # fmt: skip


def he_init_(module: nn.Module, neg_slope: float = 1e-2) -> nn.Module:
    """nnU-Net's ``InitWeights_He`` over every 2D/3D conv and transposed conv inside ``module``.

    Kaiming-normal weights (leaky slope ``neg_slope``) and zero biases; Mamba and norm layers keep their init.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Conv3d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            nn.init.kaiming_normal_(m.weight, a=neg_slope)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def zero_init_last_norm_(module: nn.Module) -> nn.Module:
    """Zero the affine norm after the second conv of every ``BasicBlockD`` (each block starts as its skip).

    dynamic_network_architectures' ``init_last_bn_before_add_to_0``, which U-Mamba's paper-era Enc applied.
    """
    for m in module.modules():
        if isinstance(m, BasicBlockD):
            norm = m.conv2.norm
            if getattr(norm, "weight", None) is not None:
                nn.init.zeros_(norm.weight)
            if getattr(norm, "bias", None) is not None:
                nn.init.zeros_(norm.bias)
    return module


def _as_list(value: int | Sequence[int], spatial_dims: int) -> list[int]:
    return [int(value)] * spatial_dims if isinstance(value, int) else [int(v) for v in value]


def _padding(kernel_size: int | Sequence[int]) -> int | list[int]:
    return kernel_size // 2 if isinstance(kernel_size, int) else [k // 2 for k in kernel_size]
