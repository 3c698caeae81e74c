"""Which of our networks a plan can configure, and the plans ``architecture`` block that names each.

A block is nnU-Net's (``plans-and-pipeline.md`` §2.8): ``network_class_name`` is a dotted path that nnunetv2's
``get_network_from_plans`` ``pydoc.locate``-s — here a class of ``medmamba.networks.nnunet``, the one file with
nnU-Net's constructor — and ``arch_kwargs`` keep nnU-Net's key names, extended by ours (``version``,
``input_size`` …), which ``networks.nnunet.from_nnunet_kwargs`` translates.

Two kinds of topology:

* ``"nnunet"`` (U-Mamba): stages, strides and kernels come from nnU-Net's ``get_pool_and_conv_props`` for the
  configuration's spacing and patch, exactly as for its conv U-Net; U-Mamba was built on those plans.
* ``"fixed"`` (SegMamba): the paper's network, whatever the spacing; only the patch (each side a multiple of the
  total stride) and the batch are planned.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import pydoc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from medmamba.errors import PlanError

__all__ = ["ARCHITECTURES", "Architecture", "architecture", "available_networks", "chosen", "configuration_name"]

_CONV = {2: "torch.nn.modules.conv.Conv2d", 3: "torch.nn.modules.conv.Conv3d"}


@dataclass(frozen=True, kw_only=True, slots=True)
class Architecture:
    """How a registered network enters a plan.

    Attributes:
        name: registry name (``medmamba.networks``), also the configuration suffix (``3d_fullres_<name>``).
        nnunet_class: dotted path of its nnU-Net-contract class.
        spatial_dims: the configurations it can have: 2 → ``2d_<name>``, 3 → ``3d_fullres_<name>``.
        topology: ``"nnunet"`` (planned like nnU-Net's U-Net) or ``"fixed"`` (the paper's stages).
        arch_kwargs: keyword arguments added to the block (``"nnunet"``) or the whole network's (``"fixed"``).
        input_size: the network is built for one patch size (``arch_kwargs["input_size"] = patch``).
        divisor: ``"fixed"`` topology: every patch side must be a multiple of it.
        reference: the paper, for the plans' readers.
    """

    name: str
    nnunet_class: str
    spatial_dims: tuple[int, ...]
    topology: Literal["nnunet", "fixed"]
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    input_size: bool = False
    divisor: int = 1
    reference: str = ""

    def available(self) -> bool:
        """True when the nnU-Net class can be imported (the plan would name a class that exists)."""
        return pydoc.locate(self.nnunet_class) is not None

    def with_kwargs(self, extra: Mapping[str, Any]) -> Architecture:
        """This entry with ``extra`` constructor arguments of the network in every block it makes.

        ``extra`` uses the canonical class's argument names (``medmamba.networks``, e.g. ``ssm_fp32``, ``d_state``);
        the memory model builds the network with them, so patch and batch are fitted to the network as it will train.

        Raises:
            PlanError: an argument the network does not take, or one the plan itself decides.
        """
        if not extra:
            return self
        from medmamba import networks

        params = set(inspect.signature(networks.spec(self.name).cls.__init__).parameters)
        planned = {"self", "spatial_dims", "in_channels", "out_channels", "deep_supervision", "input_size", "strides",
                   "kernel_sizes"}  # fmt: skip
        if self.topology == "nnunet":  # nnU-Net's planner decides the stages
            planned |= {"features_per_stage", "n_stages"}
        bad = sorted(k for k in extra if k not in params or k in planned)
        if bad:
            allowed = ", ".join(sorted(params - planned))
            raise PlanError(
                f"--network-kwargs: {self.name} does not take {', '.join(bad)} (or the plan sets it). A plan may set: "
                f"{allowed}"
            )
        return dataclasses.replace(self, arch_kwargs={**self.arch_kwargs, **extra})

    def block(self, spatial_dims: int, nnunet_block: Mapping[str, Any] | None, patch_size: Sequence[int]) -> dict:
        """The plans ``architecture`` block for a patch.

        Args:
            spatial_dims: 2 or 3.
            nnunet_block: for ``"nnunet"`` topology, the block nnU-Net's planner made for this patch (its
                stages, strides, kernels and features are kept; the class is replaced).
            patch_size: the configuration's patch size.
        """
        if self.topology == "nnunet":
            if nnunet_block is None:
                raise ValueError(f"{self.name}: an nnU-Net topology needs nnU-Net's block for the patch")
            kwargs = {**dict(nnunet_block["arch_kwargs"]), **dict(self.arch_kwargs)}
            required = list(nnunet_block["_kw_requires_import"])
        else:
            n = len(self.arch_kwargs["features_per_stage"])
            kwargs = {
                "conv_op": _CONV[spatial_dims],
                "n_stages": n,
                # nnU-Net's trainer derives its deep-supervision scales from these: full resolution, then /2 per stage
                "strides": [[1] * spatial_dims] + [[2] * spatial_dims] * n,
                **{k: list(v) if isinstance(v, tuple) else v for k, v in self.arch_kwargs.items()},
            }
            required = ["conv_op"]
        if self.input_size:
            kwargs["input_size"] = [int(p) for p in patch_size]
        return {"network_class_name": self.nnunet_class, "arch_kwargs": kwargs, "_kw_requires_import": required}


ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture(
            name="umamba_bot",
            nnunet_class="medmamba.networks.nnunet.UMambaBot",
            spatial_dims=(2, 3),
            topology="nnunet",
            arch_kwargs={"version": "2024.03"},
            reference="U-Mamba (Ma, Li, Wang, arXiv:2401.04722), U-Mamba_Bot",
        ),
        Architecture(
            name="umamba_enc",
            nnunet_class="medmamba.networks.nnunet.UMambaEnc",
            spatial_dims=(2, 3),
            topology="nnunet",
            arch_kwargs={"version": "2024.03"},
            input_size=True,
            reference="U-Mamba (Ma, Li, Wang, arXiv:2401.04722), U-Mamba_Enc",
        ),
        Architecture(
            name="segmamba",
            nnunet_class="medmamba.networks.nnunet.SegMamba",
            spatial_dims=(3,),
            topology="fixed",
            arch_kwargs={"features_per_stage": (48, 96, 192, 384), "depths": (2, 2, 2, 2), "hidden_size": 768},
            divisor=16,
            reference="SegMamba (Xing et al., MICCAI 2024, arXiv:2401.13560)",
        ),
    )
}


def architecture(name: str) -> Architecture:
    """The entry for ``name``; an unknown name raises ``PlanError`` with a did-you-mean."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        close = difflib.get_close_matches(name, ARCHITECTURES, n=1)
        hint = f"Did you mean {close[0]!r}? " if close else ""
        raise PlanError(
            f"--networks: {name!r} cannot be planned for nnU-Net segmentation. {hint}Choose from "
            f"{', '.join(sorted(ARCHITECTURES))} (Vivim and MambaMorph use presets: medmamba.plans.load_preset)"
        ) from None


def chosen(
    networks: Sequence[str], network_kwargs: Mapping[str, Mapping[str, Any]] | None = None
) -> tuple[Architecture, ...]:
    """The entries of ``networks``, once each and in order, with their ``network_kwargs`` (``with_kwargs``).

    Raises:
        PlanError: an unknown network, ``network_kwargs`` for a network not among ``networks``, or an argument the
            network does not take.
    """
    extra = dict(network_kwargs or {})
    unplanned = sorted(set(extra) - set(networks))
    if unplanned:
        raise PlanError(
            f"--network-kwargs names {', '.join(unplanned)}, which is not planned (--networks: {', '.join(networks)})"
        )
    return tuple(architecture(n).with_kwargs(extra.get(n, {})) for n in dict.fromkeys(networks))


def available_networks() -> list[str]:
    """Names whose nnU-Net class exists in this installation."""
    return sorted(name for name, a in ARCHITECTURES.items() if a.available())


def configuration_name(base: str, network: str) -> str:
    """``3d_fullres`` + ``umamba_bot`` → ``3d_fullres_umamba_bot``; ``2d`` → ``2d_umamba_bot``."""
    return f"{base}_{network}"
