"""``MedmambaPlanner``: nnU-Net's experiment planner, with patch and batch sized by a Mamba-aware memory model.

nnU-Net's ``ExperimentPlanner`` decides target spacing, transpose, normalisation, resampling and — for its conv
U-Net — topology, patch and batch (``plans-and-pipeline.md`` §2). We keep every one of those decisions and the
configurations they produce (``2d``, ``3d_fullres``, maybe ``3d_lowres``), then add one configuration per
network, e.g. ``3d_fullres_umamba_bot``, that ``inherits_from`` nnU-Net's (same preprocessed data) and overrides
``patch_size``, ``batch_size`` and ``architecture``.

The only step replaced is the memory estimate. nnU-Net's ``get_plans_for_configuration`` shrinks the patch while
``estimate / ref_bs · 2 > reference`` and then sets ``batch = round(reference / estimate · ref_bs)``. For our
networks, ``static_estimate_VRAM_usage`` returns ``1 / b`` with ``b`` the largest batch whose bytes
(:mod:`medmamba.plans.memory`) fit ``gpu_memory_target_in_gb``, and the planner's references are set to 1 (ref_bs
1): the loop then shrinks while ``b < 2`` and the batch it picks is ``b`` — before nnU-Net's own 5 %-of-dataset
cap and minimum of 2. Networks with a fixed topology (SegMamba) keep the paper's stages; only their patch
shrinks, in steps of their total stride, along the axis largest relative to the median image, as nnU-Net does.

Use it through :func:`medmamba.plans.plan_and_preprocess` (or nnunetv2's ``plan_experiment_dataset`` with this class
object; nnunetv2's ``-pl`` CLI cannot find planners outside its package).
"""

from __future__ import annotations

import json
import logging
import math
import pydoc
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from medmamba.errors import PlanError
from medmamba.io.atomic import write_json

from ._nnunet import stdout_to_log
from .architectures import Architecture, chosen, configuration_name
from .memory import CONTEXT_BYTES, MemoryEstimate, Precision, estimate

__all__ = ["DEFAULT_NETWORKS", "PLANS_NAME", "MedmambaPlanner"]

logger = logging.getLogger(__name__)

PLANS_NAME = "medmambaPlans"
DEFAULT_NETWORKS = ("umamba_bot", "umamba_enc", "segmamba")
#: nnU-Net's base configurations our networks inherit from, by spatial dims
_BASES = {3: "3d_fullres", 2: "2d"}
#: more estimates than this for one configuration means the patch cannot shrink to fit
_MAX_ESTIMATES = 200


class MedmambaPlanner(ExperimentPlanner):
    """nnU-Net's planner plus one memory-fitted configuration per Mamba network.

    Args:
        dataset_name_or_id: ``DatasetXXX_Name`` or its id, under ``nnUNet_raw`` (see ``plans._nnunet``).
        gpu_memory_target_in_gb: the GPU memory a training step may use, in GB (2**30 bytes), for our networks;
            nnU-Net's own configurations rescale their reference with it as nnU-Net does.
        preprocessor_name: nnU-Net preprocessor class name.
        plans_name: plans file name without ``.json``.
        overwrite_target_spacing: as nnU-Net's (3d_fullres only).
        suppress_transpose: as nnU-Net's.
        networks: registry names to plan (``plans.architectures.ARCHITECTURES``).
        precision: the training precision the memory model assumes (nnU-Net trains with autocast on CUDA).
        network_kwargs: per network name, constructor arguments added to its plans' ``arch_kwargs`` (e.g.
            ``{"segmamba": {"ssm_fp32": False}}``); the memory model fits patch and batch to the network built so.

    Attributes:
        estimates: configuration name → the :class:`MemoryEstimate` of its patch and batch (nnU-Net's
            configurations too, for comparison; their choice itself follows nnU-Net's proxy).
    """

    def __init__(
        self,
        dataset_name_or_id: str | int,
        gpu_memory_target_in_gb: float = 8,
        preprocessor_name: str = "DefaultPreprocessor",
        plans_name: str = PLANS_NAME,
        overwrite_target_spacing: Sequence[float] | None = None,
        suppress_transpose: bool = False,
        *,
        networks: Sequence[str] = DEFAULT_NETWORKS,
        precision: Precision = "bf16",
        network_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        planned = chosen(networks, network_kwargs)  # unknown names and arguments fail before any file is read
        super().__init__(
            dataset_name_or_id,
            gpu_memory_target_in_gb,
            preprocessor_name,
            plans_name,
            overwrite_target_spacing,
            suppress_transpose,
        )
        self.networks = planned
        if self.budget_bytes <= CONTEXT_BYTES:
            raise PlanError(
                f"{self.dataset_name}: {gpu_memory_target_in_gb:g} GB is less than a CUDA context alone "
                f"({CONTEXT_BYTES / 2**30:.2f} GB); no network fits it. Raise --gpu-memory-gb"
            )
        self.precision = precision
        self.estimates: dict[str, MemoryEstimate] = {}
        self._network: Architecture | None = None
        self._calls = 0
        self._cache: dict[str, MemoryEstimate] = {}

    @property
    def budget_bytes(self) -> float:
        """The memory target in bytes."""
        return float(self.UNet_vram_target_GB) * 2**30

    def plan_experiment(self) -> dict:
        """nnU-Net's configurations, then ours; writes the plans and returns them."""
        with stdout_to_log(logger):
            plans = super().plan_experiment()
        configurations = plans["configurations"]
        # nnU-Net's batch cap counts the dataset's voxels in 3D, for its 2D configuration too
        median = configurations.get("3d_fullres", configurations["2d"])["median_image_size_in_voxels"]
        n_vox = float(np.prod(median, dtype=np.float64) * self.dataset_json["numTraining"])
        for name in list(configurations):
            if "architecture" in configurations[name]:  # what our memory model says of nnU-Net's own choice
                config = configurations[name]
                self.estimates[name] = self._fit(
                    config["architecture"], config["patch_size"], self._num_inputs(), self._num_outputs()
                ).with_batch(config["batch_size"])
        for dims, base in _BASES.items():
            if base not in configurations:
                continue
            for network in self.networks:
                if dims in network.spatial_dims:
                    name = configuration_name(base, network.name)
                    configurations[name] = self._plan_network(network, base, configurations[base], n_vox)
        self.save_plans(plans)
        # what was written (tuples and numpy values become JSON types), so the caller sees exactly the file
        self.plans = json.loads((Path(self._preprocessed_folder()) / f"{self.plans_identifier}.json").read_text())
        return self.plans

    def save_plans(self, plans: dict) -> None:
        """Write the plans atomically, replacing the file.

        nnU-Net merges extra configurations of an existing file in, so stale ones would survive a re-plan.
        """
        from nnunetv2.utilities.json_export import recursive_fix_for_json_export

        recursive_fix_for_json_export(plans)
        folder = Path(self._preprocessed_folder())
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / f"{self.plans_identifier}.json", plans)

    def static_estimate_VRAM_usage(  # noqa: N802 - nnU-Net's name; an instance method here (it needs the budget)
        self,
        patch_size: Sequence[int],
        input_channels: int,
        output_channels: int,
        arch_class_name: str,
        arch_kwargs: dict,
        arch_kwargs_req_import: Sequence[str],
    ) -> float:
        """nnU-Net's proxy for its own networks; for ours ``1 / (largest batch that fits)`` (see module doc)."""
        if self._network is None:
            return ExperimentPlanner.static_estimate_VRAM_usage(
                patch_size, input_channels, output_channels, arch_class_name, arch_kwargs, arch_kwargs_req_import
            )
        block = self._network.block(
            len(patch_size), {"arch_kwargs": arch_kwargs, "_kw_requires_import": arch_kwargs_req_import}, patch_size
        )
        result = self._fit(block, patch_size, input_channels, output_channels)
        fit = result.max_batch_size(self.budget_bytes)
        self._calls += 1
        # nnU-Net's loop has no floor: stop it before the patch degenerates
        if fit < self.UNet_min_batch_size and (
            max(patch_size) <= 2 * self.UNet_featuremap_min_edge_length or self._calls > _MAX_ESTIMATES
        ):
            raise self._too_small(self._network, patch_size, result)
        return 1.0 / fit if fit > 0 else math.inf

    # ------------------------------------------------------------------ per network

    def _plan_network(self, network: Architecture, base: str, parent: dict, n_vox: float) -> dict:
        spacing = np.asarray(parent["spacing"], dtype=float)
        median = np.asarray(parent["median_image_size_in_voxels"], dtype=float)
        self._calls = 0
        with self._planning(network):
            if network.topology == "nnunet":
                config = self.get_plans_for_configuration(spacing, median, parent["data_identifier"], n_vox, {})
                patch, batch = [int(p) for p in config["patch_size"]], int(config["batch_size"])
                block = network.block(len(patch), config["architecture"], patch)
            else:
                patch, batch, block = self._plan_fixed(network, spacing, median, n_vox)
        name = configuration_name(base, network.name)
        self.estimates[name] = self._fit(block, patch, self._num_inputs(), self._num_outputs()).with_batch(batch)
        logger.info(
            "%s: patch %s, batch %d, %.2f of %.2f GB", name, patch, batch,
            self.estimates[name].device_bytes / 2**30, self.UNet_vram_target_GB,
        )  # fmt: skip
        return {"inherits_from": base, "patch_size": patch, "batch_size": batch, "architecture": block}

    def _plan_fixed(
        self, network: Architecture, spacing: np.ndarray, median: np.ndarray, n_vox: float
    ) -> tuple[list[int], int, dict]:
        """Patch and batch for a fixed-topology network: shrink the patch by the divisor until batch 2 fits."""
        d = network.divisor
        # nnU-Net's starting point: the spacing's aspect ratio at the volume of 256³ (2048²), clipped to the median
        # image — here rounded up to the divisor grid, so a small image is covered by one patch
        inverse = 1 / spacing
        volume = 256.0 ** len(spacing) if len(spacing) == 3 else 2048.0**2
        start = inverse * (volume / np.prod(inverse)) ** (1 / len(spacing))
        patch = [max(d, math.ceil(min(p, m) / d) * d) for p, m in zip(start, median, strict=True)]
        while True:
            block = network.block(len(patch), None, patch)
            result = self._fit(block, patch, self._num_inputs(), self._num_outputs())
            fit = result.max_batch_size(self.budget_bytes)
            if fit >= self.UNet_min_batch_size:
                break
            shrinkable = [i for i, p in enumerate(patch) if p > d]
            if not shrinkable:
                raise self._too_small(network, patch, result)
            axis = max(shrinkable, key=lambda i: patch[i] / median[i])
            patch[axis] -= d
        cap = round(n_vox * self.max_dataset_covered / np.prod(patch, dtype=np.float64))
        return patch, max(min(fit, cap), self.UNet_min_batch_size), block

    def _fit(self, block: dict, patch: Sequence[int], in_channels: int, out_channels: int) -> MemoryEstimate:
        """The memory estimate of the network a plans block describes, built as nnU-Net's trainer builds it."""
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

        key = json.dumps([block, list(patch), in_channels, out_channels], sort_keys=True, default=str)
        if key in self._cache:
            return self._cache[key]
        factory = partial(
            get_network_from_plans,
            block["network_class_name"],
            block["arch_kwargs"],
            block["_kw_requires_import"],
            in_channels,
            out_channels,
            allow_init=False,
            deep_supervision=True,
        )
        try:
            result = estimate(factory, patch, 1, in_channels=in_channels, precision=self.precision)
        except (ValueError, TypeError, ImportError) as err:
            name = self._network.name if self._network else block["network_class_name"]
            raise PlanError(
                f"{name}: cannot build the network for patch {list(patch)} from its plans block ({err})"
            ) from err
        self._cache[key] = result
        return result

    def _too_small(self, network: Architecture | None, patch: Sequence[int], result: MemoryEstimate) -> PlanError:
        need = result.with_batch(self.UNet_min_batch_size).device_bytes / 2**30
        return PlanError(
            f"{self.dataset_name}: {network.name if network else 'network'} does not fit "
            f"{self.UNet_vram_target_GB:g} GB at batch {self.UNet_min_batch_size} even with a small patch "
            f"({list(patch)} needs {need:.1f} GB). Raise --gpu-memory-gb or leave this network out (--networks)"
        )

    @contextmanager
    def _planning(self, network: Architecture) -> Iterator[None]:
        """nnU-Net's planner attributes set for ``network``: its class, and references of 1 (see module doc)."""
        names = ("UNet_class", "UNet_reference_val_3d", "UNet_reference_val_2d", "UNet_reference_val_corresp_GB",
                 "UNet_reference_val_corresp_bs_2d", "UNet_reference_val_corresp_bs_3d")  # fmt: skip
        saved = {n: getattr(self, n) for n in names}
        if network.topology == "nnunet":
            located = pydoc.locate(network.nnunet_class)
            if not isinstance(located, type):
                raise PlanError(
                    f"{network.name}: {network.nnunet_class} cannot be imported in this installation. "
                    "Update medmamba or leave this network out (--networks)"
                )
            self.UNet_class = located
        self.UNet_reference_val_3d = self.UNet_reference_val_2d = 1.0
        self.UNet_reference_val_corresp_GB = self.UNet_vram_target_GB
        self.UNet_reference_val_corresp_bs_2d = self.UNet_reference_val_corresp_bs_3d = 1
        self._network = network
        try:
            yield
        finally:
            self._network = None
            for n, value in saved.items():
                setattr(self, n, value)

    def _num_inputs(self) -> int:
        return len(self.dataset_json.get("channel_names") or self.dataset_json["modality"])

    def _num_outputs(self) -> int:
        """Segmentation heads as nnU-Net's trainer builds them (labels, or regions; the ignore label has none)."""
        from nnunetv2.utilities.label_handling.label_handling import LabelManager

        labels = LabelManager(self.dataset_json["labels"], self.dataset_json.get("regions_class_order"))
        return labels.num_segmentation_heads

    def _preprocessed_folder(self) -> str:
        from nnunetv2.paths import nnUNet_preprocessed

        return str(Path(nnUNet_preprocessed) / self.dataset_name)
