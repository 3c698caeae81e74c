"""``selective_scan``: the one entry point through which every network runs its selective scan.

It validates the arguments once, brings them to one canonical set of shapes, picks a backend and returns a
:class:`ScanResult`. Backends trust what it hands them.

Canonical shapes handed to a backend (K orders, C channels, G groups, N states, S the spatial shape)::

    u, delta     (B, K, C, *S)   natural layout per order (a stride-0 expand when shared)
    A            (K, C, N)       real, negative for a decaying state
    B, C         (B, K, G, N, *S)
    D, delta_bias (K, C) or None
    z            (B, C, *S) or None, shared by all orders
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch

from .dispatch import BackendName, resolve_backend
from .errors import ScanInputError
from .orders import RASTER, ScanOrder

__all__ = ["ScanResult", "selective_scan"]


class ScanResult(NamedTuple):
    """What ``selective_scan`` returns.

    Attributes:
        out: ``merge="sum"``: ``(B, C, *S)``; ``merge="stack"``: ``(B, K, C, *S)``; dtype of ``u``.
        last_state: the state after each order's last step, fp32 (float64 for float64 inputs):
            ``(B, C, N)`` for one order, ``(B, K, C, N)`` for several; ``None`` unless asked for.
    """

    out: torch.Tensor
    last_state: torch.Tensor | None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    *,
    orders: Sequence[ScanOrder] = (RASTER,),
    delta_softplus: bool = True,
    merge: Literal["sum", "stack"] = "sum",
    return_last_state: bool = False,
    backend: BackendName | None = None,
) -> ScanResult:
    r"""Mamba-1 selective scan over a feature map, along one or several scan orders (Gu & Dao, arXiv:2312.00752).

    For each order k, along that order's sequence t (state fp32, or float64 for float64 inputs)::

        Δ_t = softplus(delta_t + delta_bias)        (softplus only when delta_softplus)
        h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t·u_t,      y_t = C_t·h_t + D·u_t
        out = Σ_k y_k·silu(z)   (merge="sum")        out_k = y_k·silu(z)   (merge="stack")

    With one order and the 1D layout the arguments mean exactly what they mean in mamba_ssm's
    ``selective_scan_fn`` (only the default of ``delta_softplus`` differs: every Mamba block uses it).

    Args:
        u: the input map. One order: ``(B, C, *S)`` with ``S`` = ``(L,)``, ``(H, W)``, ``(D, H, W)`` or
            ``(T, H, W)`` for video. Several orders: ``(B, K, C, *S)``, each order's own input in the natural
            layout (``u.unsqueeze(1).expand(-1, K, ...)`` shares one).
        delta: Δ before bias and softplus, same shape as ``u``.
        A: ``(C, N)`` for one order, ``(K, C, N)`` per order; real.
        B: input-dependent ``(B, N, *S)`` or ``(B, G, N, *S)`` (one order), ``(B, K, G, N, *S)`` (several);
            or constant ``(C, N)`` / ``(K, C, N)``. Channel c uses group ``c // (C / G)``.
        C: like ``B``.
        D: skip weights ``(C,)`` / ``(K, C)``.
        z: gate ``(B, C, *S)``, shared by all orders.
        delta_bias: ``(C,)`` / ``(K, C)``, added to ``delta`` before the softplus.
        orders: the K scan orders (``medmamba.kernels.orders``).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        merge: ``"sum"`` returns Σ over orders in the input's layout; ``"stack"`` keeps the K outputs.
        return_last_state: also return the state after each order's last step.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"``; ``None`` follows ``use_backend`` and
            ``MEDMAMBA_SCAN_BACKEND``, else ``"auto"``.

    Returns:
        :class:`ScanResult` ``(out, last_state)``.

    Raises:
        ScanInputError: an argument's shape, dtype or device does not fit; the message names it.
        BackendUnavailableError: the requested backend cannot run on these tensors.
    """
    orders = tuple(orders)
    K = len(orders)
    if K == 0 or not all(isinstance(o, ScanOrder) for o in orders):
        raise ScanInputError(f"orders must be a non-empty sequence of ScanOrder, got {orders!r}")
    if merge not in ("sum", "stack"):
        raise ScanInputError(f"merge must be 'sum' or 'stack', got {merge!r}")
    canonical = _canonicalise(u, delta, A, B, C, D, z, delta_bias, orders)
    for order in orders:
        order.resolve(canonical[0].ndim - 3)
    _, run = resolve_backend(backend, u.device)
    out, last = run(
        *canonical, orders=orders, delta_softplus=delta_softplus, merge=merge, return_last_state=return_last_state
    )
    if last is not None and K == 1:
        last = last[:, 0]
    return ScanResult(out, last)


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def _canonicalise(u, delta, A, B, C, D, z, delta_bias, orders):
    K = len(orders)
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(x, torch.Tensor):
            raise ScanInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.is_complex():
            raise ScanInputError(f"{name} is complex ({x.dtype}); only real selective scans are supported")
        if not x.is_floating_point():
            raise ScanInputError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != u.device:
            raise ScanInputError(f"{name} is on {x.device} but u is on {u.device}; put all inputs on one device")

    per_order = K > 1
    nd = u.ndim - (3 if per_order else 2)
    layout = "(B, K, C, *S)" if per_order else "(B, C, *S)"
    if nd < 1:
        raise ScanInputError(f"u must be {layout} with at least one spatial axis, got shape {_shape(u)}")
    u4 = u if per_order else u.unsqueeze(1)
    batch, _, channels, *spatial = u4.shape
    if per_order and u4.shape[1] != K:
        raise ScanInputError(f"u has {u4.shape[1]} orders on axis 1 but {K} orders were given; expected {layout}")
    if _shape(delta) != _shape(u):
        raise ScanInputError(f"delta must have the shape of u {_shape(u)}, got {_shape(delta)}")
    delta4 = delta if per_order else delta.unsqueeze(1)

    A3 = A if A.ndim == 3 else A.unsqueeze(0)
    if A3.ndim != 3 or A3.shape[:2] != (K, channels):
        expected = f"({K}, {channels}, N)" + (f" or ({channels}, N)" if K == 1 else "")
        raise ScanInputError(f"A must be {expected}, got {_shape(A)}")
    N = A3.shape[2]

    B5, C5 = (_canonical_bc(name, x, batch, K, channels, N, spatial) for name, x in (("B", B), ("C", C)))
    if B5.shape[2] != C5.shape[2]:
        raise ScanInputError(f"B and C must have the same number of groups, got {B5.shape[2]} and {C5.shape[2]}")

    def per_channel(name: str, x: torch.Tensor | None) -> torch.Tensor | None:
        if x is None:
            return None
        x2 = x if x.ndim == 2 else x.unsqueeze(0)
        if x2.shape != (K, channels) or x.device != u.device:
            expected = f"({K}, {channels})" + (f" or ({channels},)" if K == 1 else "")
            raise ScanInputError(f"{name} must be {expected} on {u.device}, got {_shape(x)} on {x.device}")
        return x2

    if z is not None and (_shape(z) != (batch, channels, *spatial) or z.device != u.device):
        raise ScanInputError(f"z must be {(batch, channels, *spatial)} on {u.device}, got {_shape(z)} on {z.device}")
    return u4, delta4, A3, B5, C5, per_channel("D", D), z, per_channel("delta_bias", delta_bias)


def _canonical_bc(name, x, batch, K, channels, N, spatial):
    nd = len(spatial)
    if x.ndim == (2 if K == 1 else 3):  # constant per channel: one group per channel, broadcast over S
        x3 = x if x.ndim == 3 else x.unsqueeze(0)
        if x3.shape != (K, channels, N):
            raise ScanInputError(f"constant {name} must be {(K, channels, N)[3 - x.ndim :]}, got {_shape(x)}")
        return x3.reshape(1, K, channels, N, *([1] * nd)).expand(batch, K, channels, N, *spatial)
    extra = x.ndim - nd
    if K == 1 and extra in (2, 3):
        x5 = x.unsqueeze(1).unsqueeze(1) if extra == 2 else x.unsqueeze(1)
    elif extra == 4:
        x5 = x
    else:
        x5 = None
    ok = (
        x5 is not None
        and x5.shape[0] == batch
        and x5.shape[1] == K
        and x5.shape[3] == N
        and tuple(x5.shape[4:]) == tuple(spatial)
        and channels % x5.shape[2] == 0
    )
    if not ok:
        S = ", ".join(map(str, spatial))
        forms = f"({batch}, {N}, {S}) or ({batch}, G, {N}, {S})" if K == 1 else f"({batch}, {K}, G, {N}, {S})"
        raise ScanInputError(f"{name} must be {forms} with G dividing C={channels}, or constant; got {_shape(x)}")
    return x5
