"""Per-case segmentation metrics with MONAI: Dice, 95th-percentile Hausdorff distance, surface Dice (NSD).

Arrays in, numbers out. Distances are in mm: pass the voxel spacing per array axis. Classes may be single labels
or regions (a tuple of labels counted as one structure, e.g. BraTS' whole tumour ``(1, 2, 3)``).

Empty structures follow nnU-Net's convention for Dice and extend it consistently:

=====================  =====  =====  ============
reference / prediction  Dice   HD95   surface Dice
=====================  =====  =====  ============
both non-empty          Dice   HD95   NSD
one of them empty       0      NaN    0
both empty              NaN    NaN    NaN
=====================  =====  =====  ============

NaN means "undefined" and is left out of means (``metrics.tables``). Surface Dice is Nikolov et al.'s
normalised surface distance at a tolerance in mm (``monai.metrics.compute_surface_dice``); the tolerance is per
class, as in U-Mamba's organ evaluation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ClassMetrics", "Structure", "segmentation_metrics", "structure_name"]

#: a label, or a region = several labels taken together
Structure = int | tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ClassMetrics:
    """Metrics of one structure in one case.

    Attributes:
        dice: Dice coefficient in [0, 1] (NaN if the structure is absent from both).
        hd95: 95th-percentile symmetric Hausdorff distance in mm (NaN if either is empty).
        surface_dice: fraction of both surfaces within ``tolerance_mm`` of the other (NaN if both empty).
        tolerance_mm: the surface-Dice tolerance used.
        n_reference: voxels of the structure in the reference.
        n_prediction: voxels of the structure in the prediction.
    """

    dice: float
    hd95: float
    surface_dice: float
    tolerance_mm: float
    n_reference: int
    n_prediction: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-friendly: NaN becomes None."""
        return {
            "dice": _none_if_nan(self.dice),
            "hd95": _none_if_nan(self.hd95),
            "surface_dice": _none_if_nan(self.surface_dice),
            "tolerance_mm": self.tolerance_mm,
            "n_reference": self.n_reference,
            "n_prediction": self.n_prediction,
        }


def structure_name(structure: Structure) -> str:
    """``3`` → ``"3"``; ``(1, 2, 3)`` → ``"1+2+3"`` (keys of tables and CSV columns)."""
    return "+".join(str(v) for v in structure) if isinstance(structure, tuple) else str(structure)


def segmentation_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    structures: Sequence[Structure],
    *,
    spacing: Sequence[float],
    tolerance_mm: float | Sequence[float] | Mapping[Structure, float] = 1.0,
) -> dict[Structure, ClassMetrics]:
    """Dice, HD95 and surface Dice of each structure for one case.

    Args:
        reference: integer label map, any number of spatial axes (2D or 3D).
        prediction: integer label map of the same shape.
        structures: labels (``1``) or regions (``(1, 2)``) to score; background is not implied.
        spacing: voxel size in mm per array axis.
        tolerance_mm: surface-Dice tolerance: one value, one per structure, or a mapping structure → mm.

    Returns:
        one :class:`ClassMetrics` per structure, in the order given.

    Raises:
        ValueError: shapes or spacing length disagree, or a tolerance is missing/negative.

    Example:
        >>> ref = np.zeros((8, 8, 8), np.uint8); ref[2:6, 2:6, 2:6] = 1
        >>> round(segmentation_metrics(ref, ref, [1], spacing=(1, 1, 1))[1].dice, 3)
        1.0
    """
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} differ in shape")
    if len(spacing) != reference.ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs one entry per axis of {reference.shape}")
    tolerances = _tolerances(structures, tolerance_mm)
    results: dict[Structure, ClassMetrics] = {}
    for structure, tolerance in zip(structures, tolerances, strict=True):
        labels = structure if isinstance(structure, tuple) else (structure,)
        ref, pred = np.isin(reference, labels), np.isin(prediction, labels)
        n_ref, n_pred = int(ref.sum()), int(pred.sum())
        if n_ref == 0 and n_pred == 0:
            results[structure] = ClassMetrics(math.nan, math.nan, math.nan, tolerance, 0, 0)
            continue
        if n_ref == 0 or n_pred == 0:
            results[structure] = ClassMetrics(0.0, math.nan, 0.0, tolerance, n_ref, n_pred)
            continue
        # MONAI wants one-hot (B, C, *S); channel 0 = background, not scored
        y = torch.from_numpy(np.stack([~ref, ref])[None])
        y_pred = torch.from_numpy(np.stack([~pred, pred])[None])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # MONAI's own deprecation notes inside get_mask_edges
            dice = compute_dice(y_pred, y, include_background=False).item()
            hd95 = compute_hausdorff_distance(y_pred, y, include_background=False, percentile=95, spacing=list(spacing))
            nsd = compute_surface_dice(y_pred, y, [tolerance], include_background=False, spacing=list(spacing))
        results[structure] = ClassMetrics(dice, float(hd95.item()), float(nsd.item()), tolerance, n_ref, n_pred)
    return results


def _tolerances(
    structures: Sequence[Structure], tolerance_mm: float | Sequence[float] | Mapping[Structure, float]
) -> list[float]:
    if isinstance(tolerance_mm, Mapping):
        missing = [s for s in structures if s not in tolerance_mm]
        if missing:
            raise ValueError(f"tolerance_mm has no entry for {missing}")
        values = [float(tolerance_mm[s]) for s in structures]
    elif isinstance(tolerance_mm, (int, float)):
        values = [float(tolerance_mm)] * len(structures)
    else:
        values = [float(t) for t in tolerance_mm]
        if len(values) != len(structures):
            raise ValueError(f"{len(values)} tolerances for {len(structures)} structures; give one per structure")
    if any(not v >= 0 for v in values):
        raise ValueError(f"tolerances must be >= 0 mm, got {values}")
    return values


def _none_if_nan(value: float) -> float | None:
    return None if math.isnan(value) else value
