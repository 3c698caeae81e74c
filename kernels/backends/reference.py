"""The golden model: the selective-scan recurrence one step at a time, differentiable by autograd.

For tests only (it takes L Python steps). It computes in float64 when given float64 inputs and in float32
otherwise (as mamba_ssm's ``selective_scan_ref``), and returns the output in the dtype of ``u``.

Per order k, batch b, channel c (group g = c // (C/G)) and state n, along the order's sequence t = 0..L-1::

    Δ_t = softplus(delta_t + delta_bias)            (when delta_softplus)
    h_t = exp(Δ_t·A[c, n])·h_{t-1} + Δ_t·B[g, n, t]·u_t,   h_{-1} = 0
    y_t = Σ_n C[g, n, t]·h_t + D[c]·u_t
    out = Σ_k y_k · silu(z)   (merge="sum")   or   stack_k(y_k · silu(z))   (merge="stack")
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medmamba.kernels.orders import ScanOrder, from_sequence, to_sequence

__all__ = ["scan"]


def scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    *,
    orders: Sequence[ScanOrder],
    delta_softplus: bool,
    merge: str,
    return_last_state: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sequential scan over canonical shapes (see ``kernels/scan.py``: u, delta ``(B, K, C, *S)``, …)."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    spatial = tuple(u.shape[3:])
    nd = len(spatial)
    channels, groups = u.shape[2], B.shape[2]
    outputs, states = [], []
    for k, order in enumerate(orders):
        uk = to_sequence(u[:, k].to(dtype), order, nd)  # (B, C, L)
        dk = to_sequence(delta[:, k].to(dtype), order, nd)
        if delta_bias is not None:
            dk = dk + delta_bias[k].to(dtype)[:, None]
        if delta_softplus:
            dk = F.softplus(dk)
        Bk = to_sequence(B[:, k].to(dtype), order, nd).repeat_interleave(channels // groups, dim=1)  # (B, C, N, L)
        Ck = to_sequence(C[:, k].to(dtype), order, nd).repeat_interleave(channels // groups, dim=1)
        Ak = A[k].to(dtype)  # (C, N)
        h = torch.zeros(*uk.shape[:2], Ak.shape[-1], dtype=dtype, device=u.device)
        ys = []
        for t in range(uk.shape[-1]):
            h = torch.exp(dk[..., t, None] * Ak) * h + (dk[..., t] * uk[..., t])[..., None] * Bk[..., t]
            ys.append((h * Ck[..., t]).sum(-1))
        y = torch.stack(ys, dim=-1)
        if D is not None:
            y = y + D[k].to(dtype)[:, None] * uk
        outputs.append(from_sequence(y, order, spatial))
        states.append(h)
    out = torch.stack(outputs, dim=1)  # (B, K, C, *S)
    if z is not None:
        out = out * F.silu(z.to(dtype)).unsqueeze(1)
    if merge == "sum":
        out = out.sum(dim=1)
    last_state = torch.stack(states, dim=1) if return_last_state else None
    return out.to(u.dtype), last_state
