"""SegMamba (Xing et al., MICCAI 2024, arXiv:2401.13560), checked against ge-xing/SegMamba @ cff3597.

Deliberate differences from the official code:

* the inter-slice scan follows the depth of each feature map at run time (upstream fixes 64/32/16/8 slices, i.e.
  only a 128-deep patch scans correctly), so any input whose sides are divisible by the total stride 16 works;
* the three scan orders run through the one ``MambaLayer`` (upstream's fork silently drops to one direction when
  its fused CUDA path is unavailable);
* optional deep-supervision heads (off by default, so the default build is the official 67.42 M network) for
  nnU-Net's network contract.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrUpBlock
from torch import nn

from medmamba.kernels import RASTER, REVERSED, SLICE
from medmamba.layers import GatedSpatialConv, MambaLayer
from medmamba.networks.registry import register_network

__all__ = ["SegMamba"]


@register_network("segmamba", task="segmentation", spatial_dims=(3,))
class SegMamba(nn.Module):
    """SegMamba: a tri-orientated-Mamba encoder and a UNETR-style convolutional decoder for 3D segmentation.

    Xing, Ye, Yang, Zhu, Lei, Zhu: "SegMamba: Long-range Sequential Modeling Mamba for 3D Medical Image
    Segmentation", MICCAI 2024, arXiv:2401.13560; code ge-xing/SegMamba @ cff3597.

    Encoder (Fig. 2 left): stem ``Conv 7³ /2``, then per stage a gated spatial convolution and ``depths[i]``
    tri-orientated Mamba (ToM) layers — ``x + Mamba(LN(x))`` over the forward, reversed and inter-slice orders,
    summed — with ``IN → Conv 2³ /2`` between stages; every stage's output also passes a skip MLP
    (``IN → 1×1 C→2C → GELU → 1×1 2C→C``) on its way to the decoder. Decoder (Fig. 2 right): MONAI's
    ``UnetrBasicBlock`` on the image and on every skip (the last one widening to ``hidden_size``),
    ``UnetrUpBlock`` per stage, a final ``UnetrBasicBlock`` and a 1×1×1 output convolution.

    Parameters for ``in_channels=4, out_channels=4`` and the defaults: 67,416,196 (spec: 67.42 M).

    Args:
        spatial_dims: must be 3.
        in_channels: image channels (BraTS: 4 MR sequences).
        out_channels: classes, background included (BraTS run: 4).
        features_per_stage: channels of the encoder stages; the decoder mirrors them.
        depths: ToM layers per stage.
        hidden_size: channels of the bottleneck block of the decoder.
        norm: MONAI norm name or ``(name, kwargs)`` of the decoder blocks.
        deep_supervision: build an auxiliary 1×1×1 head at every decoder resolution but the lowest and return
            all logits (nnU-Net's contract). The official network has none; ``decoder.deep_supervision`` switches
            the output at run time once the heads exist.
        d_state: Mamba state size N. d_conv: Mamba causal convolution width. expand: Mamba inner expansion.
        ssm_fp32: keep each ToM layer's convolution, SSM projections and scan in fp32 under autocast
            (:class:`~medmamba.layers.MambaLayer`). ``False`` runs them in the autocast dtype, as the official code
            does (mamba_ssm under AMP); the scan still accumulates in fp32. It saves about a third of the Mamba
            layers' activations (the 128³ batch-2 BraTS step: ``benchmarks/RESULTS.md``). Parameters are the same.

    Shapes:
        input ``(B, in_channels, D, H, W)``, each of D, H, W divisible by ``2 ** len(features_per_stage)`` (16),
        and larger than 16³ in total (instance norms need two voxels at the bottleneck);
        output ``(B, out_channels, D, H, W)`` raw logits, or with deep supervision a list of
        ``len(features_per_stage)`` logits at full, 1/2, 1/4 … resolution (full resolution first).

    Raises:
        ValueError: ``spatial_dims`` is not 3, the per-stage settings disagree in length, or (in ``forward``) an
            input side is not divisible by the total stride.

    Example:
        >>> net = SegMamba(3, 1, 2, features_per_stage=(4, 8), depths=(1, 1), hidden_size=16)
        >>> net(torch.randn(1, 1, 8, 8, 12)).shape
        torch.Size([1, 2, 8, 8, 12])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 4,
        out_channels: int = 4,
        *,
        features_per_stage: Sequence[int] = (48, 96, 192, 384),
        depths: Sequence[int] = (2, 2, 2, 2),
        hidden_size: int = 768,
        norm: str | tuple = "instance",
        deep_supervision: bool = False,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        ssm_fp32: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"SegMamba is a 3D network: spatial_dims must be 3, got {spatial_dims}")
        features, depths = tuple(int(f) for f in features_per_stage), tuple(int(d) for d in depths)
        if not features or len(features) != len(depths):
            raise ValueError(
                f"features_per_stage {features} and depths {depths} must be non-empty and of equal length (one entry "
                "per encoder stage)"
            )
        if in_channels < 1 or out_channels < 1 or min(features) < 1 or hidden_size < 1 or min(depths) < 0:
            raise ValueError(
                f"channels must be positive and depths non-negative, got in_channels={in_channels}, "
                f"out_channels={out_channels}, features_per_stage={features}, hidden_size={hidden_size}, "
                f"depths={depths}"
            )
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        #: per-stage strides in nnU-Net's sense (the decoder's resolutions): full resolution, then one halving per stage
        self.strides: tuple[tuple[int, ...], ...] = ((1, 1, 1),) + ((2, 2, 2),) * len(features)
        self.encoder = SegMambaEncoder(  # Fig. 2 left
            in_channels, features, depths, d_state=d_state, d_conv=d_conv, expand=expand, ssm_fp32=ssm_fp32
        )
        self.decoder = UnetrDecoder(  # Fig. 2 right
            in_channels, features, hidden_size, out_channels, norm=norm, deep_supervision=deep_supervision
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x`` ``(B, in_channels, D, H, W)``; raw logits (a list under deep supervision)."""
        self._check_input_size(x)
        skips = self.encoder(x)  # (B, 48, D/2, H/2, W/2), (B, 96, D/4, …), … (B, 384, D/16, H/16, W/16)
        return self.decoder(skips, image=x)  # (B, out_channels, D, H, W)

    def _check_input_size(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"SegMamba expects (B, {self.in_channels}, D, H, W), got {tuple(x.shape)}")
        divisor = 2 ** (len(self.strides) - 1)
        bad = [f"axis {i} = {s}" for i, s in enumerate(x.shape[2:]) if s % divisor]
        if bad:
            raise ValueError(
                f"SegMamba needs every spatial side divisible by its total stride {divisor}; {', '.join(bad)} is not. "
                "Pad or crop the input (or its patch size) to a multiple of it."
            )
        if math.prod(x.shape[2:]) == divisor**3:
            raise ValueError(
                f"SegMamba's instance norms need more than one voxel at the 1/{divisor} bottleneck, but the input "
                f"{tuple(x.shape[2:])} leaves one; use an input with at least one side of {2 * divisor} or more"
            )


class SegMambaEncoder(nn.Module):
    """Stem, then per stage: (downsample) → gated spatial conv → ToM layers → skip MLP (skip copy only).

    Returns one skip map per stage, ``(B, features[i], S / 2^(i+1))``; the main path continues without the MLP.
    """

    def __init__(
        self,
        in_channels: int,
        features: tuple[int, ...],
        depths: tuple[int, ...],
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        ssm_fp32: bool = True,
    ) -> None:
        super().__init__()
        stem = nn.Conv3d(in_channels, features[0], kernel_size=7, stride=2, padding=3)
        self.downsample = nn.ModuleList(
            [stem]
            + [
                nn.Sequential(nn.InstanceNorm3d(c_in), nn.Conv3d(c_in, c_out, kernel_size=2, stride=2))
                for c_in, c_out in itertools.pairwise(features)
            ]
        )
        self.gsc = nn.ModuleList(GatedSpatialConv(3, c) for c in features)
        # SLICE is an axis permutation (depth fastest), so its slice count is each map's own depth at run time.
        orders = (RASTER, REVERSED, SLICE)
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(
                    MambaLayer(
                        c,
                        orders=orders,
                        merge="sum",
                        residual=True,
                        d_state=d_state,
                        d_conv=d_conv,
                        expand=expand,
                        ssm_fp32=ssm_fp32,
                    )
                    for _ in range(d)
                )
            )
            for c, d in zip(features, depths, strict=True)
        )
        self.skip_mlp = nn.ModuleList(
            nn.Sequential(nn.InstanceNorm3d(c), nn.Conv3d(c, 2 * c, 1), nn.GELU(), nn.Conv3d(2 * c, c, 1))
            for c in features
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, in_channels, D, H, W)`` → per stage ``(B, features[i], D/2^(i+1), H/2^(i+1), W/2^(i+1))``."""
        skips = []
        for down, gsc, stage, mlp in zip(self.downsample, self.gsc, self.stages, self.skip_mlp, strict=True):
            x = stage(gsc(down(x)))
            skips.append(mlp(x))
        return skips


class UnetrDecoder(nn.Module):
    """UNETR-style decoder of SegMamba: a residual block per skip, a transposed-conv up block per stage.

    ``skip_blocks[0]`` works on the raw image (full resolution), ``skip_blocks[i + 1]`` on encoder skip ``i``; the
    last one widens the bottleneck to ``hidden_size``. ``up_blocks[j]`` climbs from the bottleneck, joining
    ``skip_blocks[-(j + 2)]``'s output, so its output lies at 1/2^(n-1-j) of the input size.

    Attributes:
        deep_supervision: return every head's logits (full resolution first) instead of the final ones; needs
            the auxiliary heads (constructed with ``deep_supervision=True``). nnU-Net flips it at run time.
    """

    def __init__(
        self,
        in_channels: int,
        features: tuple[int, ...],
        hidden_size: int,
        out_channels: int,
        *,
        norm: str | tuple,
        deep_supervision: bool,
    ) -> None:
        super().__init__()
        widths = (*features, hidden_size)
        self.skip_blocks = nn.ModuleList(
            UnetrBasicBlock(3, c_in, c_out, kernel_size=3, stride=1, norm_name=norm, res_block=True)
            for c_in, c_out in zip((in_channels, *features), widths, strict=True)
        )
        self.up_blocks = nn.ModuleList(
            UnetrUpBlock(
                3, widths[i + 1], widths[i], kernel_size=3, upsample_kernel_size=2, norm_name=norm, res_block=True
            )
            for i in reversed(range(len(features)))
        )
        self.final_block = UnetrBasicBlock(
            3, features[0], features[0], kernel_size=3, stride=1, norm_name=norm, res_block=True
        )
        self.head = UnetOutBlock(3, features[0], out_channels)
        # heads for 1/2, 1/4, … (the up blocks' outputs below full resolution), highest resolution first
        self.aux_heads = (
            nn.ModuleList(UnetOutBlock(3, c, out_channels) for c in features[1:]) if deep_supervision else None
        )
        self.deep_supervision = deep_supervision

    def forward(self, skips: Sequence[torch.Tensor], image: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Skips from the encoder (highest resolution first) and the input image → logits."""
        enc = [
            block(x) for block, x in zip(self.skip_blocks, (image, *skips), strict=True)
        ]  # widths (*features, hidden)
        x, ups = enc[-1], []
        for j, up in enumerate(self.up_blocks):
            x = up(x, enc[-(j + 2)])
            ups.append(x)
        logits = self.head(self.final_block(x))
        if not self.deep_supervision:
            return logits
        if self.aux_heads is None:
            raise RuntimeError(
                "decoder.deep_supervision is on but SegMamba was built without auxiliary heads; construct it with "
                "deep_supervision=True"
            )
        return [logits, *(head(u) for head, u in zip(self.aux_heads, reversed(ups[:-1]), strict=True))]
