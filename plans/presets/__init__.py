"""Plan presets: the papers' set-ups, one JSON file each, loadable by name.

``load_preset("segmamba_brats")`` → a frozen :class:`Preset` (network, channels, patch, batch, spacing,
normalisation, precision, constructor arguments); ``list_presets()`` names them. The JSON holds data only; a
preset is checked on load (known keys, the network registered for the task, patch sides the network accepts).

Presets:

* ``segmamba_brats`` — SegMamba, BraTS-style 4 channels, 128³, batch 2 (arXiv:2401.13560).
* ``umamba_bot_3d``, ``umamba_enc_3d`` — U-Mamba 3D, abdominal CT, 48×192×192, batch 2 (arXiv:2401.04722).
* ``umamba_bot_2d``, ``umamba_enc_2d`` — U-Mamba 2D, abdominal MR, 320², batch 12.
* ``mambamorph`` — MambaMorph, MR→CT brain pairs, 176×208×192, batch 1 (arXiv:2401.13934).
* ``vivim`` — Vivim, 5-frame clips of 256² RGB, batch 8 (arXiv:2401.14168).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

from medmamba.errors import PlanError

__all__ = ["Preset", "list_presets", "load_preset"]

#: each patch side must be a multiple of this, per network (the total stride the network needs)
_DIVISORS = {"segmamba": 16, "mambamorph": 16}


@dataclass(frozen=True, kw_only=True, slots=True)
class Preset:
    """A paper's training set-up.

    Attributes:
        name: the preset's name (its file name without ``.json``).
        network: registry name (``medmamba.networks``).
        task: ``"segmentation"``, ``"registration"`` or ``"video"``; must match the network's.
        description: one sentence. reference: the paper and the code it follows.
        in_channels: image channels (registration: per image). out_channels: classes, or 3 displacement components.
        channel_names: one name per channel, nnU-Net's ``channel_names`` (the name picks the normalisation).
        patch_size: spatial input size (video: per frame ``(H, W)``).
        batch_size: samples per step.
        spacing: target voxel spacing in mm in array-axis order, or None when the dataset's plan decides.
        normalization: ``"zscore"``, ``"ct"``, ``"minmax"`` or ``"imagenet"``.
        precision: training precision of the paper's code.
        network_kwargs: constructor arguments besides dims and channels.
        frames: clip length for video, else None.
    """

    name: str
    network: str
    task: Literal["segmentation", "registration", "video"]
    description: str
    reference: str
    in_channels: int
    out_channels: int
    channel_names: tuple[str, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    spacing: tuple[float, ...] | None = None
    normalization: Literal["zscore", "ct", "minmax", "imagenet"] = "zscore"
    precision: Literal["fp16", "bf16", "fp32"] = "fp16"
    network_kwargs: dict[str, Any] = field(default_factory=dict)
    frames: int | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<preset>") -> Preset:
        """Build and check a preset; unknown or missing keys and wrong values raise ``PlanError`` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise PlanError(f"{source}: unknown key(s) {', '.join(unknown)}. Valid keys: {', '.join(sorted(known))}")
        try:
            preset = cls(
                **{
                    **data,
                    "channel_names": tuple(data["channel_names"]),
                    "patch_size": tuple(int(p) for p in data["patch_size"]),
                    "spacing": None if data.get("spacing") is None else tuple(float(s) for s in data["spacing"]),
                    "network_kwargs": dict(data.get("network_kwargs") or {}),
                }
            )
        except (KeyError, TypeError, ValueError) as err:
            raise PlanError(f"{source}: {err}. A preset needs {', '.join(sorted(known))}") from err
        preset._check(source)
        return preset

    def _check(self, source: str) -> None:
        dims = 2 if self.task == "video" else None
        if len(self.channel_names) != self.in_channels and self.task != "registration":
            raise PlanError(f"{source}: {len(self.channel_names)} channel_names for in_channels={self.in_channels}")
        if min(self.patch_size) < 1 or self.batch_size < 1:
            raise PlanError(f"{source}: patch_size and batch_size must be positive")
        if self.spacing is not None and len(self.spacing) != len(self.patch_size):
            raise PlanError(f"{source}: spacing {self.spacing} and patch_size {self.patch_size} differ in length")
        if (self.task == "video") != (self.frames is not None):
            raise PlanError(f"{source}: frames is required for video presets and only for them")
        divisor = _DIVISORS.get(self.network, 1)
        if any(p % divisor for p in self.patch_size):
            raise PlanError(f"{source}: every side of patch_size {self.patch_size} must be a multiple of {divisor}")
        if dims is not None and len(self.patch_size) != dims:
            raise PlanError(f"{source}: a video preset's patch_size is (H, W), got {self.patch_size}")

    @property
    def spatial_dims(self) -> int:
        """2 or 3 (video: 2, the frames' dims)."""
        return len(self.patch_size)

    @property
    def input_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Shapes of one batch's ``forward`` arguments.

        ``(B, C, *patch)``; registration: twice (moving, fixed); video: ``(B, T, C, H, W)``.
        """
        if self.frames is not None:
            return ((self.batch_size, self.frames, self.in_channels, *self.patch_size),)
        shape = (self.batch_size, self.in_channels, *self.patch_size)
        return (shape, shape) if self.task == "registration" else (shape,)

    @property
    def voxels_per_batch(self) -> int:
        """Voxels (pixels × frames) of one batch, per channel."""
        return self.batch_size * (self.frames or 1) * math.prod(self.patch_size)

    def build_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``medmamba.networks.build(self.network, **kwargs)``."""
        return {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            **self.network_kwargs,
        }

    def to_dict(self) -> dict[str, Any]:
        """The JSON object this preset loads from."""
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}


def list_presets() -> list[str]:
    """Names of the shipped presets, sorted."""
    return sorted(p.name[: -len(".json")] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name raises ``PlanError`` with a did-you-mean."""
    names = list_presets()
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise PlanError(f"preset {name!r} not found. {hint}Known presets: {', '.join(names)}")
    source = resources.files(__name__) / f"{name}.json"
    preset = Preset.from_dict(json.loads(source.read_text(encoding="utf-8")), source=str(source))
    if preset.name != name:
        raise PlanError(f"{source}: its name is {preset.name!r}; rename the file or the preset")
    return preset
