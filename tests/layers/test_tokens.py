from __future__ import annotations

import math

import pytest
import torch

from medmamba.layers import MambaLayer
from medmamba.layers.tokens import (
    ChannelTokenMamba,
    channels_to_sequence,
    map_to_tokens,
    sequence_to_channels,
    tokens_to_map,
)


def test_spatial_tokens_are_in_raster_order_and_round_trip():
    D, H, W = 2, 2, 3
    x = torch.arange(2 * 4 * D * H * W, dtype=torch.float64).reshape(2, 4, D, H, W)
    tokens = map_to_tokens(x)
    assert tokens.shape == (2, D * H * W, 4)
    for d in range(D):
        for h in range(H):
            for w in range(W):
                assert torch.equal(tokens[:, (d * H + h) * W + w], x[:, :, d, h, w])  # networks.md §1.2
    assert torch.equal(tokens_to_map(tokens, (D, H, W)), x)


def test_channel_sequence_makes_each_channel_one_token_and_round_trips():
    x = torch.randn(2, 5, 3, 4, dtype=torch.float64)
    seq = channels_to_sequence(x)  # a 1D map for MambaLayer: (B, d_model = H·W, L = C)
    assert seq.shape == (2, 12, 5)
    assert torch.equal(seq[:, :, 3], x[:, 3].flatten(1))
    assert torch.equal(sequence_to_channels(seq, (3, 4)), x)


def test_channel_token_mamba_has_the_official_parameter_count():
    layer = ChannelTokenMamba((4, 4, 4))  # U-Mamba_Enc's 4×4×4 bottleneck: LayerNorm(64) + Mamba(d_model=64)
    d, d_inner, R = 64, 128, math.ceil(64 / 16)
    expected = 2 * d + 3 * 2 * d * d + d_inner * (4 + 2 * R + 3 * 16 + 3)  # networks.md §2.2, one direction
    assert sum(p.numel() for p in layer.parameters()) == expected == 32_768
    assert isinstance(layer.mamba, MambaLayer) and layer.mamba.d_model == 64


def test_channel_token_scan_is_causal_over_channels():
    torch.manual_seed(0)
    layer = ChannelTokenMamba((2, 3), d_state=4).double()
    x = torch.randn(1, 6, 2, 3, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    # perturb channel 3 (channels 0..2 come before it in the scan); not by a constant: LayerNorm over the token's
    # spatial vector would remove that
    x2[:, 3] += torch.randn(2, 3, dtype=torch.float64)
    y2 = layer(x2)
    torch.testing.assert_close(y2[:, :3], y[:, :3], rtol=0, atol=0)
    assert (y2[:, 3:] - y[:, 3:]).abs().amax(dim=(2, 3)).min() > 1e-6


def test_channel_token_norm_is_over_each_channels_spatial_vector():
    # LayerNorm(H·W) per channel token: an affine change of one channel's whole map (positive scale) is normalised
    # away and changes nothing; a norm over channels per voxel would see it
    torch.manual_seed(0)
    layer = ChannelTokenMamba((3, 2)).double()
    layer.mamba.norm.eps = 0.0  # exact invariance (eps 1e-5 alone would leave ~1e-5 differences)
    x = torch.randn(2, 4, 3, 2, dtype=torch.float64)
    scale = torch.tensor([1.0, 3.0, 0.5, 2.0], dtype=torch.float64).view(1, 4, 1, 1)
    shift = torch.tensor([0.0, -1.0, 4.0, 2.0], dtype=torch.float64).view(1, 4, 1, 1)
    torch.testing.assert_close(layer(x * scale + shift), layer(x), rtol=1e-9, atol=1e-9)


def test_channel_token_mamba_equals_a_mamba_over_channel_tokens():
    torch.manual_seed(0)
    layer = ChannelTokenMamba((2, 2, 2)).double()
    x = torch.randn(2, 16, 2, 2, 2, dtype=torch.float64)
    # the same computation written the way upstream does: tokens (B, L=C, d=N), LayerNorm(N), Mamba, reshape back
    tokens = x.flatten(2)  # (B, C, N)
    as_map = tokens.transpose(1, 2)  # MambaLayer reads (B, d_model, L)
    expected = layer.mamba(as_map).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
    assert layer(x).shape == x.shape


def test_channel_token_mamba_rejects_another_map_size():
    layer = ChannelTokenMamba((2, 2, 2))
    with pytest.raises(ValueError, match=r"built for feature maps of size \(2, 2, 2\), got \(2, 2, 4\)"):
        layer(torch.randn(1, 3, 2, 2, 4))
    with pytest.raises(ValueError, match="spatial_size must be positive"):
        ChannelTokenMamba((2, 0))
