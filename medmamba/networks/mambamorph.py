"""MambaMorph (Guo, Wang, et al., arXiv:2401.13934), checked against Guo-Stone/MambaMorph @ b88652d.

Deliberate differences from the official code:

* inputs of any size: the pair is zero-padded (at the end of each axis) to the total stride 16 and the velocity
  field is cropped back, so integration and warping run at the input size (upstream builds its sampling grids for
  one configured size and needs every side divisible by 16);
* scaling and squaring and warping are MONAI's ``DVF2DDF`` and ``Warp`` (same conventions as VoxelMorph's
  ``VecInt``/``SpatialTransformer``: voxel units, channel ``i`` along array axis ``i``, ``align_corners=True``,
  bilinear, zero padding);
* ``forward`` returns ``(warped moving image, displacement field)`` as MONAI's registration networks do; the
  stationary velocity (upstream's ``preint_flow``, which its regulariser uses) comes from
  :meth:`MambaMorph.predict_velocity`, the contrastive embeddings of ``MambaMorphFeat`` from
  :meth:`MambaMorphFeat.embed`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import DVF2DDF, Convolution, Warp
from torch import nn

from medmamba.kernels import RASTER
from medmamba.layers import MambaLayer
from medmamba.networks.registry import register_network

__all__ = ["MambaMorph", "MambaMorphFeat", "RegistrationOutput"]


class RegistrationOutput(NamedTuple):
    """What a registration network returns.

    Attributes:
        warped: the moving image warped onto the fixed one, ``(B, C, D, H, W)``.
        ddf: dense displacement field in voxels, ``(B, 3, D, H, W)``; channel ``i`` moves along array axis ``i``:
            ``warped[x] = moving[x + ddf[:, :, x]]``.
    """

    warped: torch.Tensor
    ddf: torch.Tensor


@register_network("mambamorph", task="registration", spatial_dims=(3,))
class MambaMorph(nn.Module):
    """MambaMorph: deformable MR-CT registration with a Mamba backbone in a TransMorph-style U-shaped network.

    Guo, Wang, Chen, Jia, Sun, Gao, et al.: "MambaMorph: a Mamba-based Framework for Medical MR-CT Deformable
    Registration", arXiv:2401.13934; code Guo-Stone/MambaMorph @ b88652d.

    The pair ``[moving, fixed]`` is embedded by ``Conv 4³ /4 → LN`` plus a fixed 3D sinusoidal position code; each
    backbone stage is a forward-scan Mamba layer ``Mamba(LN(x))`` (no residual) whose output, layer-normed, is a
    skip, and 2×2×2 patch merging (``LN(8C) → Linear 8C→2C``) leads to the next stage. The decoder upsamples
    (trilinear ×2, concat, 2 × ``Conv 3³ → IN → LeakyReLU``) through the backbone skips and two convolutional skips
    of the pair (full and half resolution); a 3×3×3 head (init N(0, 1e-5)) gives a stationary velocity field,
    integrated by scaling and squaring (7 steps) into a diffeomorphic displacement that warps the moving image.

    Parameters with the defaults (``in_channels=1``): 7,305,459 (spec: 7.31 M).

    Args:
        spatial_dims: must be 3.
        in_channels: channels of each image (moving and fixed alike).
        out_channels: components of the displacement; must equal ``spatial_dims``.
        embed_dim: channels of the first backbone stage (96); stage ``i`` has ``embed_dim · 2^i``.
        depths: Mamba layers per backbone stage; upstream's config lists (2, 2, 4) but builds one layer per stage.
        reg_head_channels: channels of the full-resolution decoder block feeding the head (16).
        integration_steps: scaling-and-squaring steps (7); 0 treats the head's output as the displacement itself.
        warp_padding_mode: how the warp samples outside the image: ``"zeros"`` (upstream), ``"border"`` or
            ``"reflection"``.
        d_state: Mamba state size N. d_conv: Mamba causal convolution width. expand: Mamba inner expansion.

    Shapes:
        ``forward(moving, fixed)``, both ``(B, in_channels, D, H, W)`` of any size (padded internally to multiples
        of 16); returns :class:`RegistrationOutput` ``(warped (B, in_channels, D, H, W), ddf (B, 3, D, H, W))``.

    Raises:
        ValueError: a constructor argument is out of range, or moving and fixed differ in shape or channels.

    Example:
        >>> net = MambaMorph(3, 1, 3, embed_dim=12, reg_head_channels=4)
        >>> warped, ddf = net(torch.rand(1, 1, 20, 24, 16), torch.rand(1, 1, 20, 24, 16))
        >>> tuple(warped.shape), tuple(ddf.shape)
        ((1, 1, 20, 24, 16), (1, 3, 20, 24, 16))
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 3,
        *,
        embed_dim: int = 96,
        depths: Sequence[int] = (1, 1, 1),
        reg_head_channels: int = 16,
        integration_steps: int = 7,
        warp_padding_mode: str = "zeros",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims != 3:
            raise ValueError(f"MambaMorph registers 3D volumes: spatial_dims must be 3, got {spatial_dims}")
        if out_channels != spatial_dims:
            raise ValueError(f"out_channels is the displacement's {spatial_dims} components, got {out_channels}")
        depths = tuple(int(d) for d in depths)
        if in_channels < 1 or embed_dim < 2 or embed_dim % 2 or reg_head_channels < 1 or len(depths) < 1:
            raise ValueError(
                f"need in_channels ≥ 1, an even embed_dim ≥ 2, reg_head_channels ≥ 1 and at least one stage; got "
                f"in_channels={in_channels}, embed_dim={embed_dim}, reg_head_channels={reg_head_channels}, "
                f"depths={depths}"
            )
        if integration_steps < 0:
            raise ValueError(f"integration_steps must be ≥ 0, got {integration_steps}")
        if warp_padding_mode not in ("zeros", "border", "reflection"):
            raise ValueError(f"warp_padding_mode must be 'zeros', 'border' or 'reflection', got {warp_padding_mode!r}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        #: the network sees inputs padded to a multiple of this (patch 4, then one halving per further stage)
        self.stride = 4 * 2 ** (len(depths) - 1)
        pair_channels = self._pair_channels(in_channels)
        self.backbone = MambaBackbone(pair_channels, embed_dim, depths, d_state=d_state, d_conv=d_conv, expand=expand)
        self.decoder = FlowDecoder(pair_channels, embed_dim, len(depths), reg_head_channels)
        self.head = nn.Conv3d(reg_head_channels, spatial_dims, 3, padding=1)
        nn.init.normal_(self.head.weight, 0.0, 1e-5)  # start near the identity transform
        if self.head.bias is not None:
            nn.init.zeros_(self.head.bias)
        with warnings.catch_warnings():  # MONAI announces its pure-PyTorch grid_sample path on every construction
            warnings.filterwarnings("ignore", message=".*Using PyTorch native grid_sample", category=UserWarning)
            self.integrate = DVF2DDF(integration_steps, mode="bilinear") if integration_steps else nn.Identity()
            self.warp = Warp(mode="bilinear", padding_mode=warp_padding_mode)
            self.warp_nearest = Warp(mode="nearest", padding_mode=warp_padding_mode)  # label maps at evaluation

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> RegistrationOutput:
        """Register ``moving`` onto ``fixed`` (both ``(B, C, D, H, W)``): warped moving image and displacement."""
        velocity = self.predict_velocity(moving, fixed)  # (B, 3, D, H, W) stationary velocity, voxels
        ddf = self.integrate_velocity(velocity)  # (B, 3, D, H, W) displacement
        return RegistrationOutput(self.warp_image(moving, ddf), ddf)

    def predict_velocity(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """The stationary velocity field ``(B, 3, D, H, W)`` in voxels (upstream's ``preint_flow``)."""
        self._check_pair(moving, fixed)
        size = moving.shape[2:]
        pair = self._pair(self._pad(moving), self._pad(fixed))  # (B, 2·C, D', H', W'), multiples of the stride
        skips = self.backbone(pair)  # (B, E, D'/4, …), (B, 2E, D'/8, …), (B, 4E, D'/16, …)
        velocity = self.head(self.decoder(skips, pair))  # (B, 3, D', H', W')
        return velocity[(..., *(slice(0, s) for s in size))]

    def integrate_velocity(self, velocity: torch.Tensor) -> torch.Tensor:
        """Scaling and squaring of a stationary velocity ``(B, 3, D, H, W)`` into a displacement of that shape."""
        if isinstance(self.integrate, DVF2DDF):
            _drop_stale_grid(self.integrate.warp_layer, velocity)
        return self.integrate(velocity)

    def warp_image(
        self, image: torch.Tensor, ddf: torch.Tensor, mode: Literal["bilinear", "nearest"] = "bilinear"
    ) -> torch.Tensor:
        """Resample ``image`` ``(B, C, D, H, W)`` at ``x + ddf(x)``.

        ``mode="bilinear"`` for images and for one-hot labels in training (differentiable); ``"nearest"`` for label
        maps at evaluation (no gradient; an integer label map comes back in its own dtype).
        """
        if mode not in ("bilinear", "nearest"):
            raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
        warp = self.warp if mode == "bilinear" else self.warp_nearest
        _drop_stale_grid(warp, ddf)
        if image.is_floating_point():
            return warp(image, ddf)
        return warp(image.to(ddf.dtype), ddf).round().to(image.dtype)

    def _pair_channels(self, in_channels: int) -> int:
        """Channels of what the backbone sees: the two images (MambaMorphFeat: their features)."""
        return 2 * in_channels

    def _pair(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return torch.cat([moving, fixed], dim=1)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pad = [(-s) % self.stride for s in x.shape[2:]]
        return F.pad(x, [p for extra in reversed(pad) for p in (0, extra)]) if any(pad) else x

    def _check_pair(self, moving: torch.Tensor, fixed: torch.Tensor) -> None:
        expected = f"(B, {self.in_channels}, D, H, W)"
        for name, x in (("moving", moving), ("fixed", fixed)):
            if x.ndim != 5 or x.shape[1] != self.in_channels:
                raise ValueError(f"{type(self).__name__} expects {name} as {expected}, got {tuple(x.shape)}")
        if moving.shape != fixed.shape:
            raise ValueError(
                f"moving {tuple(moving.shape)} and fixed {tuple(fixed.shape)} must have one shape; resample the "
                "moving image onto the fixed image's grid first"
            )


@register_network("mambamorph_feat", task="registration", spatial_dims=(3,))
class MambaMorphFeat(MambaMorph):
    """MambaMorph with its feature extractor: a shared small U-Net maps each image to 16 features first.

    The journal version's "MambaMorph + feature extractor" (upstream ``MambaMorphFeat``): moving and fixed pass the
    same VoxelMorph-style U-Net (features 16, one conv + LeakyReLU(0.2) per level, two max-pool levels, no norm);
    the backbone sees the 32 concatenated feature channels. A read-out head (``Conv 3³ /2 16→8``, ``Conv 3³ 8→3``,
    LeakyReLU(0.2) each) turns an image's features into the 3-channel half-resolution embeddings of the
    contrastive loss (:meth:`embed`).

    Parameters with the defaults: 7,594,646 (spec: 7.59 M). Arguments and shapes as :class:`MambaMorph`, plus
    ``feature_channels`` (16).

    Example:
        >>> net = MambaMorphFeat(3, 1, 3, embed_dim=12, reg_head_channels=4, feature_channels=4)
        >>> net.embed(torch.rand(1, 1, 16, 16, 16)).shape
        torch.Size([1, 3, 8, 8, 8])
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 3,
        *,
        feature_channels: int = 16,
        embed_dim: int = 96,
        depths: Sequence[int] = (1, 1, 1),
        reg_head_channels: int = 16,
        integration_steps: int = 7,
        warp_padding_mode: str = "zeros",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
    ) -> None:
        if feature_channels < 2:
            raise ValueError(f"feature_channels must be ≥ 2, got {feature_channels}")
        self._features = feature_channels  # read by _pair_channels inside MambaMorph.__init__
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            embed_dim=embed_dim,
            depths=depths,
            reg_head_channels=reg_head_channels,
            integration_steps=integration_steps,
            warp_padding_mode=warp_padding_mode,
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
        )
        self.feature_extractor = FeatureUNet(in_channels, feature_channels)
        self.read_out = nn.Sequential(
            _conv_lrelu(feature_channels, feature_channels // 2, stride=2), _conv_lrelu(feature_channels // 2, 3)
        )

    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """Contrastive embeddings of one image ``(B, C, D, H, W)`` → ``(B, 3, ceil(D/2), ceil(H/2), ceil(W/2))``."""
        size = [math.ceil(s / 2) for s in image.shape[2:]]
        embedding = self.read_out(self.feature_extractor(self._pad(image)))
        return embedding[(..., *(slice(0, s) for s in size))]

    def _pair_channels(self, in_channels: int) -> int:
        """Channels of what the backbone sees: the two images (MambaMorphFeat: their features)."""
        return 2 * self._features

    def _pair(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.feature_extractor(moving), self.feature_extractor(fixed)], dim=1)


class MambaBackbone(nn.Module):
    """TransMorph-style backbone with Mamba stages: ``Conv 4³ /4 → LN`` + position code, then the stages.

    Each stage: ``Mamba(LN(x))`` (no residual) → skip ``LN(x)`` → patch merging to the next stage.

    Returns the layer-normed output of every stage, ``(B, E·2^i, D/(4·2^i), H/(4·2^i), W/(4·2^i))``.
    """

    def __init__(
        self, in_channels: int, embed_dim: int, depths: tuple[int, ...], *, d_state: int, d_conv: int, expand: int
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.patch_embed = nn.Conv3d(in_channels, embed_dim, kernel_size=4, stride=4)
        self.patch_norm = nn.LayerNorm(embed_dim)
        widths = [embed_dim * 2**i for i in range(len(depths))]
        self.stages = nn.ModuleList(
            nn.Sequential(
                *(MambaLayer(c, orders=(RASTER,), d_state=d_state, d_conv=d_conv, expand=expand) for _ in range(d))
            )
            for c, d in zip(widths, depths, strict=True)
        )
        self.out_norms = nn.ModuleList(nn.LayerNorm(c) for c in widths)
        self.merges = nn.ModuleList(PatchMerging(c) for c in widths[:-1])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``(B, C, D, H, W)`` with sides divisible by the stride → one skip map per stage."""
        x = _channel_norm(self.patch_norm, self.patch_embed(x))  # (B, E, D/4, H/4, W/4)
        x = x + sinusoidal_position_3d(x.shape[2:], self.embed_dim, x)
        skips = []
        for i, (stage, norm) in enumerate(zip(self.stages, self.out_norms, strict=True)):
            x = stage(x)
            skips.append(_channel_norm(norm, x))
            if i < len(self.merges):
                x = self.merges[i](x)
        return skips


class PatchMerging(nn.Module):
    """2×2×2 patch merging: concatenate the 8 neighbours (8C) → LayerNorm → Linear 8C → 2C (no bias)."""

    # neighbour order of upstream (Swin/TransMorph), kept so that official weights map one to one
    OFFSETS = ((0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (1, 1, 1))

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8 * dim)
        self.reduction = nn.Linear(8 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` (even sides) → ``(B, 2C, D/2, H/2, W/2)``."""
        x = torch.cat([x[:, :, d::2, h::2, w::2] for d, h, w in self.OFFSETS], dim=1).movedim(1, -1)
        return self.reduction(self.norm(x)).movedim(-1, 1)


class FlowDecoder(nn.Module):
    """Decoder of MambaMorph: up blocks through the backbone skips, then through two conv skips of the input pair.

    Conv skips (Conv3dReLU = ``Conv 3³ (no bias) → IN → LeakyReLU(0.01)``): ``E/2`` channels on
    ``AvgPool(3, /2)`` of the pair, ``reg_head_channels`` on the pair itself. Each up block: trilinear ×2, concat the
    skip, two Conv3dReLU.
    """

    def __init__(self, pair_channels: int, embed_dim: int, num_stages: int, reg_head_channels: int) -> None:
        super().__init__()
        self.avg_pool = nn.AvgPool3d(3, stride=2, padding=1)
        self.skip_half = _conv_in_lrelu(pair_channels, embed_dim // 2)
        self.skip_full = _conv_in_lrelu(pair_channels, reg_head_channels)
        widths = [embed_dim * 2**i for i in reversed(range(num_stages))]  # bottleneck first
        outs = [*widths[1:], embed_dim // 2, reg_head_channels]
        self.up_blocks = nn.ModuleList(
            UpBlock(c_in, c_out, c_out) for c_in, c_out in zip([widths[0], *outs[:-1]], outs, strict=True)
        )

    def forward(self, skips: Sequence[torch.Tensor], pair: torch.Tensor) -> torch.Tensor:
        """Backbone skips (highest resolution first) and the padded pair → ``(B, reg_head_channels, D, H, W)``."""
        conv_skips = [self.skip_half(self.avg_pool(pair)), self.skip_full(pair)]
        x = skips[-1]
        for up, skip in zip(self.up_blocks, [*reversed(skips[:-1]), *conv_skips], strict=True):
            x = up(x, skip)
        return x


class UpBlock(nn.Module):
    """Trilinear ×2 upsampling, concatenation with the skip, two ``Conv 3³ → IN → LeakyReLU``."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            _conv_in_lrelu(in_channels + skip_channels, out_channels), _conv_in_lrelu(out_channels, out_channels)
        )

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, S)`` and ``(B, C_skip, 2S)`` → ``(B, C_out, 2S)``."""
        x = F.interpolate(x, scale_factor=2, mode="trilinear", align_corners=False)
        return self.convs(torch.cat([x, skip], dim=1))


class FeatureUNet(nn.Module):
    """VoxelMorph-style feature extractor of MambaMorphFeat (upstream ``Unet`` with features [[16]·2, [16]·4]).

    ``1→F @1, pool, F→F @½, pool, F→F @¼, up, concat → 2F→F @½, up, concat → 2F→F @1, F→F @1``; every conv is
    ``Conv 3³ (bias, He init) → LeakyReLU(0.2)``, no norm; max pooling and nearest upsampling.

    Shapes:
        input ``(B, in_channels, D, H, W)`` with sides divisible by 4; output ``(B, F, D, H, W)``.
    """

    def __init__(self, in_channels: int, features: int = 16) -> None:
        super().__init__()
        self.down = nn.ModuleList([_conv_lrelu(in_channels, features), _conv_lrelu(features, features)])
        self.up = nn.ModuleList([_conv_lrelu(features, features), _conv_lrelu(2 * features, features)])
        self.out = nn.Sequential(_conv_lrelu(2 * features, features), _conv_lrelu(features, features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, D, H, W)`` → ``(B, F, D, H, W)``."""
        history = []
        for conv in self.down:
            x = conv(x)
            history.append(x)
            x = F.max_pool3d(x, 2)
        for conv in self.up:
            x = F.interpolate(conv(x), scale_factor=2, mode="nearest")
            x = torch.cat([x, history.pop()], dim=1)
        return self.out(x)


def sinusoidal_position_3d(size: Sequence[int], channels: int, like: torch.Tensor) -> torch.Tensor:
    """Fixed 3D sinusoidal position code of MambaMorph, ``(channels, D, H, W)`` on ``like``'s device and dtype.

    The channels are split in three groups of ``c = 2·ceil(channels / 6)``, one per axis; within a group
    ``[sin(p·f_k), cos(p·f_k)]`` with ``f_k = 10000^(−2k/c)``, ``k < c/2``; the code is cut to ``channels``.
    """
    c = 2 * math.ceil(channels / 6)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, c, 2, device=like.device, dtype=torch.float32) / c))
    codes = []
    for axis, n in enumerate(size):
        angle = torch.arange(n, device=like.device, dtype=torch.float32)[:, None] * inv_freq  # (n, c/2)
        code = torch.cat([angle.sin(), angle.cos()], dim=-1).T  # (c, n)
        shape = [c, 1, 1, 1]
        shape[1 + axis] = n
        codes.append(code.reshape(shape).expand(c, *size))
    return torch.cat(codes, dim=0)[:channels].to(like.dtype)


def _channel_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the channels of a channel-first map."""
    return norm(x.movedim(1, -1)).movedim(-1, 1)


def _conv_in_lrelu(in_channels: int, out_channels: int) -> Convolution:
    """TransMorph's Conv3dReLU: ``Conv 3³ (no bias) → InstanceNorm (no affine) → LeakyReLU(0.01)``."""
    return Convolution(
        3,
        in_channels,
        out_channels,
        kernel_size=3,
        norm="instance",
        act=("leakyrelu", {"negative_slope": 0.01}),
        bias=False,
    )


def _conv_lrelu(in_channels: int, out_channels: int, *, stride: int = 1) -> nn.Sequential:
    """VoxelMorph's ConvBlock: ``Conv 3³ (bias, He-normal, bias 0) → LeakyReLU(0.2)``."""
    conv = nn.Conv3d(in_channels, out_channels, 3, stride=stride, padding=1)
    nn.init.kaiming_normal_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.LeakyReLU(0.2))


def _drop_stale_grid(warp: Warp, ddf: torch.Tensor) -> None:
    """MONAI's Warp caches its reference grid by shape only; rebuild it when the device or dtype changed."""
    grid = warp.ref_grid
    if grid is not None and (grid.device != ddf.device or grid.dtype != ddf.dtype):
        warp.ref_grid = None
