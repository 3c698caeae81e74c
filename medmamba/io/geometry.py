"""Where an image lies in space: spacing, origin and direction, in ITK's LPS convention.

One convention inside medmamba, converted at the file boundary:

* arrays are indexed ``(i, j, k)`` = ``(x, y, z)`` in file order, as nibabel and MONAI do (SimpleITK's numpy
  view is the transpose, ``(z, y, x)``);
* ``Geometry`` is ITK's: ``spacing`` in mm per array axis, ``origin`` = the LPS position (mm) of voxel
  ``(0, 0, 0)``'s centre, ``direction`` = the ``ndim × ndim`` matrix (row-major) whose *columns* are the unit
  vectors of the array axes in LPS, exactly what DICOM, NRRD, MHA and ``SimpleITK.Image`` store;
* a NIfTI (nibabel) affine is in RAS: ``affine_ras = diag(-1, -1, 1, 1) @ [[direction · diag(spacing), origin],
  [0, 1]]``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medmamba.errors import GeometryError

__all__ = ["LPS_TO_RAS", "Geometry"]

#: flips x and y: LPS ⇄ RAS (its own inverse)
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

#: how far a direction may be from orthonormal before it counts as sheared (NIfTI stores float32)
_ORTHONORMAL_TOL = 1e-3


@dataclass(frozen=True, slots=True)
class Geometry:
    """Spacing, origin and direction of an image grid (ITK/LPS convention, array axes ``(x, y, z)``).

    Args:
        spacing: voxel size in mm along each array axis, all > 0.
        origin: LPS position in mm of the centre of voxel ``(0, …, 0)``.
        direction: ``ndim × ndim`` direction cosines, row-major; column ``a`` is axis ``a``'s unit vector.

    Example:
        >>> g = Geometry((2.0, 2.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
        >>> g.axcodes
        ('L', 'P', 'S')
        >>> Geometry.from_affine(g.affine_ras).isclose(g)
        True
    """

    spacing: tuple[float, ...] | Sequence[float] | np.ndarray
    origin: tuple[float, ...] | Sequence[float] | np.ndarray
    direction: tuple[float, ...] | Sequence[float] | np.ndarray

    def __post_init__(self) -> None:
        n = len(self.spacing)
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "direction", tuple(float(d) for d in np.asarray(self.direction).ravel()))
        if n not in (2, 3) or len(self.origin) != n or len(self.direction) != n * n:
            raise ValueError(
                f"Geometry needs 2 or 3 spacings, as many origin entries and ndim² direction entries; got "
                f"{len(self.spacing)}, {len(self.origin)} and {len(self.direction)}"
            )

    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.spacing)

    @property
    def direction_matrix(self) -> np.ndarray:
        """``(ndim, ndim)`` float64 array; columns are the axis directions in LPS."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    @property
    def affine_lps(self) -> np.ndarray:
        """``(ndim + 1, ndim + 1)`` voxel index → LPS mm."""
        n = self.ndim
        affine = np.eye(n + 1)
        affine[:n, :n] = self.direction_matrix @ np.diag(self.spacing)
        affine[:n, n] = self.origin
        return affine

    @property
    def affine_ras(self) -> np.ndarray:
        """4×4 voxel index → RAS mm, as nibabel and MONAI use it (a 2-D grid is embedded at z = 0, 1 mm)."""
        affine = _embed3(self).affine_lps
        affine[:3] = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
        return affine

    @property
    def axcodes(self) -> tuple[str, ...]:
        """Which anatomical end each array axis points to, in the nibabel sense (``('R', 'A', 'S')`` …).

        Letters name where the axis *increases towards* in RAS terms, so an ITK identity direction reads
        ``('L', 'P', 'S')``.
        """
        from nibabel.orientations import aff2axcodes

        return tuple(aff2axcodes(self.affine_ras))[: self.ndim]

    @classmethod
    def from_affine(cls, affine_ras: np.ndarray | Sequence[Sequence[float]], ndim: int = 3) -> Geometry:
        """From a 4×4 RAS affine (nibabel); spacing = column norms, direction = normalised columns.

        Raises:
            GeometryError: a zero or non-finite column, or a sheared (non-orthogonal) affine.
        """
        affine = np.asarray(affine_ras, dtype=np.float64)
        if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
            raise GeometryError(f"the affine must be a finite 4×4 matrix, got {affine.tolist()}")
        lps = LPS_TO_RAS @ affine[:3, :4]
        spacing = np.linalg.norm(lps[:3, :3], axis=0)
        if np.any(spacing <= 0):
            raise GeometryError(f"the affine has a zero column (spacing {tuple(spacing.round(6))})")
        direction = lps[:3, :3] / spacing
        _check_orthonormal(direction)
        geometry = cls(tuple(spacing), tuple(lps[:3, 3]), tuple(_orthonormalise(direction).ravel()))
        return geometry if ndim == 3 else geometry.reduced(ndim)

    @classmethod
    def from_sitk(cls, image: Any) -> Geometry:
        """From a ``SimpleITK.Image`` (already LPS); of a 4-D image, the first three (spatial) axes."""
        dim = min(image.GetDimension(), 3)
        direction = np.asarray(image.GetDirection()).reshape(image.GetDimension(), -1)[:dim, :dim]
        return cls(image.GetSpacing()[:dim], image.GetOrigin()[:dim], direction.ravel())

    def apply_to_sitk(self, image: Any) -> None:
        """Set a ``SimpleITK.Image``'s spacing, origin and direction to this geometry (in place)."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)

    def reduced(self, ndim: int) -> Geometry:
        """The first ``ndim`` axes (drops trailing axes, e.g. a 2-D slice of a 3-D grid)."""
        if ndim == self.ndim:
            return self
        return Geometry(self.spacing[:ndim], self.origin[:ndim], self.direction_matrix[:ndim, :ndim].ravel())

    def validate(self, path: str = "<image>") -> None:
        """Raise ``GeometryError`` naming ``path`` if spacing ≤ 0, anything is non-finite, or axes are sheared."""
        values = (*self.spacing, *self.origin, *self.direction)
        if not all(math.isfinite(v) for v in values):
            raise GeometryError(
                f"{path}: geometry has non-finite values (spacing {self.spacing}, origin {self.origin}). "
                "Fix the header (pixdim / sform / qform) or re-export the volume."
            )
        if any(s <= 0 for s in self.spacing):
            raise GeometryError(
                f"{path}: spacing {self.spacing} has a zero or negative entry. "
                "Fix pixdim in the header or re-export the volume."
            )
        try:
            _check_orthonormal(self.direction_matrix)
        except GeometryError as err:
            raise GeometryError(f"{path}: {err}") from None

    def mismatches(self, other: Geometry, *, atol_mm: float = 1e-3, atol_direction: float = 1e-4) -> list[str]:
        """Human-readable differences from ``other`` (empty when equal within the tolerances).

        ``atol_mm`` bounds spacing and origin differences in mm (relative to spacing for spacing), ``atol_direction``
        the direction cosines'.
        """
        if other.ndim != self.ndim:
            return [f"{self.ndim}-D grid vs {other.ndim}-D grid"]
        found = []
        if not np.allclose(self.spacing, other.spacing, rtol=atol_mm, atol=atol_mm):
            found.append(f"spacing {_fmt(self.spacing)} vs {_fmt(other.spacing)}")
        if not np.allclose(self.origin, other.origin, rtol=0, atol=max(atol_mm, 1e-3 * min(self.spacing))):
            found.append(f"origin {_fmt(self.origin)} vs {_fmt(other.origin)}")
        if not np.allclose(self.direction, other.direction, rtol=0, atol=atol_direction):
            found.append(f"direction {_fmt(self.direction)} vs {_fmt(other.direction)}")
        return found

    def isclose(self, other: Geometry, *, atol_mm: float = 1e-3, atol_direction: float = 1e-4) -> bool:
        """True when ``mismatches`` finds nothing."""
        return not self.mismatches(other, atol_mm=atol_mm, atol_direction=atol_direction)

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready ``{"spacing": […], "origin": […], "direction": […]}``."""
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}


def _embed3(geometry: Geometry) -> Geometry:
    if geometry.ndim == 3:
        return geometry
    direction = np.eye(3)
    direction[:2, :2] = geometry.direction_matrix
    return Geometry((*geometry.spacing, 1.0), (*geometry.origin, 0.0), direction.ravel())


def _check_orthonormal(direction: np.ndarray) -> None:
    gram = direction.T @ direction
    error = float(np.abs(gram - np.eye(len(direction))).max())
    if error > _ORTHONORMAL_TOL:
        raise GeometryError(
            f"the axes are sheared (direction cosines not orthonormal, max |DᵀD − I| = {error:.2g}); ITK and "
            "nnU-Net cannot represent such a grid. Resample the volume onto an orthogonal grid first"
        )


def _orthonormalise(direction: np.ndarray) -> np.ndarray:
    """Nearest orthonormal matrix (polar decomposition): float32 headers leave ~1e-7 of drift that ITK rejects."""
    u, _, vt = np.linalg.svd(direction)
    return u @ vt


def _fmt(values: Sequence[float] | np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
