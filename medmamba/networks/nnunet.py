"""nnU-Net's network contract: the segmentation networks with nnU-Net's constructor, for plans' ``architecture``.

nnunetv2's ``get_network_from_plans`` calls ``cls(input_channels=…, num_classes=…, deep_supervision=…,
**arch_kwargs)`` on the class a plans file names (``"network_class_name": "medmamba.networks.nnunet.UMambaBot"``),
after ``pydoc.locate``-ing the keys listed in ``_kw_requires_import`` (``plans-and-pipeline.md`` §2.9-2.10). The
classes here translate those keyword arguments with :func:`from_nnunet_kwargs` — the one place where nnU-Net's
vocabulary (``conv_op``, ``norm_op``, ``nonlin``, ``n_conv_per_stage`` …) meets ours — and call the canonical
``__init__``. They always build the deep-supervision heads, so their state_dict equals the canonical class's built
with ``deep_supervision=True``: nnU-Net trains with the heads, then rebuilds with deep supervision off and loads
the same state_dict strictly.

Example ``architecture`` block (arch_kwargs keep nnU-Net's key names, so stock ResEnc plans can point here)::

    {"network_class_name": "medmamba.networks.nnunet.UMambaBot",
     "arch_kwargs": {"n_stages": 4, "features_per_stage": [32, 64, 128, 256],
                     "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3], …],
                     "strides": [[1, 1, 1], [2, 2, 2], …], "n_conv_per_stage": [2, 2, 2, 2],
                     "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": true,
                     "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                     "norm_op_kwargs": {"eps": 1e-05, "affine": true}, "dropout_op": null,
                     "dropout_op_kwargs": null, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": true},
                     "version": "2024.03"},
     "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
"""

from __future__ import annotations

import inspect
import logging
import pydoc
from collections.abc import Mapping
from typing import Any

from monai.networks.layers.factories import Act
from torch import nn

from . import segmamba, umamba

__all__ = ["SegMamba", "UMambaBot", "UMambaEnc", "from_nnunet_kwargs"]

logger = logging.getLogger(__name__)


class UMambaBot(umamba.UMambaBot):
    """:class:`medmamba.networks.umamba.UMambaBot` with nnU-Net's constructor (for plans' ``architecture`` block).

    Args:
        input_channels: image channels (nnU-Net's name for ``in_channels``).
        num_classes: segmentation heads, background included (``out_channels``).
        deep_supervision: what ``forward`` returns (``decoder.deep_supervision``); the heads are always built.
        **arch_kwargs: the plans' ``arch_kwargs``, translated by :func:`from_nnunet_kwargs`.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs: Any):
        kwargs = from_nnunet_kwargs(arch_kwargs, target=umamba.UMambaBot)
        super().__init__(kwargs.pop("spatial_dims"), input_channels, num_classes, deep_supervision=True, **kwargs)
        self.decoder.deep_supervision = deep_supervision  # the run-time switch nnU-Net's trainer flips


class UMambaEnc(umamba.UMambaEnc):
    """:class:`medmamba.networks.umamba.UMambaEnc` with nnU-Net's constructor (for plans' ``architecture`` block).

    ``arch_kwargs`` must carry ``input_size`` (the configuration's patch size) for ``version="2024.03"``, as
    upstream's ``get_umamba_enc_3d_from_plans`` passes ``patch_size``; ``patch_size`` is accepted as its alias.

    Args:
        input_channels: image channels. num_classes: segmentation heads, background included.
        deep_supervision: what ``forward`` returns; the heads are always built.
        **arch_kwargs: the plans' ``arch_kwargs``, translated by :func:`from_nnunet_kwargs`.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs: Any):
        kwargs = from_nnunet_kwargs(arch_kwargs, target=umamba.UMambaEnc)
        super().__init__(kwargs.pop("spatial_dims"), input_channels, num_classes, deep_supervision=True, **kwargs)
        self.decoder.deep_supervision = deep_supervision


class SegMamba(segmamba.SegMamba):
    """:class:`medmamba.networks.segmamba.SegMamba` with nnU-Net's constructor (for plans' ``architecture`` block).

    SegMamba's stages are fixed (stem /2, then /2 per stage), so ``arch_kwargs["strides"]`` — which nnU-Net's
    trainer reads for its deep-supervision scales — is checked against the network's own ``strides`` rather than
    used; ``features_per_stage``, ``depths``, ``hidden_size`` and the Mamba settings pass through.

    Args:
        input_channels: image channels. num_classes: segmentation heads, background included.
        deep_supervision: what ``forward`` returns; the auxiliary heads are always built.
        **arch_kwargs: the plans' ``arch_kwargs``, translated by :func:`from_nnunet_kwargs`.

    Raises:
        ValueError: the plans' ``strides`` differ from the network's.
    """

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False, **arch_kwargs: Any):
        strides = arch_kwargs.pop("strides", None)
        kwargs = from_nnunet_kwargs(arch_kwargs, target=segmamba.SegMamba)
        super().__init__(kwargs.pop("spatial_dims"), input_channels, num_classes, deep_supervision=True, **kwargs)
        if strides is not None and [[int(i) for i in s] for s in strides] != [list(s) for s in self.strides]:
            raise ValueError(
                f"arch_kwargs: strides {strides} disagree with SegMamba's fixed {[list(s) for s in self.strides]} "
                "(full resolution, then one halving per stage); write the network's strides into the plans"
            )
        self.decoder.deep_supervision = deep_supervision


#: nnU-Net key → our keyword (values pass through unchanged)
_RENAMED = {
    "n_blocks_per_stage": "blocks_per_stage",
    "n_conv_per_stage": "blocks_per_stage",
    "n_conv_per_stage_decoder": "blocks_per_stage_decoder",
    "patch_size": "input_size",
}
#: nnU-Net keys consumed by the translation itself
_TRANSLATED = {"conv_op", "norm_op", "norm_op_kwargs", "nonlin", "nonlin_kwargs", "n_stages", "dropout_op",
               "dropout_op_kwargs"}  # fmt: skip
#: nnU-Net keys of dynamic_network_architectures' nets that U-Mamba has no use for (upstream ignores them too)
_IGNORED = {"stem_channels", "block", "bottleneck_channels", "pool_type", "nonlin_first"}


def from_nnunet_kwargs(arch_kwargs: Mapping[str, Any], *, target: type[nn.Module]) -> dict[str, Any]:
    """Translate a plans' ``arch_kwargs`` into keyword arguments of the canonical class ``target``.

    ``conv_op`` → ``spatial_dims``; ``n_blocks_per_stage``/``n_conv_per_stage`` → ``blocks_per_stage``;
    ``n_conv_per_stage_decoder`` → ``blocks_per_stage_decoder``; ``norm_op`` (+``_kwargs``) → ``norm``;
    ``nonlin`` (+``_kwargs``) → ``act``; ``n_stages`` is checked against ``len(features_per_stage)``; the class
    arguments may be classes (after nnU-Net's ``pydoc.locate``) or dotted names. Keys that ``target`` takes
    (``strides``, ``kernel_sizes``, ``features_per_stage``, ``conv_bias``, ``version``, ``d_state`` …) pass through.
    Unknown keys are tolerated, as nnU-Net tolerates them, and logged at WARNING by name; so is a dropout op
    (U-Mamba has no dropout).

    Returns:
        keyword arguments including ``spatial_dims`` (the caller passes it positionally).

    Raises:
        ValueError: a missing ``conv_op``, a conv/norm/nonlinearity we cannot map, or ``n_stages`` disagreeing
            with ``features_per_stage``.
    """
    params = set(inspect.signature(target.__init__).parameters) - {"self", "spatial_dims", "in_channels",
                                                                     "out_channels", "deep_supervision"}  # fmt: skip
    if "conv_op" not in arch_kwargs:
        raise ValueError(f"arch_kwargs for {target.__name__} need conv_op (e.g. 'torch.nn.modules.conv.Conv3d')")
    out: dict[str, Any] = {"spatial_dims": _spatial_dims(arch_kwargs["conv_op"])}
    for op, name, translate in (("norm_op", "norm", _norm_name), ("nonlin", "act", _act_name)):
        if arch_kwargs.get(op) is None:
            continue
        if name in params:
            out[name] = (translate(arch_kwargs[op]), dict(arch_kwargs.get(f"{op}_kwargs") or {}))
        else:
            logger.warning("%s has a fixed %s; ignoring %s=%r", target.__name__, name, op, arch_kwargs[op])
    if arch_kwargs.get("dropout_op") is not None:
        logger.warning("%s has no dropout; ignoring dropout_op=%r", target.__name__, arch_kwargs["dropout_op"])
    unknown = []
    for key, value in arch_kwargs.items():
        name = _RENAMED.get(key, key)
        if name in params:
            out[name] = value
        elif key not in _TRANSLATED and key not in _IGNORED:
            unknown.append(key)
    if unknown:
        logger.warning("%s ignores unknown arch_kwargs %s", target.__name__, sorted(unknown))
    n_stages = arch_kwargs.get("n_stages")
    if n_stages is not None and "features_per_stage" in out and int(n_stages) != len(out["features_per_stage"]):
        raise ValueError(
            f"arch_kwargs: n_stages={n_stages} but features_per_stage has {len(out['features_per_stage'])} entries"
        )
    return out


def _resolve(op: Any) -> Any:
    """A class, or the class a dotted name points to (what nnU-Net's ``pydoc.locate`` would give)."""
    if isinstance(op, str):
        located = pydoc.locate(op)
        if located is None:
            raise ValueError(f"arch_kwargs: cannot import {op!r}")
        return located
    return op


def _spatial_dims(conv_op: Any) -> int:
    name = getattr(_resolve(conv_op), "__name__", str(conv_op))
    dims = {"Conv2d": 2, "Conv3d": 3}.get(name)
    if dims is None:
        raise ValueError(f"arch_kwargs: conv_op must be torch.nn.Conv2d or Conv3d, got {conv_op!r}")
    return dims


def _norm_name(norm_op: Any) -> str:
    name = getattr(_resolve(norm_op), "__name__", str(norm_op))
    for prefix, monai_name in (("InstanceNorm", "instance"), ("BatchNorm", "batch")):
        if name.startswith(prefix):
            return monai_name
    raise ValueError(f"arch_kwargs: norm_op must be an InstanceNorm or BatchNorm class, got {norm_op!r}")


def _act_name(nonlin: Any) -> str:
    cls = _resolve(nonlin)
    name = getattr(cls, "__name__", "").lower()  # torch.nn.LeakyReLU → MONAI's "leakyrelu"
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or name.upper() not in Act.names:
        raise ValueError(f"arch_kwargs: nonlin must be a torch.nn activation MONAI knows, got {nonlin!r}")
    return name
