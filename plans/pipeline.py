"""``plan_and_preprocess``: verify → fingerprint → plan → preprocess, the whole of ``medmamba plan-and-preprocess``.

Data flow (style.md §3.3): ``io.datasets.open_dataset`` → ``io.verify.verify_dataset`` (any problem raises
``DatasetError`` before anything is written) → ``plans.fingerprint`` → ``MedmambaPlanner`` → ``medmambaPlans.json``
(nnU-Net format) → ``plans.preprocess`` (cases already done are skipped).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmamba.errors import DatasetError, PlanError, Problem

from .architectures import architecture, available_networks, chosen
from .fingerprint import NNUNET_FOREGROUND_SAMPLES
from .memory import MemoryEstimate, Precision

__all__ = ["PlanResult", "plan_and_preprocess"]

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^Dataset\d{3}_.+$")


@dataclass(frozen=True, slots=True)
class PlanResult:
    """What ``plan_and_preprocess`` produced.

    Attributes:
        plans_file: the plans JSON (nnU-Net format).
        plans: its content.
        estimates: configuration name → memory estimate of its patch and batch (our networks only).
        preprocessed: one entry per data folder written or brought up to date.
    """

    plans_file: Path
    plans: dict[str, Any]
    estimates: dict[str, MemoryEstimate] = field(default_factory=dict)
    preprocessed: tuple[Any, ...] = ()

    def summary(self) -> list[dict[str, Any]]:
        """One row per configuration: name, network class, patch, batch and (ours) estimated GPU GB."""
        rows = []
        for name, config in self.plans["configurations"].items():
            resolved = {**self.plans["configurations"].get(config.get("inherits_from", ""), {}), **config}
            if "patch_size" not in resolved:
                continue
            estimate = self.estimates.get(name)
            rows.append(
                {
                    "configuration": name,
                    "network": resolved["architecture"]["network_class_name"],
                    "patch_size": list(resolved["patch_size"]),
                    "batch_size": resolved["batch_size"],
                    "gpu_memory_gb": round(estimate.device_bytes / 2**30, 2) if estimate else None,
                }
            )
        return rows


def plan_and_preprocess(
    dataset: str | int | os.PathLike[str],
    preprocessed_root: str | os.PathLike[str],
    *,
    raw_root: str | os.PathLike[str] | None = None,
    networks: Sequence[str] | None = None,
    gpu_memory_gb: float = 8.0,
    configurations: Sequence[str] = ("2d", "3d_fullres"),
    num_workers: int | None = None,
    verify: bool = True,
    precision: Precision = "bf16",
    overwrite_fingerprint: bool = False,
    preprocess: bool = True,
    foreground_samples: float = NNUNET_FOREGROUND_SAMPLES,
    network_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> PlanResult:
    """Check, fingerprint, plan and preprocess an nnU-Net raw dataset for nnU-Net's U-Net and our networks.

    Args:
        dataset: the dataset folder, ``DatasetXXX_Name`` or id ``XXX`` (looked up under ``raw_root``).
        preprocessed_root: receives ``DatasetXXX_Name/`` with the fingerprint, ``medmambaPlans.json`` and the data.
        raw_root: the folder of raw datasets (for names and ids).
        networks: our networks to plan (``plans.architectures``); each gets ``3d_fullres_<name>`` and, if 2D-capable,
            ``2d_<name>``. ``None``: every network whose nnU-Net class this installation has.
        gpu_memory_gb: GPU memory (GB = 2**30 bytes) a training step may use; patch and batch are fitted to it.
        configurations: nnU-Net configurations to preprocess (ours share their data).
        num_workers: worker processes for reading cases; ``None`` follows cores, RAM and the data's size.
        verify: check the dataset first (``medmamba verify``); problems raise before anything is written.
        precision: training precision assumed by the memory model.
        overwrite_fingerprint: recompute the fingerprint even if the raw data are unchanged.
        preprocess: also preprocess (False: plan only).
        foreground_samples: see ``plans.fingerprint.extract_fingerprint``.
        network_kwargs: per network, constructor arguments for its plans (``MedmambaPlanner``'s), e.g.
            ``{"segmamba": {"ssm_fp32": False}}``.

    Raises:
        DatasetError: the dataset is missing, malformed or fails verification (nothing written).
        PlanError: an unknown network, a budget no network patch fits, or a non-positive budget.
    """
    from medmamba.io.datasets.nnunet_raw import open_dataset
    from medmamba.io.verify import verify_dataset

    if not gpu_memory_gb > 0:
        raise PlanError(f"--gpu-memory-gb must be positive, got {gpu_memory_gb}. Give the GPU's memory in GB")
    if networks is None:
        networks = available_networks()
    for name in networks:
        if not architecture(name).available():
            raise PlanError(
                f"--networks: {name} has no nnU-Net class ({architecture(name).nnunet_class}) in this installation. "
                f"Choose from {', '.join(available_networks())}"
            )
    chosen(networks, network_kwargs)  # wrong network arguments fail before anything is written
    raw = open_dataset(dataset, raw_root)
    if not _NAME.match(raw.root.name):
        raise DatasetError(
            [
                Problem(
                    str(raw.root),
                    "is not named DatasetXXX_Name",
                    "Rename it, e.g. Dataset001_Brain (nnU-Net needs the id)",
                )
            ]
        )
    if verify:
        verify_dataset(raw, num_workers=num_workers or 1)

    from ._nnunet import nnunet_folders, stdout_to_log
    from .fingerprint import extract_fingerprint
    from .planner import MedmambaPlanner
    from .preprocess import preprocess as run_preprocess

    output = Path(preprocessed_root) / raw.root.name
    with nnunet_folders(raw.root.parent, preprocessed_root), stdout_to_log(logger):
        extract_fingerprint(
            raw, output, num_workers=num_workers, overwrite=overwrite_fingerprint, foreground_samples=foreground_samples
        )
        planner = MedmambaPlanner(
            raw.root.name, gpu_memory_gb, networks=networks, precision=precision, network_kwargs=network_kwargs
        )
        plans = planner.plan_experiment()
        plans_file = output / f"{planner.plans_identifier}.json"
        done: tuple[Any, ...] = ()
        if preprocess:
            wanted = [c for c in configurations if c in plans["configurations"]]
            skipped = sorted(set(configurations) - set(wanted))
            if skipped:
                logger.info("no configuration %s for this dataset; not preprocessed", ", ".join(skipped))
            done = tuple(run_preprocess(raw, plans_file, wanted, num_workers=num_workers))
    return PlanResult(plans_file, plans, dict(planner.estimates), done)
