"""Gated spatial convolution (GSC), the convolutional front of each SegMamba encoder stage.

SegMamba (Xing et al., MICCAI 2024, arXiv:2401.13560), checked against ge-xing/SegMamba @ cff3597
(``model_segmamba/segmamba.py``, class ``GSC``).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["GatedSpatialConv"]


class GatedSpatialConv(nn.Module):
    """Gated spatial convolution of SegMamba, as the official code builds it.

    Two branches over the same input ``x``, merged, projected, and added back to ``x``::

        a = CNA₃(CNA₃(x))        CNA_k = Conv k×k×k (bias) → norm → act
        b = CNA₁(x)
        out = x + CNA₁(a + b)

    The paper's figure draws Norm→Conv→Act, a multiplicative gate ``a ⊗ b`` and a 3×3×3 final convolution; the
    released code (the reference for reproducing its numbers, and what is built here) adds the branches and uses
    a 1×1×1 final convolution. All convolutions are ``channels → channels`` with bias; with the default
    ``norm="instance"`` (no affine) a GSC has ``56·C² + 4·C`` parameters in 3D.

    Args:
        spatial_dims: 2 or 3.
        channels: C, input and output channels.
        norm: MONAI norm name or ``(name, kwargs)``; SegMamba uses instance norm without affine.
        act: MONAI activation name or ``(name, kwargs)``; SegMamba uses ReLU.

    Shapes:
        input ``(B, C, *S)``; output the same.

    Example:
        >>> gsc = GatedSpatialConv(3, 8)
        >>> gsc(torch.randn(1, 8, 4, 4, 4)).shape
        torch.Size([1, 8, 4, 4, 4])
    """

    def __init__(
        self,
        spatial_dims: int,
        channels: int,
        *,
        norm: str | tuple = "instance",
        act: str | tuple = "relu",
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")

        def cna(kernel_size: int) -> Convolution:
            return Convolution(spatial_dims, channels, channels, kernel_size=kernel_size, norm=norm, act=act, bias=True)

        self.spatial = nn.Sequential(cna(3), cna(3))  # branch a
        self.pointwise = cna(1)  # branch b
        self.proj = cna(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` → ``(B, C, *S)``."""
        return x + self.proj(self.spatial(x) + self.pointwise(x))
