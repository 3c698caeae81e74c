"""Scan orders: which voxel the selective scan visits at each step.

Every order is a permutation of the raster order of a feature map's spatial block (last axis fastest, the one
flattening all four networks use, ``networks.md`` §1.2). An order is an axis permutation, listed from the
slowest-varying to the fastest-varying axis, plus a reverse flag. Examples for a ``(D, H, W)`` map:

* ``RASTER`` — ``(0, 1, 2)``: token ``l = (d·H + h)·W + w``; all four networks.
* ``REVERSED`` — the same sequence walked backwards; SegMamba and Vivim.
* ``SLICE`` — ``(1, 2, 0)``: depth fastest, ``q = (h·W + w)·D + d``; SegMamba's inter-slice order and, on a
  ``(T, H, W)`` clip, Vivim's time-first order (``TEMPORAL`` is the same order under its video name).
* ``cross_scan(n)`` — each axis fastest once, forwards and backwards (VMamba's cross-scan, 4 orders in 2D,
  6 in 3D).

The state is never reset at row, slice or frame boundaries: the sequence is one long 1D stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ScanInputError

__all__ = [
    "RASTER",
    "REVERSED",
    "SLICE",
    "TEMPORAL",
    "ScanOrder",
    "cross_scan",
    "from_sequence",
    "order_indices",
    "to_sequence",
]


@dataclass(frozen=True)
class ScanOrder:
    """A scan order over a feature map's spatial axes.

    Args:
        axes: permutation of the spatial axes from slowest to fastest visited; ``None`` is the identity for
            any number of spatial dimensions (raster order).
        reverse: walk the permuted sequence from its last token to its first.
        name: a label for reprs and benchmark tables.
    """

    axes: tuple[int, ...] | None = None
    reverse: bool = False
    name: str = ""

    def resolve(self, ndim: int) -> tuple[int, ...]:
        """The axis permutation for a map with ``ndim`` spatial dimensions."""
        if self.axes is None:
            return tuple(range(ndim))
        if sorted(self.axes) != list(range(ndim)):
            raise ScanInputError(
                f"scan order {self.label} permutes axes {self.axes}, which is not a permutation of the "
                f"{ndim} spatial axes of the input; use an order made for {ndim}-D maps"
            )
        return self.axes

    @property
    def label(self) -> str:
        """Short human-readable name."""
        if self.name:
            return self.name
        axes = "raster" if self.axes is None else "".join(str(a) for a in self.axes)
        return f"{axes}{'-rev' if self.reverse else ''}"


RASTER = ScanOrder(None, False, "raster")
REVERSED = ScanOrder(None, True, "reversed")
SLICE = ScanOrder((1, 2, 0), False, "slice")
TEMPORAL = ScanOrder((1, 2, 0), False, "temporal")


def cross_scan(ndim: int) -> tuple[ScanOrder, ...]:
    """VMamba-style cross-scan: each spatial axis fastest once, then the same orders reversed.

    ``ndim=2`` gives VMamba's 4 orders (row-major, column-major, both reversed); ``ndim=3`` gives 6.
    """
    if ndim < 1:
        raise ScanInputError(f"cross_scan needs at least one spatial axis, got ndim={ndim}")
    rotations = [tuple((i + s) % ndim for i in range(ndim)) for s in range(ndim)]
    forward = [ScanOrder(perm, False, f"cross{''.join(map(str, perm))}") for perm in rotations]
    backward = [ScanOrder(o.axes, True, o.name + "-rev") for o in forward]
    return tuple(forward + backward)


def _check_map(x: torch.Tensor, spatial_ndim: int) -> None:
    if x.ndim < spatial_ndim:
        raise ScanInputError(f"expected a tensor with {spatial_ndim} trailing spatial axes, got shape {tuple(x.shape)}")


def to_sequence(x: torch.Tensor, order: ScanOrder, spatial_ndim: int) -> torch.Tensor:
    """Flatten the trailing ``spatial_ndim`` axes of ``x`` into one axis in the visiting order of ``order``.

    ``x``: ``(..., *spatial)`` → ``(..., L)``. A copy unless the order is raster.
    """
    _check_map(x, spatial_ndim)
    lead = x.ndim - spatial_ndim
    perm = order.resolve(spatial_ndim)
    if perm != tuple(range(spatial_ndim)):
        x = x.permute(*range(lead), *(lead + a for a in perm))
    seq = x.reshape(*x.shape[:lead], -1)
    return seq.flip(-1) if order.reverse else seq


def from_sequence(seq: torch.Tensor, order: ScanOrder, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`to_sequence`: ``(..., L)`` in ``order`` → ``(..., *spatial_shape)`` natural layout."""
    spatial_shape = tuple(int(s) for s in spatial_shape)
    ndim = len(spatial_shape)
    perm = order.resolve(ndim)
    if order.reverse:
        seq = seq.flip(-1)
    lead = seq.ndim - 1
    x = seq.reshape(*seq.shape[:lead], *(spatial_shape[a] for a in perm))
    if perm != tuple(range(ndim)):
        inverse = [perm.index(a) for a in range(ndim)]
        x = x.permute(*range(lead), *(lead + i for i in inverse))
    return x


def order_indices(order: ScanOrder, spatial_shape: Sequence[int]) -> torch.Tensor:
    """Raster index of the voxel visited at each step: ``seq[t] == x.flatten()[order_indices(...)[t]]``.

    For ``spatial_shape=(2, 2, 3)`` and ``SLICE`` this is ``[0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]``.
    """
    shape = tuple(int(s) for s in spatial_shape)
    raster = torch.arange(int(torch.tensor(shape).prod()) if shape else 1).reshape(shape)
    return to_sequence(raster, order, len(shape))
