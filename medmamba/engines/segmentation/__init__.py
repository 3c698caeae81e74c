"""Segmentation training and inference on top of nnunetv2.

``train(dataset, configuration, fold, network=..., preprocessed=..., results=...)`` trains with the network's
paper recipe through :class:`MedmambaTrainer` (nnU-Net's trainer, extended through its hooks);
``medmamba.engines.segmentation.predict.predict(inputs, output, model_dir)`` segments NIfTI/NRRD/MHA files or a
DICOM series into label maps on exactly the input grid through :class:`MedmambaPredictor` (the function keeps its
module's name, so it is not re-exported here). Both import nnunetv2 (and torch) on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .predict import MedmambaPredictor
    from .trainer import MedmambaTrainer, train

__all__ = ["MedmambaPredictor", "MedmambaTrainer", "train"]

_LAZY = {"MedmambaPredictor": "predict", "MedmambaTrainer": "trainer", "train": "trainer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
