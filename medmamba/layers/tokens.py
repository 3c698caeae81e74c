"""Feature map ⇄ token sequence: the one flattening (``networks.md`` §1.2) and U-Mamba_Enc's channel-token mode.

Spatial tokens: voxel ``(d, h, w)`` becomes token ``l = (d·H + h)·W + w`` (raster order, last axis fastest) carrying
its C-vector. Channel tokens (U-Mamba_Enc, Ma et al., arXiv:2401.04722, current code): the sequence runs over the C
channels and each token is a channel's whole flattened map, pre-normalised by ``LayerNorm(D·H·W)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .mamba import MambaLayer

__all__ = ["ChannelTokenMamba", "channels_to_sequence", "map_to_tokens", "sequence_to_channels", "tokens_to_map"]


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Spatial tokens of a feature map: ``(B, C, *S)`` → ``(B, L, C)`` with ``L = ∏S`` in raster order."""
    return x.flatten(2).transpose(1, 2)


def tokens_to_map(tokens: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Exact inverse of :func:`map_to_tokens`: ``(B, L, C)`` → ``(B, C, *spatial)``."""
    return tokens.transpose(1, 2).unflatten(2, tuple(spatial))


def channels_to_sequence(x: torch.Tensor) -> torch.Tensor:
    """Channel tokens as a 1D map for :class:`MambaLayer`: ``(B, C, *S)`` → ``(B, ∏S, C)``.

    MambaLayer reads ``(B, d_model, L)``; here ``d_model = ∏S`` (one channel's flattened map is a token) and the
    sequence length is C, so its token pre-norm is the ``LayerNorm(∏S)`` of the channel-token mode.
    """
    return x.flatten(2).transpose(1, 2)


def sequence_to_channels(seq: torch.Tensor, spatial: Sequence[int]) -> torch.Tensor:
    """Exact inverse of :func:`channels_to_sequence`: ``(B, ∏S, C)`` → ``(B, C, *spatial)``."""
    return seq.transpose(1, 2).unflatten(2, tuple(spatial))


class ChannelTokenMamba(nn.Module):
    """Mamba over the channels of a small feature map (U-Mamba_Enc, Ma, Li, Wang, arXiv:2401.04722).

    Used by U-Mamba_Enc's current code (bowang-lab/U-Mamba @ 530739b, ``UMambaEnc_3d.py``) at stages whose map has
    no more voxels than channels: a scan over C tokens of width ``∏S`` is cheaper there than over ``∏S`` tokens of
    width C. ``LayerNorm(∏S)`` → Mamba (``d_model = ∏S``, forward order) → reshape back; no residual, as upstream.
    The width is fixed at construction, so the layer accepts only the map size it was built for.

    Args:
        spatial_size: the feature map size ``S`` this layer is built for (``(D, H, W)`` or ``(H, W)``).
        d_state: N, state size. d_conv: causal conv width. expand: ``d_inner = expand·∏S``.
        ssm_fp32: keep the convolution and the scan in fp32 under autocast (see :class:`MambaLayer`).

    Shapes:
        input ``(B, C, *spatial_size)`` for any C; output the same shape and dtype.

    Example:
        >>> layer = ChannelTokenMamba((2, 2, 2))
        >>> layer(torch.randn(1, 32, 2, 2, 2)).shape
        torch.Size([1, 32, 2, 2, 2])
    """

    def __init__(
        self, spatial_size: Sequence[int], *, d_state: int = 16, d_conv: int = 4, expand: int = 2, ssm_fp32: bool = True
    ) -> None:
        super().__init__()
        self.spatial_size = tuple(int(s) for s in spatial_size)
        if not self.spatial_size or min(self.spatial_size) < 1:
            raise ValueError(f"spatial_size must be positive sizes, got {tuple(spatial_size)}")
        self.mamba = MambaLayer(
            math.prod(self.spatial_size),
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            norm=True,
            residual=False,
            ssm_fp32=ssm_fp32,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scan over the channels of ``x`` ``(B, C, *spatial_size)``; returns the same shape."""
        if tuple(x.shape[2:]) != self.spatial_size:
            raise ValueError(
                f"channel-token Mamba was built for feature maps of size {self.spatial_size}, got "
                f"{tuple(x.shape[2:])}; U-Mamba_Enc only accepts the input_size (patch size) it was built with"
            )
        return sequence_to_channels(self.mamba(channels_to_sequence(x)), self.spatial_size)
