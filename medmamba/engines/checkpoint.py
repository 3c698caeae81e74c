"""Checkpoints: written atomically, read with ``torch.load(weights_only=True)`` only.

This is the one module that calls ``torch.load`` (ruff bans it elsewhere). nnU-Net's trainer and predictor load
their checkpoints with ``weights_only=False``, which unpickles arbitrary objects; medmamba's checkpoints hold
only tensors and plain Python values (numpy scalars converted on save), so the safe loader always suffices and a
file that needs the unsafe one is refused with a message.

A checkpoint is a dict with at least ``format``, ``network`` (registry name), ``in_channels``, ``out_channels`` and
``network_weights`` (a state_dict); trainers add their own keys (optimizer state, epoch, logs, recipe …). The
nnU-Net keys (``init_args``, ``trainer_name``, ``inference_allowed_mirroring_axes``) are kept so nnunetv2's own
tools can still read the folder.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medmamba.errors import CheckpointError
from medmamba.io.atomic import atomic_write

__all__ = ["FORMAT", "check_checkpoint", "load_checkpoint", "load_weights", "save_checkpoint", "to_plain"]

#: value of the ``format`` key; bump the suffix when the layout changes incompatibly
FORMAT = "medmamba-checkpoint/1"
_REQUIRED = ("network", "in_channels", "out_channels", "network_weights")


def save_checkpoint(path: str | os.PathLike[str], checkpoint: Mapping[str, Any]) -> Path:
    """Write ``checkpoint`` to ``path`` atomically (temporary name, fsync, rename); returns the path.

    Values are converted to what ``torch.load(weights_only=True)`` accepts (:func:`to_plain`): tensors are moved
    to the CPU, numpy scalars and arrays become Python numbers and lists, devices and paths become strings.

    Args:
        path: target file (``.pth``); its folder must exist.
        checkpoint: must hold ``network``, ``in_channels``, ``out_channels`` and ``network_weights``.

    Raises:
        ValueError: a required key is missing (a bug in the caller, not a user error).
        TypeError: a value that has no weights-only representation.
    """
    missing = [key for key in _REQUIRED if key not in checkpoint]
    if missing:
        raise ValueError(f"a checkpoint needs the keys {', '.join(_REQUIRED)}; missing {', '.join(missing)}")
    payload = to_plain({**checkpoint, "format": FORMAT})
    path = Path(path)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    network: str | None = None,
    in_channels: int | None = None,
    out_channels: int | None = None,
) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and check what it holds.

    Args:
        path: the ``.pth`` file.
        map_location: where tensors land.
        network: expected registry name (``"umamba_bot"`` …), or None to accept any.
        in_channels: expected image channels, or None.
        out_channels: expected output channels (classes incl. background), or None.

    Raises:
        CheckpointError: missing or damaged file, not weights-only loadable, not a medmamba checkpoint, or a
            network/channel count other than the expected one. The message names the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint. Check the path (or train the model first)")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)  # noqa: TID251 - the one place
    except Exception as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"{path}: cannot be loaded with torch.load(weights_only=True) - it pickles Python objects (nnU-Net's "
                "own trainer writes such files). Use a checkpoint written by medmamba, or retrain with `medmamba train`"
            ) from None
        raise CheckpointError(
            f"{path}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0][:200]}); the file is "
            "truncated or not a torch file. Use another checkpoint (checkpoint_best.pth, checkpoint_latest.pth)"
        ) from None
    check_checkpoint(checkpoint, path, network=network, in_channels=in_channels, out_channels=out_channels)
    return checkpoint


def check_checkpoint(
    checkpoint: Any,
    path: str | os.PathLike[str],
    *,
    network: str | None = None,
    in_channels: int | None = None,
    out_channels: int | None = None,
) -> None:
    """Check that ``checkpoint`` (read from ``path``) is a medmamba checkpoint of the expected network and channels.

    Raises:
        CheckpointError: what :func:`load_checkpoint` raises after reading.
    """
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in _REQUIRED):
        raise CheckpointError(
            f"{path}: not a medmamba checkpoint (it needs the keys {', '.join(_REQUIRED)}). Use a checkpoint written "
            "by `medmamba train`"
        )
    if network is not None and checkpoint["network"] != network:
        raise CheckpointError(
            f"{path}: holds a {checkpoint['network']!r} network, not {network!r}. Use a checkpoint of {network!r}, or "
            f"select network {checkpoint['network']!r}"
        )
    for what, expected in (("in_channels", in_channels), ("out_channels", out_channels)):
        if expected is not None and int(checkpoint[what]) != int(expected):
            noun = "image channels" if what == "in_channels" else "output channels (classes incl. background)"
            raise CheckpointError(
                f"{path}: was trained with {checkpoint[what]} {noun}, but {expected} are expected here. Use a "
                "checkpoint trained on this dataset's channels and labels"
            )


def load_weights(module: nn.Module, state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """``module.load_state_dict(state_dict)`` (strict); a mismatch is a ``CheckpointError`` naming ``path``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if tuple(own[k].shape) != tuple(state_dict[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {name} ({', '.join(keys[:3])}{', …' if len(keys) > 3 else ''})")
        raise CheckpointError(
            f"{path}: its weights do not fit this network: parameters {'; '.join(parts)}. The checkpoint was trained "
            "with other plans or another architecture; use the model folder it came from"
        )
    module.load_state_dict(state_dict)


def to_plain(value: Any) -> Any:
    """``value`` with everything but tensors turned into plain Python (what weights-only unpickling accepts).

    Tensors go to the CPU; numpy scalars → Python numbers, arrays → lists; ``torch.device``, paths and enums →
    strings; tuples stay tuples, mappings become dicts.

    Raises:
        TypeError: an object with no plain representation.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.generic):  # before float: np.float64 subclasses float but pickles as numpy
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {to_plain(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(to_plain(v) for v in value)
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    if isinstance(value, (torch.device, os.PathLike)):
        return str(value)
    if isinstance(value, enum.Enum):
        return to_plain(value.value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"cannot store a {type(value).__name__} in a weights-only checkpoint: {value!r:.80}")
