"""U-Mamba (Ma, Li, Wang, arXiv:2401.04722): U-Mamba_Bot and U-Mamba_Enc, 2D and 3D, two code generations.

Checked against bowang-lab/U-Mamba: current code @ 530739b (2024-03-27, ``nets/UMamba{Bot,Enc}_{2d,3d}.py``) and
the paper-era code @ 92a741a (2024-01-09, ``nets/UMambaBot.py``, ``nets/UMambaEnc.py``), ``networks.md`` §3.

``version="2024.03"`` (default) builds the current structure, ``version="2024.01"`` the one behind the published
table (residual encoder of dynamic_network_architectures, transposed-conv decoder, Mamba after every Enc stage).

Deliberate differences from upstream: every Mamba layer keeps its convolution and scan in fp32 under autocast
(upstream's Enc produced NaN losses with AMP); the stage-0 skip of the current 2D decoder is a named option
(``concat_first_skip``); the input size is checked with a message naming the rule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medmamba.layers import MambaLayer
from medmamba.layers.decoders import UNetDecoder
from medmamba.layers.residual import NormAct, conv_norm_act, he_init_, residual_stage, zero_init_last_norm_
from medmamba.layers.tokens import ChannelTokenMamba

from .registry import register_network

__all__ = ["UMambaBot", "UMambaEnc"]

logger = logging.getLogger(__name__)

Version = Literal["2024.03", "2024.01"]
Mixer = Literal["none", "spatial", "channel"]
_NORM: NormAct = ("instance", {"affine": True, "eps": 1e-5})
_ACT: NormAct = ("leakyrelu", {"negative_slope": 0.01, "inplace": True})


@register_network("umamba_bot", task="segmentation", spatial_dims=(2, 3))
class UMambaBot(nn.Module):
    """U-Mamba_Bot: a residual U-Net with one Mamba layer on the bottleneck (Ma, Li, Wang, arXiv:2401.04722).

    Configured the way nnU-Net plans configure a residual-encoder U-Net: stages, features, kernels, strides and
    blocks per stage. The bottleneck map becomes ``∏S`` tokens of width ``C_{S-1}``: ``LayerNorm`` → Mamba (forward
    raster order) → back to the map, no residual. Convolutions get nnU-Net's He init.

    ``version="2024.03"`` (current code): stem and stages are a ``BasicResBlock`` + ``BasicBlockD``s, blocks capped
    at 1 for encoder stages ``>= ceil(S/2)`` and decoder levels ``>= ceil(S/2)`` (as upstream caps them), decoder
    upsamples by nearest + 1×1 conv; in 2D the last level skips the stage-0 concatenation. ``version="2024.01"``
    (paper-era): conv-norm-act stem, ``StackedResidualBlocks`` stages, transposed-conv decoder with
    ``StackedResidualBlocks``; ``blocks_per_stage`` used as given.

    Parameters (``1 → 14``, 3D 6 stages 32…320, first kernel 1×3×3, strides 1,(1,2,2),2,2,2,(1,2,2)): 41,945,158
    (current) / 57,832,166 (paper-era); 2D 7 stages 32…512: 47,533,012 / 63,344,180.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels. out_channels: classes (background included), raw logits.
        features_per_stage: channels of each stage, ``S >= 2`` entries.
        strides: per stage, an int or one per axis; the first is usually 1.
        kernel_sizes: per stage, an int or one per axis (odd); or one int for all.
        blocks_per_stage: residual blocks per encoder stage (int or ``S`` entries).
        blocks_per_stage_decoder: residual blocks per decoder level (int or ``S-1`` entries, bottleneck side first).
        conv_bias: bias of the ``BasicBlockD``, stem and transposed convolutions (U-Mamba: True).
        norm: MONAI norm (U-Mamba: affine instance norm). act: MONAI activation (LeakyReLU 0.01).
        deep_supervision: return the logits of every decoder level; ``self.decoder.deep_supervision`` switches it.
        version: ``"2024.03"`` (current) or ``"2024.01"`` (paper-era).
        concat_first_skip: concatenate the stage-0 skip at the last decoder level; ``None`` = upstream's choice
            (False for 2D ``"2024.03"``, else True).
        d_state: Mamba state size N. d_conv: causal conv width. expand: Mamba inner width factor.
        ssm_fp32: keep the Mamba layers' convolution, SSM projections and scan in fp32 under autocast
            (:class:`~medmamba.layers.MambaLayer`); ``False`` runs them in the autocast dtype, as the official code
            does under AMP (the scan still accumulates in fp32), and keeps less for the backward.

    Shapes:
        input ``(B, in_channels, *S)`` with every axis divisible by the product of the strides along it; output
        ``(B, out_channels, *S)``, or with deep supervision a list of ``len(strides) - 1`` logits, full resolution
        first, item ``j`` at ``S / prod(strides[:j+1])``.

    Raises:
        ValueError: inconsistent stage settings, or an input size the strides do not divide.

    Example:
        >>> net = UMambaBot(3, 1, 2, features_per_stage=(8, 16, 32), strides=(1, 2, 2), kernel_sizes=3)
        >>> net(torch.randn(1, 1, 8, 8, 8)).shape
        torch.Size([1, 2, 8, 8, 8])
    """

    topology: _Topology
    encoder: UMambaEncoder
    decoder: UNetDecoder
    input_size: tuple[int, ...] | None
    in_channels: int
    out_channels: int

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        features_per_stage: Sequence[int],
        strides: Sequence[int | Sequence[int]],
        kernel_sizes: int | Sequence[int | Sequence[int]] = 3,
        blocks_per_stage: int | Sequence[int] = 2,
        blocks_per_stage_decoder: int | Sequence[int] = 2,
        conv_bias: bool = True,
        norm: NormAct = _NORM,
        act: NormAct = _ACT,
        deep_supervision: bool = False,
        version: Version = "2024.03",
        concat_first_skip: bool | None = None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        ssm_fp32: bool = True,
    ) -> None:
        super().__init__()
        topo = _Topology.build(
            spatial_dims, features_per_stage, strides, kernel_sizes, blocks_per_stage, blocks_per_stage_decoder, version
        )
        none: tuple[Mixer, ...] = ("none",)
        mixers = none * (topo.n_stages - 1) + ("spatial",)
        _build(
            self, topo=topo, in_channels=in_channels, out_channels=out_channels, mixers=mixers, feature_sizes=(),
            fixed_input_size=None, conv_bias=conv_bias, norm=norm, act=act, deep_supervision=deep_supervision,
            version=version, concat_first_skip=concat_first_skip, d_state=d_state, d_conv=d_conv, expand=expand,
            ssm_fp32=ssm_fp32,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x`` ``(B, in_channels, *S)``; returns logits (a list, full resolution first, under DS)."""
        self.topology.check_input(x, self.in_channels)
        skips = self.encoder(x)  # stage s: (B, C_s, *S / prod(strides[:s+1])); Mamba on the last
        return self.decoder(skips)  # (B, out_channels, *S) or S-1 of them


@register_network("umamba_enc", task="segmentation", spatial_dims=(2, 3))
class UMambaEnc(nn.Module):
    """U-Mamba_Enc: a residual U-Net with a Mamba layer after encoder stages (Ma, Li, Wang, arXiv:2401.04722).

    Same encoder/decoder and arguments as :class:`UMambaBot`; the Mamba layers differ (no residual around them):

    - ``version="2024.03"`` (current): 3D — after every stage; 2D — after alternate stages, counted back from the
      bottleneck, which always has one (stages ``S-1, S-3, …``; the others are identities). A stage whose
      feature map (``input_size / prod(strides[:s+1])``) has no more voxels than channels scans over channels
      (:class:`~medmamba.layers.tokens.ChannelTokenMamba`, width ``∏F_s``), so the network is tied to
      ``input_size`` — sliding-window inference must use exactly that patch.
    - ``version="2024.01"`` (paper-era): after every stage, spatial tokens, 2D and 3D; ``input_size`` unused.
      Residual blocks start as identities (last norm of each ``BasicBlockD`` zeroed, as upstream).

    Parameters (``1 → 14``, 3D 6 stages, patch 48×192×192 — bottleneck 6×6×6 scans over channels): 42,859,142
    current / 59,105,766 paper-era; 2D 7 stages 32…512, patch 320×320: 47,015,538 / 67,333,428.

    Args:
        input_size: the patch size the network will see (required for ``"2024.03"``); decides the channel-token
            stages. Other arguments: see :class:`UMambaBot`.

    Shapes:
        as :class:`UMambaBot`; with ``"2024.03"`` channel-token stages the input must be ``input_size``.

    Raises:
        ValueError: inconsistent stage settings, missing ``input_size`` for ``"2024.03"``, or a wrong input size.

    Example:
        >>> net = UMambaEnc(2, 1, 2, input_size=(16, 16), features_per_stage=(8, 16, 32), strides=(1, 2, 2))
        >>> net(torch.randn(1, 1, 16, 16)).shape
        torch.Size([1, 2, 16, 16])
    """

    topology: _Topology
    encoder: UMambaEncoder
    decoder: UNetDecoder
    input_size: tuple[int, ...] | None
    in_channels: int
    out_channels: int

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        *,
        features_per_stage: Sequence[int],
        strides: Sequence[int | Sequence[int]],
        input_size: Sequence[int] | None = None,
        kernel_sizes: int | Sequence[int | Sequence[int]] = 3,
        blocks_per_stage: int | Sequence[int] = 2,
        blocks_per_stage_decoder: int | Sequence[int] = 2,
        conv_bias: bool = True,
        norm: NormAct = _NORM,
        act: NormAct = _ACT,
        deep_supervision: bool = False,
        version: Version = "2024.03",
        concat_first_skip: bool | None = None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        ssm_fp32: bool = True,
    ) -> None:
        super().__init__()
        topo = _Topology.build(
            spatial_dims, features_per_stage, strides, kernel_sizes, blocks_per_stage, blocks_per_stage_decoder, version
        )
        sizes = topo.feature_sizes(input_size) if input_size is not None else ()
        if version == "2024.03" and input_size is None:
            raise ValueError(
                "UMambaEnc(version='2024.03') needs input_size (the patch size it will see): stages whose feature map "
                "has no more voxels than channels scan over channels, with a width fixed by that size"
            )
        mixers = _enc_mixers(topo, sizes, version)
        logger.debug("UMambaEnc stage mixers %s at feature sizes %s", mixers, sizes)
        # only channel-token stages tie the network to one input size
        fixed = tuple(int(i) for i in input_size) if input_size is not None and "channel" in mixers else None
        _build(
            self, topo=topo, in_channels=in_channels, out_channels=out_channels, mixers=mixers, feature_sizes=sizes,
            fixed_input_size=fixed, conv_bias=conv_bias, norm=norm, act=act, deep_supervision=deep_supervision,
            version=version, concat_first_skip=concat_first_skip, d_state=d_state, d_conv=d_conv, expand=expand,
            ssm_fp32=ssm_fp32,
        )  # fmt: skip
        if version == "2024.01":
            zero_init_last_norm_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Segment ``x`` ``(B, in_channels, *S)``; returns logits (a list, full resolution first, under DS)."""
        self.topology.check_input(x, self.in_channels, fixed=self.input_size)
        skips = self.encoder(x)  # stage s: (B, C_s, *S / prod(strides[:s+1])), each followed by its Mamba
        return self.decoder(skips)  # (B, out_channels, *S) or S-1 of them


def _build(
    net: UMambaBot | UMambaEnc,
    *,
    topo: _Topology,
    in_channels: int,
    out_channels: int,
    mixers: Sequence[Mixer],
    feature_sizes: Sequence[tuple[int, ...]],
    fixed_input_size: tuple[int, ...] | None,
    conv_bias: bool,
    norm: NormAct,
    act: NormAct,
    deep_supervision: bool,
    version: Version,
    concat_first_skip: bool | None,
    d_state: int,
    d_conv: int,
    expand: int,
    ssm_fp32: bool,
) -> None:
    """The construction both U-Mamba variants share: encoder with the given mixers, decoder, He init."""
    if in_channels < 1 or out_channels < 1:
        raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
    if concat_first_skip is None:  # upstream's current 2D decoder drops the stage-0 skip
        concat_first_skip = not (topo.spatial_dims == 2 and version == "2024.03")
    net.topology, net.in_channels, net.out_channels = topo, in_channels, out_channels
    net.input_size = fixed_input_size
    net.encoder = UMambaEncoder(topo, in_channels, mixers, feature_sizes, conv_bias, norm, act, version,
                                d_state, d_conv, expand, ssm_fp32)  # fmt: skip
    net.decoder = UNetDecoder(
        topo.spatial_dims,
        topo.features,
        out_channels,
        strides=topo.strides,
        kernel_sizes=topo.kernel_sizes,
        blocks_per_stage=topo.blocks_decoder,
        conv_bias=conv_bias,
        norm=norm,
        act=act,
        version=version,
        concat_first_skip=concat_first_skip,
        deep_supervision=deep_supervision,
    )
    he_init_(net)


class UMambaEncoder(nn.Module):
    """Stem, then per stage: residual stage (first block strided) → optional Mamba layer; returns every stage.

    ``mixers[s]`` is ``"none"`` (identity), ``"spatial"`` (:class:`MambaLayer` over the ``∏F_s`` voxels, width
    ``C_s``) or ``"channel"`` (:class:`ChannelTokenMamba` over the ``C_s`` channels, width ``∏F_s``).
    """

    def __init__(
        self,
        topo: _Topology,
        in_channels: int,
        mixers: Sequence[Mixer],
        feature_sizes: Sequence[tuple[int, ...]],
        conv_bias: bool,
        norm: NormAct,
        act: NormAct,
        version: Version,
        d_state: int,
        d_conv: int,
        expand: int,
        ssm_fp32: bool,
    ) -> None:
        super().__init__()
        dims, c0 = topo.spatial_dims, topo.features[0]

        def stage(s: int, cin: int, cout: int, stride: Sequence[int]) -> nn.Module:
            return residual_stage(dims, cin, cout, n_blocks=topo.blocks[s], kernel_size=topo.kernel_sizes[s],
                                  stride=stride, conv_bias=conv_bias, norm=norm, act=act, version=version)  # fmt: skip

        def mamba(s: int, kind: Mixer) -> nn.Module:
            if kind == "spatial":
                return MambaLayer(topo.features[s], norm=True, residual=False, d_state=d_state, d_conv=d_conv,
                                  expand=expand, ssm_fp32=ssm_fp32)  # fmt: skip
            if kind == "channel":
                return ChannelTokenMamba(feature_sizes[s], d_state=d_state, d_conv=d_conv, expand=expand,
                                         ssm_fp32=ssm_fp32)  # fmt: skip
            return nn.Identity()

        if version == "2024.01":  # nnU-Net's ResidualEncoder stem: one conv-norm-act
            self.stem = conv_norm_act(
                dims, in_channels, c0, kernel_size=topo.kernel_sizes[0], conv_bias=conv_bias, norm=norm, act=act
            )
        else:  # a stride-1 stage of its own
            self.stem = stage(0, in_channels, c0, (1,) * dims)
        channels = (c0, *topo.features[:-1])
        self.stages = nn.ModuleList(stage(s, channels[s], c, topo.strides[s]) for s, c in enumerate(topo.features))
        self.mixers = nn.ModuleList(mamba(s, kind) for s, kind in enumerate(mixers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage outputs of ``x`` ``(B, in_channels, *S)``, stage 0 first."""
        x = self.stem(x)
        skips = []
        for stage, mixer in zip(self.stages, self.mixers, strict=True):
            x = mixer(stage(x))
            skips.append(x)
        return skips


@dataclass(frozen=True)
class _Topology:
    """Validated per-stage settings: tuples per axis, ``S`` stages, decoder levels bottleneck side first."""

    spatial_dims: int
    features: tuple[int, ...]
    strides: tuple[tuple[int, ...], ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    blocks: tuple[int, ...]
    blocks_decoder: tuple[int, ...]

    @property
    def n_stages(self) -> int:
        return len(self.features)

    @property
    def total_stride(self) -> tuple[int, ...]:
        return tuple(math.prod(s[a] for s in self.strides) for a in range(self.spatial_dims))

    @classmethod
    def build(
        cls,
        spatial_dims: int,
        features: Sequence[int],
        strides: Sequence[int | Sequence[int]],
        kernel_sizes: int | Sequence[int | Sequence[int]],
        blocks: int | Sequence[int],
        blocks_decoder: int | Sequence[int],
        version: Version,
    ) -> _Topology:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if version not in ("2024.03", "2024.01"):
            raise ValueError(f"version must be '2024.03' (current) or '2024.01' (paper-era), got {version!r}")
        n = len(features)
        if n < 2 or min(features) < 1:
            raise ValueError(f"features_per_stage needs >= 2 positive entries, got {tuple(features)}")
        if isinstance(kernel_sizes, int):
            kernel_sizes = [kernel_sizes] * n
        per_axis = {
            "strides": _per_axis("strides", strides, n, spatial_dims),
            "kernel_sizes": _per_axis("kernel_sizes", kernel_sizes, n, spatial_dims),
        }
        if any(k % 2 == 0 for ks in per_axis["kernel_sizes"] for k in ks):
            raise ValueError(
                f"kernel_sizes must be odd (padding k // 2 keeps the size), got {per_axis['kernel_sizes']}"
            )
        enc = list(_per_stage("blocks_per_stage", blocks, n))
        dec = list(_per_stage("blocks_per_stage_decoder", blocks_decoder, n - 1))
        if version == "2024.03":  # upstream caps the low-resolution encoder and high-resolution decoder half
            enc[math.ceil(n / 2) :] = [1] * (n - math.ceil(n / 2))
            dec[math.ceil((n - 1) / 2 + 0.5) :] = [1] * len(dec[math.ceil((n - 1) / 2 + 0.5) :])
        return cls(
            spatial_dims, tuple(int(f) for f in features), per_axis["strides"], per_axis["kernel_sizes"],
            tuple(enc), tuple(dec),
        )  # fmt: skip

    def feature_sizes(self, input_size: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        """Map size after each stage for an input of ``input_size`` (floor division, as upstream)."""
        if len(input_size) != self.spatial_dims or min(input_size) < 1:
            raise ValueError(f"input_size must be {self.spatial_dims} positive sizes, got {tuple(input_size)}")
        sizes, size = [], tuple(int(i) for i in input_size)
        for stride in self.strides:
            size = tuple(i // s for i, s in zip(size, stride, strict=True))
            sizes.append(size)
        if min(sizes[-1]) < 1:
            raise ValueError(f"input_size {tuple(input_size)} is smaller than the total stride {self.total_stride}")
        return tuple(sizes)

    def check_input(self, x: torch.Tensor, in_channels: int, fixed: tuple[int, ...] | None = None) -> None:
        """Raise ``ValueError`` unless ``x`` is ``(B, in_channels, *S)`` with S divisible by the total stride."""
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != in_channels:
            raise ValueError(
                f"expected input (B, {in_channels}, {self.spatial_dims} spatial axes), got {tuple(x.shape)}"
            )
        size, total = tuple(x.shape[2:]), self.total_stride
        bad = [a for a, (i, t) in enumerate(zip(size, total, strict=True)) if i % t]
        if bad:
            raise ValueError(
                f"input size {size} is not divisible by the total stride {total} along axes {bad}; "
                "pad or crop each axis to a multiple of the product of the strides along it"
            )
        if fixed is not None and size != fixed:
            raise ValueError(
                f"this network scans over channels at stages built for input_size {fixed}, got input {size}; "
                "use that patch size (sliding window) or rebuild with input_size set to it"
            )


def _enc_mixers(topo: _Topology, sizes: Sequence[tuple[int, ...]], version: Version) -> tuple[Mixer, ...]:
    """Which Mamba follows each Enc stage (see :class:`UMambaEnc`)."""
    n = topo.n_stages
    spatial: tuple[Mixer, ...] = ("spatial",)
    if version == "2024.01":
        return spatial * n
    mixers: list[Mixer] = []
    for s in range(n):
        kind: Mixer = "channel" if math.prod(sizes[s]) <= topo.features[s] else "spatial"
        if topo.spatial_dims == 2 and not (bool(s % 2) ^ bool(n % 2)):
            kind = "none"  # 2D: alternate stages, the bottleneck always has one
        mixers.append(kind)
    return tuple(mixers)


def _per_axis(name: str, value: Sequence[int | Sequence[int]], n: int, dims: int) -> tuple[tuple[int, ...], ...]:
    if len(value) != n:
        raise ValueError(f"{name} needs one entry per stage ({n}), got {len(value)}: {value}")
    out = tuple((int(v),) * dims if isinstance(v, int) else tuple(int(i) for i in v) for v in value)
    if any(len(v) != dims or min(v) < 1 for v in out):
        raise ValueError(f"each entry of {name} must be a positive int or {dims} positive ints, got {value}")
    return out


def _per_stage(name: str, value: int | Sequence[int], n: int) -> tuple[int, ...]:
    out = (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) != n or min(out) < 1:
        raise ValueError(f"{name} needs {n} entries >= 1 (or one int), got {value}")
    return out
