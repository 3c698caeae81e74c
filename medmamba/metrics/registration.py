"""Registration metrics: Jacobian determinant of a displacement field, folding, smoothness, warped-label overlap.

Arrays in, numbers out. A displacement field is ``(3, X, Y, Z)`` in **voxels along the array axes** (component
``a`` moves along axis ``a``; ``warped[x] = moving[x + u(x)]``), as MambaMorph and MONAI's ``Warp`` use it. The
Jacobian determinant of ``φ(x) = x + u(x)`` is the same whether ``u`` and ``x`` are measured in voxels or in mm
(``J_mm = S · J_vox · S⁻¹`` for the diagonal spacing matrix ``S``), so no spacing is needed for it.

What is reported, as in Learn2Reg and MambaMorph's ``test_cross.py`` (``networks.md`` §6.7):

* ``folding_fraction``: share of voxels with ``det J ≤ 0`` (the map folds or collapses there);
* ``std_log_jacobian``: standard deviation of ``log det J`` with the determinant clipped to ``[1e-9, 1e9]``
  (Learn2Reg's SDlogJ; 0 for any volume-preserving or affine map);
* Dice and HD95 of the warped labels against the fixed labels, per label (MONAI's metrics through
  :func:`medmamba.metrics.segmentation.segmentation_metrics`).

Derivatives are central differences inside the volume and one-sided at its faces (``numpy.gradient``), the
stencil of ITK's ``DisplacementFieldJacobianDeterminantFilter`` (which MambaMorph's evaluation calls) in the
interior.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medmamba.metrics.segmentation import Structure, segmentation_metrics

__all__ = ["DeformationMetrics", "deformation_metrics", "jacobian_determinant", "warped_label_metrics"]

#: Learn2Reg's clip before the log of the Jacobian determinant
_LOG_CLIP = (1e-9, 1e9)


def jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """``det(I + ∂u/∂x)`` at every voxel of a displacement field.

    Args:
        ddf: ``(3, X, Y, Z)`` (or ``(2, X, Y)``) displacement in voxels along the array axes, any float dtype.

    Returns:
        ``(X, Y, Z)`` float64 determinants.

    Raises:
        ValueError: the field is not ``(ndim, *spatial)`` with every side ≥ 2.

    Example:
        >>> x = np.stack(np.meshgrid(*(np.arange(8.0),) * 3, indexing="ij"))
        >>> float(jacobian_determinant(0.1 * x).mean())  # φ(x) = 1.1 x: volume × 1.331
        1.331
    """
    ddf = np.asarray(ddf, dtype=np.float64)
    ndim = ddf.ndim - 1
    if ndim not in (2, 3) or ddf.shape[0] != ndim or min(ddf.shape[1:]) < 2:
        raise ValueError(f"a displacement field is (ndim, *spatial) with sides ≥ 2, got shape {ddf.shape}")
    # jac[a, b] = ∂φ_a / ∂x_b = δ_ab + ∂u_a / ∂x_b
    jac = np.stack([np.stack(np.gradient(ddf[a], axis=tuple(range(ndim))), axis=0) for a in range(ndim)], axis=0)
    jac += np.eye(ndim).reshape(ndim, ndim, *([1] * ndim))
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


@dataclass(frozen=True, slots=True)
class DeformationMetrics:
    """Regularity of one displacement field.

    Attributes:
        folding_fraction: share of voxels with ``det J ≤ 0``, in [0, 1].
        std_log_jacobian: standard deviation of ``log clip(det J, 1e-9, 1e9)``.
        jacobian_min: smallest determinant. jacobian_max: largest determinant.
        displacement_mean_mm: mean length of the displacement in mm (how far the registration moved things).
    """

    folding_fraction: float
    std_log_jacobian: float
    jacobian_min: float
    jacobian_max: float
    displacement_mean_mm: float

    def to_dict(self) -> dict[str, float]:
        """JSON-friendly."""
        return {
            "folding_fraction": self.folding_fraction,
            "std_log_jacobian": self.std_log_jacobian,
            "jacobian_min": self.jacobian_min,
            "jacobian_max": self.jacobian_max,
            "displacement_mean_mm": self.displacement_mean_mm,
        }


def deformation_metrics(
    ddf: np.ndarray, *, spacing: Sequence[float] | None = None, mask: np.ndarray | None = None
) -> DeformationMetrics:
    """Folding fraction, std of log-Jacobian and Jacobian range of a displacement field ``(3, X, Y, Z)`` in voxels.

    Args:
        ddf: displacement in voxels along the array axes.
        spacing: voxel size in mm per axis, for ``displacement_mean_mm`` (1 mm when None).
        mask: optional boolean ``(X, Y, Z)``: evaluate inside it only (e.g. the fixed image's foreground).

    Example:
        >>> m = deformation_metrics(np.zeros((3, 6, 6, 6)))
        >>> m.folding_fraction, m.std_log_jacobian
        (0.0, 0.0)
    """
    det = jacobian_determinant(ddf)
    ddf = np.asarray(ddf, dtype=np.float64)
    scale = np.asarray(spacing if spacing is not None else [1.0] * (ddf.ndim - 1), dtype=np.float64)
    length = np.sqrt(np.sum((ddf * scale.reshape(-1, *([1] * (ddf.ndim - 1)))) ** 2, axis=0))
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != det.shape:
            raise ValueError(f"mask {mask.shape} and field {det.shape} differ in shape")
        det, length = det[mask], length[mask]
    if det.size == 0:
        nan = math.nan
        return DeformationMetrics(nan, nan, nan, nan, nan)
    log_det = np.log(np.clip(det, *_LOG_CLIP))
    return DeformationMetrics(
        folding_fraction=float(np.mean(det <= 0)),
        std_log_jacobian=float(np.std(log_det)),
        jacobian_min=float(det.min()),
        jacobian_max=float(det.max()),
        displacement_mean_mm=float(length.mean()),
    )


def warped_label_metrics(
    fixed_labels: np.ndarray,
    warped_labels: np.ndarray,
    structures: Sequence[Structure],
    *,
    spacing: Sequence[float],
) -> dict[Structure, dict[str, float]]:
    """Dice and HD95 (mm) of warped moving labels against the fixed labels, per structure.

    Empty structures follow :mod:`medmamba.metrics.segmentation` (Dice 0 / HD95 NaN when one side is empty, NaN
    for both when both are).

    Returns:
        ``structure → {"dice", "hd95"}``.
    """
    scores = segmentation_metrics(fixed_labels, warped_labels, structures, spacing=spacing)
    return {s: {"dice": m.dice, "hd95": m.hd95} for s, m in scores.items()}
