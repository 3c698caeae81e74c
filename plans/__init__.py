"""medmamba.plans: self-configuring plans on top of nnunetv2 (fingerprint, planner, preprocessing, presets).

``plan_and_preprocess(dataset, preprocessed_root, networks=..., gpu_memory_gb=...)`` runs verify → fingerprint →
plan → preprocess; ``MedmambaPlanner`` is nnU-Net's planner with a Mamba-aware memory model
(``plans.memory.estimate``); ``load_preset``/``list_presets`` give the papers' set-ups. The planner and the
pipeline import nnunetv2 (and torch) on first use, so ``load_preset`` stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .presets import Preset, list_presets, load_preset

if TYPE_CHECKING:
    from .pipeline import PlanResult, plan_and_preprocess
    from .planner import MedmambaPlanner

__all__ = ["MedmambaPlanner", "PlanResult", "Preset", "list_presets", "load_preset", "plan_and_preprocess"]

_LAZY = {"MedmambaPlanner": "planner", "PlanResult": "pipeline", "plan_and_preprocess": "pipeline"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
