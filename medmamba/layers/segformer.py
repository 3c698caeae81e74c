"""SegFormer's Mix Transformer (MiT) pieces and its all-MLP decode head, as Vivim uses them.

Xie, Wang, Yu, Anandkumar, Alvarez, Luo: "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021, arXiv:2105.15203 (NVlabs/SegFormer; the Hugging Face port ``SegformerForSemantic
Segmentation`` that Vivim loads has the same parameter shapes). Written here so that no model hub is needed: the
pre-trained weights are optional files (``medmamba.networks.vivim.load_mit_weights``).

Tokens are ``(B, L, C)`` with ``L = h·w`` in raster order (last axis fastest); stages return channel-first maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn

__all__ = [
    "MIT_B3",
    "EfficientSelfAttention",
    "MiTBlock",
    "MiTStage",
    "MixFFN",
    "OverlapPatchEmbed",
    "SegFormerHead",
    "init_mit_weights",
]

#: MiT-B3 (SegFormer-B3) per-stage settings: widths, transformer blocks, heads, sequence-reduction ratios,
#: overlapping-patch kernel sizes and strides; MLP ratio 4, stochastic depth up to 0.1, decoder width 768.
MIT_B3: dict[str, tuple[int, ...]] = {
    "features_per_stage": (64, 128, 320, 512),
    "mit_depths": (3, 4, 18, 3),
    "num_heads": (1, 2, 5, 8),
    "sr_ratios": (8, 4, 2, 1),
    "patch_sizes": (7, 3, 3, 3),
    "patch_strides": (4, 2, 2, 2),
}


def init_mit_weights(module: nn.Module) -> None:
    """SegFormer's initialisation: truncated normal (std 0.02) Linears, He-normal (fan-out) convs, unit LayerNorms.

    Use as ``model.apply(init_mit_weights)``.
    """
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: ``Conv k×k / stride`` (padding ``k // 2``) → LayerNorm over channels.

    Shapes:
        input ``(B, in_channels, H, W)``; output tokens ``(B, h·w, out_channels)`` and ``(h, w)`` with
        ``h = ceil(H / stride)`` for odd ``k ≥ stride - 1`` (7/4 and 3/2 in MiT).
    """

    def __init__(self, in_channels: int, out_channels: int, *, patch_size: int = 7, stride: int = 4) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, C_in, H, W)`` → ``(B, h·w, C)``, ``(h, w)``."""
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), (h, w)


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a map shrunk by ``sr_ratio`` (PVT's reduction).

    Keys/values: ``Conv sr×sr / sr`` → LayerNorm, so attention costs ``L · L / sr²`` instead of ``L²``.
    Includes the output projection.
    """

    def __init__(self, dim: int, *, num_heads: int, sr_ratio: int = 1, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads, self.sr_ratio, self.attn_drop = num_heads, sr_ratio, attn_drop
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Tokens ``(B, h·w, C)`` of an ``h × w`` map → ``(B, h·w, C)``."""
        batch, length, dim = x.shape
        kv = x
        if self.sr_ratio > 1:
            kv = self.sr(x.transpose(1, 2).reshape(batch, dim, *size))
            kv = self.sr_norm(kv.flatten(2).transpose(1, 2))

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, heads, L, C / heads)
            return t.unflatten(-1, (self.num_heads, dim // self.num_heads)).transpose(1, 2)

        q, k, v = heads(self.query(x)), heads(self.key(kv)), heads(self.value(kv))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(batch, length, dim)))


class MixFFN(nn.Module):
    """Mix-FFN: ``Linear C→hidden → depth-wise Conv 3×3 → GELU → Linear hidden→C`` (the conv replaces positions)."""

    def __init__(self, dim: int, hidden: int, *, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Tokens ``(B, h·w, C)`` → ``(B, h·w, C)``."""
        x = self.fc1(x)
        x = self.dwconv(x.transpose(1, 2).unflatten(-1, size)).flatten(2).transpose(1, 2)
        return self.drop(self.fc2(self.drop(self.act(x))))


class MiTBlock(nn.Module):
    """One transformer block of MiT: ``x + Attn(LN(x))``, then ``x + MixFFN(LN(x))``, with stochastic depth."""

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        sr_ratio: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = EfficientSelfAttention(
            dim, num_heads=num_heads, sr_ratio=sr_ratio, attn_drop=attn_drop, proj_drop=drop
        )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Tokens ``(B, h·w, C)`` → ``(B, h·w, C)``."""
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class MiTStage(nn.Module):
    """One MiT stage: overlapping patch embedding, then ``depth`` transformer blocks (then optionally LayerNorm).

    Args:
        in_channels: channels of the incoming map. dim: channels of this stage.
        depth: transformer blocks. num_heads: attention heads. sr_ratio: key/value reduction ratio.
        patch_size: patch-embedding kernel. stride: patch-embedding stride.
        mlp_ratio: Mix-FFN hidden width ÷ dim. drop: dropout after projections. attn_drop: attention dropout.
        drop_path: stochastic-depth rate per block (a float for all, or one per block).
        final_norm: apply SegFormer's stage-final LayerNorm (Vivim skips it).

    Shapes:
        input ``(B, in_channels, H, W)``; output ``(B, dim, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        *,
        depth: int,
        num_heads: int,
        sr_ratio: int,
        patch_size: int,
        stride: int,
        mlp_ratio: float = 4.0,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float | Sequence[float] = 0.0,
        final_norm: bool = False,
    ) -> None:
        super().__init__()
        rates = [float(drop_path)] * depth if isinstance(drop_path, (int, float)) else [float(r) for r in drop_path]
        if len(rates) != depth:
            raise ValueError(f"drop_path lists {len(rates)} rates for {depth} blocks")
        self.patch_size, self.stride, self.sr_ratio = patch_size, stride, sr_ratio
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, patch_size=patch_size, stride=stride)
        self.blocks = nn.ModuleList(
            MiTBlock(
                dim,
                num_heads=num_heads,
                sr_ratio=sr_ratio,
                mlp_ratio=mlp_ratio,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=r,
            )
            for r in rates
        )
        self.norm = nn.LayerNorm(dim) if final_norm else nn.Identity()
        self.apply(init_mit_weights)

    def output_size(self, size: Sequence[int]) -> list[int]:
        """The ``(h, w)`` this stage makes of an ``(H, W)`` map."""
        pad = self.patch_size // 2
        return [(n + 2 * pad - self.patch_size) // self.stride + 1 for n in size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, H, W)`` → ``(B, dim, h, w)``."""
        tokens, size = self.patch_embed(x)
        for block in self.blocks:
            tokens = block(tokens, size)
        return self.norm(tokens).transpose(1, 2).unflatten(-1, size)


class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decode head.

    Per stage ``Linear C_i → hidden`` on its tokens, bilinear resize to the first map's size, concatenation with the
    deepest stage first, ``Conv 1×1 (n·hidden → hidden, no bias) → BatchNorm → ReLU → Dropout``, then the classifier
    ``Conv 1×1 hidden → out_channels``.

    Shapes:
        inputs: one map per stage ``(B, C_i, h_i, w_i)``, highest resolution first; output
        ``(B, out_channels, h_0, w_0)`` raw logits.
    """

    def __init__(
        self, in_channels: Sequence[int], out_channels: int, *, hidden_size: int = 768, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(c, hidden_size) for c in in_channels)
        self.fuse = nn.Conv2d(len(self.linear_c) * hidden_size, hidden_size, 1, bias=False)
        self.norm = nn.BatchNorm2d(hidden_size)
        self.act = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.apply(init_mit_weights)
        # PyTorch's default init: SegFormer's fan-out rule would give a 1-class classifier logits of std ~1.4
        self.classifier = nn.Conv2d(hidden_size, out_channels, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """Stage maps (highest resolution first) → logits at the first map's resolution."""
        size = features[0].shape[-2:]
        unified = [
            F.interpolate(
                linear(f.flatten(2).transpose(1, 2)).transpose(1, 2).unflatten(-1, f.shape[-2:]),
                size=size,
                mode="bilinear",
                align_corners=False,
            )
            for linear, f in zip(self.linear_c, features, strict=True)
        ]
        x = self.dropout(self.act(self.norm(self.fuse(torch.cat(unified[::-1], dim=1)))))
        return self.classifier(x)
