"""U-Net decoder with always-built deep-supervision heads (nnU-Net's contract, ``plans-and-pipeline.md`` §2.10).

Every level has a 1×1 head, built whether deep supervision is on or not, so one state_dict serves training (all
heads) and inference (only the full-resolution head); ``decoder.deep_supervision`` is the run-time switch nnU-Net's
trainer flips. Unlike dynamic_network_architectures' ``UNetDecoder`` it receives the encoder's channel, stride and
kernel tuples, never the encoder module (which would register the encoder twice in the state_dict).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from monai.networks.layers.factories import Conv
from torch import nn

from .residual import NormAct, Version, residual_stage

__all__ = ["UNetDecoder", "UpsampleConv"]


class UNetDecoder(nn.Module):
    """U-Mamba's decoder: per level, upsample → concatenate the skip → residual stage → 1×1 head.

    Levels run from the bottleneck up (level ``i`` upsamples by ``strides[-(i+1)]`` to the resolution of encoder
    stage ``S-2-i``). ``version`` picks the blocks of the two U-Mamba code generations (Ma, Li, Wang,
    arXiv:2401.04722; bowang-lab/U-Mamba): ``"2024.03"`` upsamples by nearest interpolation + 1×1 conv and merges
    with ``BasicResBlock`` + ``BasicBlockD``; ``"2024.01"`` upsamples by a transposed conv (kernel = stride) and
    merges with ``StackedResidualBlocks``.

    Args:
        spatial_dims: 2 or 3.
        encoder_channels: channels of the encoder stages, ``S`` entries, bottleneck last.
        out_channels: classes of each head (raw logits).
        strides: per encoder stage, ``S`` entries (the first is the stem's, unused here).
        kernel_sizes: per encoder stage; level ``i`` uses the kernel of the stage it returns to.
        blocks_per_stage: residual blocks per level, ``S-1`` entries, bottleneck side first.
        conv_bias: bias of ``BasicBlockD`` and transposed convs.
        norm: MONAI norm. act: MONAI activation.
        version: ``"2024.03"`` (current) or ``"2024.01"`` (paper-era).
        concat_first_skip: concatenate the stage-0 skip at the last level; U-Mamba's current 2D code does not.
        deep_supervision: return every head's logits (see Shapes); settable later via the attribute.

    Shapes:
        input: the ``S`` encoder outputs, stage 0 first; stage ``s`` is ``(B, encoder_channels[s], *S_s)``.
        output: ``(B, out_channels, *S_0)``; with ``deep_supervision`` a list of ``S-1`` logits, full resolution
        first, item ``j`` at the resolution of stage ``j``.
    """

    def __init__(
        self,
        spatial_dims: int,
        encoder_channels: Sequence[int],
        out_channels: int,
        *,
        strides: Sequence[Sequence[int]],
        kernel_sizes: Sequence[Sequence[int]],
        blocks_per_stage: Sequence[int],
        conv_bias: bool,
        norm: NormAct,
        act: NormAct,
        version: Version,
        concat_first_skip: bool = True,
        deep_supervision: bool = False,
    ) -> None:
        super().__init__()
        n = len(encoder_channels)
        if n < 2 or len(strides) != n or len(kernel_sizes) != n or len(blocks_per_stage) != n - 1:
            raise ValueError(
                f"need >= 2 encoder stages with one stride and kernel each and one block count per level, got "
                f"{n} stages, {len(strides)} strides, {len(kernel_sizes)} kernels, {len(blocks_per_stage)} levels"
            )
        self.deep_supervision = deep_supervision
        conv = Conv[Conv.CONV, spatial_dims]
        upsample: Literal["nearest", "transposed"] = "nearest" if version == "2024.03" else "transposed"
        self.upsamples, self.stages, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        self.concat: list[bool] = []
        for i in range(n - 1):
            below, skip = encoder_channels[-(i + 1)], encoder_channels[-(i + 2)]
            concat = concat_first_skip or i < n - 2
            self.concat.append(concat)
            self.upsamples.append(
                UpsampleConv(spatial_dims, below, skip, scale=strides[-(i + 1)], mode=upsample, bias=conv_bias)
            )
            self.stages.append(
                residual_stage(
                    spatial_dims,
                    2 * skip if concat else skip,
                    skip,
                    n_blocks=blocks_per_stage[i],
                    kernel_size=kernel_sizes[-(i + 2)],
                    stride=1,
                    conv_bias=conv_bias,
                    norm=norm,
                    act=act,
                    version=version,
                )
            )
            self.heads.append(conv(skip, out_channels, 1, bias=True))

    def forward(self, skips: Sequence[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        """Decode the encoder outputs ``skips`` (stage 0 first, bottleneck last)."""
        x, logits = skips[-1], []
        last = len(self.stages) - 1
        for i, (upsample, stage, head) in enumerate(zip(self.upsamples, self.stages, self.heads, strict=True)):
            x = upsample(x)
            if self.concat[i]:
                x = torch.cat((x, skips[-(i + 2)]), dim=1)  # level i returns to encoder stage S-2-i
            x = stage(x)
            if self.deep_supervision or i == last:
                logits.append(head(x))
        return logits[::-1] if self.deep_supervision else logits[-1]


class UpsampleConv(nn.Module):
    """Upsample by an integer factor per axis and change channels.

    ``mode="nearest"``: nearest interpolation, then a 1×1 conv with bias (U-Mamba current ``UpsampleLayer``);
    ``mode="transposed"``: a transposed conv with kernel = stride = ``scale`` (nnU-Net, U-Mamba paper-era).

    Shapes:
        input ``(B, in_channels, *S)``; output ``(B, out_channels, *(S · scale))``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        scale: Sequence[int],
        mode: Literal["nearest", "transposed"] = "nearest",
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.scale, self.mode = tuple(int(s) for s in scale), mode
        if mode == "transposed":
            self.conv = Conv[Conv.CONVTRANS, spatial_dims](in_channels, out_channels, self.scale, self.scale, bias=bias)
        else:
            self.conv = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` by ``scale``."""
        if self.mode == "transposed":
            return self.conv(x)
        size = [s * f for s, f in zip(x.shape[2:], self.scale, strict=True)]
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
