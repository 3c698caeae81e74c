"""Vivim (Yang, Xing, Zhu, arXiv:2401.14168, IEEE TCSVT 2025), checked against scott-yjyang/Vivim @ 2bcd619.

Deliberate differences from the official code:

* the MiT-B3 encoder is written here (``medmamba.layers.segformer``) and nothing downloads at construction;
  ImageNet/ADE20K weights load from a local file with :func:`load_mit_weights`;
* the clip length T is read from the input (upstream's temporal scan hard-codes 5 frames);
* ``in_channels`` is honoured (upstream always builds a 3-channel patch embedding); the unused ADE20K classifier
  is not built (59.51 M instead of 59.62 M parameters);
* SegFormer's stage-final LayerNorms, which upstream builds but never applies, are applied as in SegFormer's
  MiT-B3 (whose pretrained weights include them); ``stage_norms=False`` reproduces upstream's forward and then
  does not build them (a parameter no gradient reaches breaks DDP);
* the Mamba projections keep mamba_ssm's initialisation; ``mamba_init="vivim"`` reproduces upstream's
  truncated-normal re-initialisation of every Linear in the ST-Mamba layers (Δ bias zeroed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch
import torch.nn.functional as F
from torch import nn

from medmamba.errors import CheckpointError
from medmamba.kernels import RASTER, REVERSED, TEMPORAL
from medmamba.layers import MambaLayer
from medmamba.layers.segformer import MIT_B3, MiTStage, SegFormerHead
from medmamba.networks.registry import register_network

__all__ = ["Vivim", "load_mit_weights"]

logger = logging.getLogger(__name__)


@register_network("vivim", task="video", spatial_dims=(2,))
class Vivim(nn.Module):
    """Vivim: a video vision Mamba for medical video segmentation (MiT-B3 + spatio-temporal Mamba + MLP decoder).

    Yang, Xing, Zhu: "Vivim: a Video Vision Mamba for Medical Video Segmentation", arXiv:2401.14168 (IEEE TCSVT
    2025); code scott-yjyang/Vivim @ 2bcd619.

    The frames of a clip go through SegFormer-B3's four stages as a batch of images; after each stage the clip's
    maps ``(B, C_i, T, h_i, w_i)`` pass ``depths[i]`` spatio-temporal Mamba layers, each
    ``x + Mamba(LN(x))`` over the forward, reversed and time-first orders (averaged), then
    ``x + DSF(LN(x))`` (detail-specific feed-forward: Linear → depth-wise Conv 3×3×3 → GELU → Linear).
    SegFormer's all-MLP head fuses the four stages at 1/4 resolution; logits are resized to the input size.

    Parameters for ``in_channels=3, out_channels=1`` and the defaults: 59,505,089 (spec: 59.51 M) — upstream's
    59,620,439 (spec: 59.62 M) less its unused ADE20K classifier (115,350); 59,503,041 with ``stage_norms=False``.

    Args:
        spatial_dims: must be 2 (frames are 2D; time is the third axis of the Mamba scan).
        in_channels: channels per frame (3 for the ImageNet-pretrained encoder).
        out_channels: logits per pixel (1: binary lesion/polyp mask).
        features_per_stage: MiT widths. mit_depths: transformer blocks per MiT stage. num_heads: attention heads
            per stage. sr_ratios: key/value reduction per stage. patch_sizes, patch_strides: overlapping patch
            embedding kernels and strides (total stride 32). Defaults: MiT-B3.
        depths: spatio-temporal Mamba layers after each MiT stage.
        mlp_ratio: Mix-FFN and DSF hidden width ÷ channels.
        decoder_size: width of the all-MLP head (768).
        dropout: dropout before the classifier (0.1).
        drop_path_rate: stochastic depth of the MiT blocks, linearly up to this value (0.1).
        with_edge: also return an edge map from a 1×1 head on the stage-1 features (upstream's edge variant).
        stage_norms: apply SegFormer's LayerNorm at the end of each MiT stage (SegFormer and its pretrained
            weights do; upstream Vivim skips it — ``False`` reproduces that and does not build the norms).
        mamba_init: ``"mamba"`` (mamba_ssm's Δ/A/D initialisation) or ``"vivim"`` (upstream: every Linear in an
            ST-Mamba layer truncated-normal std 0.02, biases zero, so the initial Δ is softplus(0)).
        d_state: Mamba state size N. d_conv: Mamba causal convolution width. expand: Mamba inner expansion.

    Shapes:
        input ``(B, T, in_channels, H, W)``, any T ≥ 1 and H, W ≥ 32 with MiT-B3's reductions (multiples of 32
        keep every stage exact);
        output ``(B·T, out_channels, H, W)`` raw logits for every frame (frame ``t`` of clip ``b`` at ``b·T + t``);
        with ``with_edge`` a tuple ``(logits, edge_logits)`` of that shape and ``(B·T, 1, H, W)``.

    Raises:
        ValueError: ``spatial_dims`` is not 2, the per-stage settings disagree in length, or (in ``forward``) the
            input is not ``(B, T, in_channels, H, W)``.

    Example:
        >>> net = Vivim(2, 3, 1, features_per_stage=(8, 16, 24, 32), mit_depths=(1, 1, 1, 1),
        ...             num_heads=(1, 1, 1, 1), depths=(1, 1, 1, 1), decoder_size=16)
        >>> net(torch.randn(1, 3, 3, 64, 64)).shape
        torch.Size([3, 1, 64, 64])
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        *,
        features_per_stage: Sequence[int] = MIT_B3["features_per_stage"],
        mit_depths: Sequence[int] = MIT_B3["mit_depths"],
        num_heads: Sequence[int] = MIT_B3["num_heads"],
        sr_ratios: Sequence[int] = MIT_B3["sr_ratios"],
        patch_sizes: Sequence[int] = MIT_B3["patch_sizes"],
        patch_strides: Sequence[int] = MIT_B3["patch_strides"],
        depths: Sequence[int] = (2, 2, 2, 2),
        mlp_ratio: float = 4.0,
        decoder_size: int = 768,
        dropout: float = 0.1,
        drop_path_rate: float = 0.1,
        with_edge: bool = False,
        stage_norms: bool = True,
        mamba_init: Literal["mamba", "vivim"] = "mamba",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims != 2:
            raise ValueError(f"Vivim segments 2D frames: spatial_dims must be 2, got {spatial_dims}")
        stages = {
            "features_per_stage": features_per_stage,
            "mit_depths": mit_depths,
            "num_heads": num_heads,
            "sr_ratios": sr_ratios,
            "patch_sizes": patch_sizes,
            "patch_strides": patch_strides,
            "depths": depths,
        }
        if len({len(v) for v in stages.values()}) != 1 or not len(depths):
            lengths = ", ".join(f"{k}={len(v)}" for k, v in stages.items())
            raise ValueError(f"Vivim's per-stage settings must be non-empty and of one length, got {lengths}")
        if mamba_init not in ("mamba", "vivim"):
            raise ValueError(f"mamba_init must be 'mamba' or 'vivim', got {mamba_init!r}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be positive, got {in_channels}, {out_channels}")
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        features = tuple(int(f) for f in features_per_stage)
        self.encoder = VivimEncoder(
            in_channels,
            features,
            mit_depths=tuple(mit_depths),
            num_heads=tuple(num_heads),
            sr_ratios=tuple(sr_ratios),
            patch_sizes=tuple(patch_sizes),
            patch_strides=tuple(patch_strides),
            depths=tuple(depths),
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            stage_norms=stage_norms,
            mamba_init=mamba_init,
            mamba={"d_state": d_state, "d_conv": d_conv, "expand": expand},
        )
        self.decoder = SegFormerHead(features, out_channels, hidden_size=decoder_size, dropout=dropout)
        self.edge_head = nn.Conv2d(features[0], 1, 1) if with_edge else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Segment every frame of the clips ``x`` ``(B, T, C, H, W)`` → logits ``(B·T, out_channels, H, W)``."""
        self._check_input_size(x)
        features = self.encoder(x.flatten(0, 1), num_frames=x.shape[1])  # (B·T, C_i, H/4 … H/32, W/4 … W/32)
        logits = self._resize(self.decoder(features), x)  # (B·T, out_channels, H, W)
        if self.edge_head is None:
            return logits
        return logits, self._resize(self.edge_head(features[0]), x)

    def _check_input_size(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[2] != self.in_channels:
            raise ValueError(f"Vivim expects clips (B, T, {self.in_channels}, H, W), got {tuple(x.shape)}")
        size = list(x.shape[-2:])
        for i, stage in enumerate(cast("list[MiTStage]", list(self.encoder.mit))):
            size = stage.output_size(size)
            if min(size) < stage.sr_ratio:
                raise ValueError(
                    f"Vivim's frames {tuple(x.shape[-2:])} are too small: stage {i} would see a {size[0]}×{size[1]} "
                    f"map, smaller than its key/value reduction {stage.sr_ratio}; use frames of at least 32×32"
                )

    @staticmethod
    def _resize(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class VivimEncoder(nn.Module):
    """MiT stages (``mit``), each followed by its spatio-temporal Mamba layers (``st_mamba``).

    Returns every stage's map ``(B·T, C_i, h_i, w_i)`` (after its Mamba layers), highest resolution first; each is
    also the next stage's input. ``stage_norms``: apply SegFormer's stage-final LayerNorm (upstream skips it).
    """

    def __init__(
        self,
        in_channels: int,
        features: tuple[int, ...],
        *,
        mit_depths: tuple[int, ...],
        num_heads: tuple[int, ...],
        sr_ratios: tuple[int, ...],
        patch_sizes: tuple[int, ...],
        patch_strides: tuple[int, ...],
        depths: tuple[int, ...],
        mlp_ratio: float,
        drop_path_rate: float,
        stage_norms: bool,
        mamba_init: str,
        mamba: dict[str, int],
    ) -> None:
        super().__init__()
        total = sum(mit_depths)  # stochastic depth rising linearly over all blocks (plain floats: meta-safe)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        starts = [sum(mit_depths[:i]) for i in range(len(mit_depths))]
        self.mit = nn.ModuleList(
            MiTStage(
                c_in,
                c,
                depth=n,
                num_heads=heads,
                sr_ratio=sr,
                patch_size=k,
                stride=s,
                mlp_ratio=mlp_ratio,
                drop_path=rates[start : start + n],
                final_norm=stage_norms,
            )
            for c_in, c, n, heads, sr, k, s, start in zip(
                (in_channels, *features[:-1]),
                features,
                mit_depths,
                num_heads,
                sr_ratios,
                patch_sizes,
                patch_strides,
                starts,
                strict=True,
            )
        )
        self.st_mamba = nn.ModuleList(
            nn.Sequential(*(STMambaLayer(c, mlp_ratio=mlp_ratio, mamba_init=mamba_init, **mamba) for _ in range(d)))
            for c, d in zip(features, depths, strict=True)
        )

    def forward(self, frames: torch.Tensor, num_frames: int) -> list[torch.Tensor]:
        """Frames ``(B·T, C, H, W)`` of clips of ``num_frames`` → per stage ``(B·T, C_i, h_i, w_i)``."""
        features, x = [], frames
        for mit, st_mamba in zip(self.mit, self.st_mamba, strict=True):
            x = mit(x)  # (B·T, C_i, h_i, w_i)
            clip = x.unflatten(0, (-1, num_frames)).transpose(1, 2)  # (B, C_i, T, h_i, w_i): time is the slow axis
            x = st_mamba(clip).transpose(1, 2).flatten(0, 1)
            features.append(x)
        return features


class STMambaLayer(nn.Module):
    """Spatio-temporal Mamba layer: ``x + Mamba(LN(x))`` (forward, reversed, time-first; mean), ``x + DSF(LN(x))``.

    Shapes:
        input ``(B, C, T, h, w)``; output the same.
    """

    def __init__(
        self,
        dim: int,
        *,
        mlp_ratio: float = 4.0,
        mamba_init: str = "mamba",
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
    ) -> None:
        super().__init__()
        self.mamba = MambaLayer(
            dim,
            orders=(RASTER, REVERSED, TEMPORAL),
            merge="mean",
            residual=True,
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
        )
        self.norm = nn.LayerNorm(dim)
        self.dsf = DetailSpecificFFN(dim, int(dim * mlp_ratio))
        if mamba_init == "vivim":
            self._vivim_reinit()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, T, h, w)`` → ``(B, C, T, h, w)``."""
        x = self.mamba(x)
        return x + self.dsf(self.norm(x.movedim(1, -1)))

    @torch.no_grad()
    def _vivim_reinit(self) -> None:
        # Upstream applies its Linear init to the whole layer, Mamba projections included, which also overwrites
        # mamba_ssm's Δ-bias initialisation (biases zeroed: initial Δ = softplus(0) ≈ 0.69).
        for weight in (
            self.mamba.in_proj.weight,
            self.mamba.out_proj.weight,
            self.mamba.x_proj_weight,
            self.mamba.dt_proj_weight,
        ):
            nn.init.trunc_normal_(weight, std=0.02)
        nn.init.zeros_(self.mamba.dt_proj_bias)
        for proj in (self.mamba.in_proj, self.mamba.out_proj):
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)


class DetailSpecificFFN(nn.Module):
    """Detail-specific feed-forward: ``Linear C→hidden → depth-wise Conv 3×3×3 over (T, h, w) → GELU → Linear``.

    Shapes:
        input channel-last ``(B, T, h, w, C)``; output channel-first ``(B, C, T, h, w)`` (ready for the residual).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv3d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        for fc in (self.fc1, self.fc2):  # upstream's Mlp init
            nn.init.trunc_normal_(fc.weight, std=0.02)
            nn.init.zeros_(fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, h, w, C)`` → ``(B, C, T, h, w)``."""
        x = self.act(self.dwconv(self.fc1(x).movedim(-1, 1)))
        return self.fc2(x.movedim(1, -1)).movedim(-1, 1)


# --- pre-trained MiT / SegFormer weights ------------------------------------------------------------------------

#: (pattern, replacement) over checkpoint keys after stripping wrapper prefixes; replacement None = known, unused.
#: Hugging Face (``SegformerForSemanticSegmentation`` / ``SegformerModel``), then NVlabs / mmsegmentation names.
_KEY_RULES: tuple[tuple[re.Pattern[str], str | None], ...] = tuple(
    (re.compile(p), r)
    for p, r in (
        (r"encoder\.patch_embeddings\.(\d+)\.proj\.(\w+)", r"encoder.mit.\1.patch_embed.proj.\2"),
        (r"encoder\.patch_embeddings\.(\d+)\.layer_norm\.(\w+)", r"encoder.mit.\1.patch_embed.norm.\2"),
        (r"encoder\.block\.(\d+)\.(\d+)\.layer_norm_([12])\.(\w+)", r"encoder.mit.\1.blocks.\2.norm\3.\4"),
        (
            r"encoder\.block\.(\d+)\.(\d+)\.attention\.self\.(query|key|value|sr)\.(\w+)",
            r"encoder.mit.\1.blocks.\2.attn.\3.\4",
        ),
        (
            r"encoder\.block\.(\d+)\.(\d+)\.attention\.self\.layer_norm\.(\w+)",
            r"encoder.mit.\1.blocks.\2.attn.sr_norm.\3",
        ),
        (r"encoder\.block\.(\d+)\.(\d+)\.attention\.output\.dense\.(\w+)", r"encoder.mit.\1.blocks.\2.attn.proj.\3"),
        (r"encoder\.block\.(\d+)\.(\d+)\.mlp\.dense([12])\.(\w+)", r"encoder.mit.\1.blocks.\2.mlp.fc\3.\4"),
        (r"encoder\.block\.(\d+)\.(\d+)\.mlp\.dwconv\.dwconv\.(\w+)", r"encoder.mit.\1.blocks.\2.mlp.dwconv.\3"),
        (r"encoder\.layer_norm\.(\d+)\.(\w+)", r"encoder.mit.\1.norm.\2"),  # stage-final norms
        (r"decode_head\.linear_c\.(\d+)\.proj\.(\w+)", r"decoder.linear_c.\1.\2"),
        (r"decode_head\.linear_fuse\.weight", "decoder.fuse.weight"),
        (r"decode_head\.batch_norm\.(\w+)", r"decoder.norm.\1"),
        (r"decode_head\.classifier\.\w+", None),  # the ADE20K classifier; Vivim has its own
        # NVlabs MiT (mit_b3.pth) and mmsegmentation (stage numbers from 1; k and v fused as kv, split below)
        (r"patch_embed(\d)\.proj\.(\w+)", r"encoder.mit.<\1>.patch_embed.proj.\2"),
        (r"patch_embed(\d)\.norm\.(\w+)", r"encoder.mit.<\1>.patch_embed.norm.\2"),
        (r"block(\d)\.(\d+)\.norm([12])\.(\w+)", r"encoder.mit.<\1>.blocks.\2.norm\3.\4"),
        (r"block(\d)\.(\d+)\.attn\.q\.(\w+)", r"encoder.mit.<\1>.blocks.\2.attn.query.\3"),
        (r"block(\d)\.(\d+)\.attn\.kv\.(\w+)", r"encoder.mit.<\1>.blocks.\2.attn.<kv>.\3"),
        (r"block(\d)\.(\d+)\.attn\.(proj|sr)\.(\w+)", r"encoder.mit.<\1>.blocks.\2.attn.\3.\4"),
        (r"block(\d)\.(\d+)\.attn\.norm\.(\w+)", r"encoder.mit.<\1>.blocks.\2.attn.sr_norm.\3"),
        (r"block(\d)\.(\d+)\.mlp\.(fc[12])\.(\w+)", r"encoder.mit.<\1>.blocks.\2.mlp.\3.\4"),
        (r"block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.(\w+)", r"encoder.mit.<\1>.blocks.\2.mlp.dwconv.\3"),
        (r"norm(\d)\.(\w+)", r"encoder.mit.<\1>.norm.\2"),  # stage-final norms
        (r"head\.\w+", None),
        (r"decode_head\.linear_c(\d)\.proj\.(\w+)", r"decoder.linear_c.<\1>.\2"),
        (r"decode_head\.linear_fuse\.conv\.weight", "decoder.fuse.weight"),
        (r"decode_head\.linear_fuse\.bn\.(\w+)", r"decoder.norm.\1"),
        (r"decode_head\.(linear_pred|conv_seg)\.\w+", None),
    )
)
_WRAPPER_PREFIXES = ("module.", "backbone.", "segformer.")


def load_mit_weights(model: Vivim, path: str | Path) -> list[str]:
    """Load pre-trained SegFormer/MiT weights from a local file into a Vivim's encoder (and decode head).

    Reads Hugging Face checkpoints (``SegformerForSemanticSegmentation``, e.g. segformer-b3-finetuned-ade-512-512,
    the one upstream Vivim downloads; or ``SegformerModel``/mit-b3) and NVlabs/mmsegmentation ones (``mit_b3.pth``,
    fused ``kv`` split into key and value), as ``.safetensors`` or a weights-only PyTorch file. Every MiT parameter
    of the model must be in the file; the decode head's ``linear_c``/``fuse``/``norm`` are loaded when present
    (upstream reuses ADE20K's), its classifier never (Vivim's own ``out_channels``). Nothing is downloaded.

    Args:
        model: a :class:`Vivim` built with the MiT-B3 defaults (or the widths of the checkpoint).
        path: the local checkpoint file.

    Returns:
        The model's state-dict keys that were loaded, sorted.

    Raises:
        CheckpointError: the file is missing or unreadable, is not a SegFormer/MiT checkpoint, lacks a parameter the
            model needs, or holds a tensor whose shape does not fit (the message names it and the fix).
    """
    if not isinstance(model, Vivim):
        raise TypeError(f"load_mit_weights loads into a Vivim, got {type(model).__name__}")
    path = Path(path)
    source = _read_state_dict(path)
    target = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in source.items():
        for name, tensor in _map_key(key, value):
            if name is None:
                continue
            if name == "":
                unknown.append(key)
            else:
                mapped[name] = tensor
    if not mapped:
        raise CheckpointError(
            f"{path}: no SegFormer/MiT weights found (first keys: {', '.join(list(source)[:3])}). Pass a Hugging Face "
            "SegFormer checkpoint or an NVlabs/mmsegmentation MiT checkpoint."
        )
    if unknown:
        logger.info("%s: %d keys not used by Vivim, e.g. %s", path, len(unknown), unknown[:3])
    # a model built with stage_norms=False has no stage-final norms: the file's are then unused, not an error
    mapped = {
        k: v for k, v in mapped.items() if k in target or re.fullmatch(r"encoder\.mit\.\d+\.norm\.\w+", k) is None
    }
    needed = [k for k in target if k.startswith("encoder.mit.")]
    missing = [k for k in needed if k not in mapped]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} MiT parameters of the model are not in the file, e.g. {missing[:3]}. Build Vivim "
            "with the checkpoint's widths and depths (MiT-B3 defaults for SegFormer-B3)."
        )
    extra = sorted(k for k in mapped if k not in target)
    if extra:
        raise CheckpointError(
            f"{path}: the file has MiT weights the model lacks, e.g. {extra[:3]}. Build Vivim with the checkpoint's "
            "depths (MiT-B3: mit_depths=(3, 4, 18, 3))."
        )
    head = [k for k in target if k.startswith("decoder.") and not k.startswith("decoder.classifier.")]
    if any(k in mapped for k in head) and not all(k in mapped for k in head):
        raise CheckpointError(
            f"{path}: the file has only part of the SegFormer decode head; use a complete checkpoint."
        )
    for key, tensor in mapped.items():
        if tensor.shape != target[key].shape:
            hint = (
                " The pre-trained patch embedding takes 3-channel frames; build Vivim with in_channels=3."
                if key == "encoder.mit.0.patch_embed.proj.weight" and tensor.shape[1] != target[key].shape[1]
                else " Build Vivim with the checkpoint's widths (MiT-B3: features_per_stage=(64, 128, 320, 512), "
                "decoder_size=768)."
            )
            raise CheckpointError(
                f"{path}: {key} has shape {tuple(tensor.shape)} in the file but {tuple(target[key].shape)} in the "
                f"model.{hint}"
            )
    model.load_state_dict(mapped, strict=False)
    logger.info("%s: loaded %d tensors into Vivim", path, len(mapped))
    return sorted(mapped)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file. Give the path of a downloaded SegFormer/MiT checkpoint.")
    state: Any
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            # networks may not import engines.checkpoint; this is the same weights-only (no pickle code) load
            state = torch.load(path, map_location="cpu", weights_only=True)  # noqa: TID251
    except Exception as err:
        raise CheckpointError(
            f"{path}: cannot be read as a weights-only checkpoint ({type(err).__name__}: {err}). Save it as a plain "
            "state_dict or as .safetensors."
        ) from err
    for wrapper in ("state_dict", "model"):  # mmsegmentation / NVlabs wrap the weights
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state_dict of tensors. Save the model's state_dict().")
    return state


def _map_key(key: str, value: torch.Tensor) -> list[tuple[str | None, torch.Tensor]]:
    """Vivim names for one checkpoint entry: ``[(name, tensor)]``; name None = known but unused, "" = unknown."""
    stripped = key
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if stripped.startswith(prefix):
                stripped, changed = stripped[len(prefix) :], True
    for pattern, replacement in _KEY_RULES:
        if pattern.fullmatch(stripped) is None:
            continue
        if replacement is None:
            return [(None, value)]
        name = re.sub(r"<(\d)>", lambda m: str(int(m.group(1)) - 1), pattern.sub(replacement, stripped))
        if "<kv>" in name:  # fused key/value projection: the first half is the key
            k, v = value.chunk(2, dim=0)
            return [(name.replace("<kv>", "key"), k), (name.replace("<kv>", "value"), v)]
        return [(name, value)]
    return [("", value)]
