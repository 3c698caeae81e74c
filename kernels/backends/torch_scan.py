"""Pure-PyTorch selective scan for CPU users and as the fallback on any device.

Algorithm (two-level chunked scan, numerically stable at any Δ):

1. Each order's sequence is cut into ``nc`` chunks of ``T`` steps (``T ≈ √(L/8)``) and laid out step-major,
   ``(T, B, K, G, C/G, nc)``, so that step t of *every* chunk is one contiguous slice.
2. Pass 1 walks the T steps once, advancing all chunks together from a zero state; it keeps only each chunk's
   end state. The recurrence only ever multiplies by decays ``exp(Δ·A) ∈ (0, 1]`` and adds, so nothing can
   overflow (cumulative-sum formulations divide by a running decay and blow up for large Δ·|A|).
3. A carry pass over the nc chunk ends gives each chunk's start state, using the chunk decay
   ``exp(A·ΣΔ)``.
4. Pass 2 walks the T steps again from the true start states and emits ``y_t = Σ_n C_t·h_t``.

Memory: the hidden state is never materialised for the whole sequence. The largest buffers hold one step of
all chunks, ``B·K·C·N·nc`` values, i.e. 1/T of the full ``(B, C, L, N)`` state; when even that exceeds
``MEMORY_BUDGET_BYTES`` the chunks are processed in groups. The backward recomputes the states chunk group by
chunk group from the saved chunk-start states (the strategy of mamba_ssm's CUDA kernel) and runs the adjoint
recurrence ``λ_t = C_t·dy_t + exp(Δ_{t+1}·A)·λ_{t+1}`` with the same chunk/carry structure in reverse.

Only the recurrence (steps 1-4) is a custom autograd Function; softplus, the D skip, the z gate, the scan-order
permutations and the merge are ordinary differentiable tensor ops around it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from medmamba.kernels.orders import ScanOrder, from_sequence, to_sequence

__all__ = ["MEMORY_BUDGET_BYTES", "scan"]

#: Upper bound, in bytes, for the per-group working buffers of the chunked scan (forward and backward).
MEMORY_BUDGET_BYTES = 256 * 2**20


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
    """Chunked scan over canonical shapes (see ``kernels/scan.py``: u, delta ``(B, K, C, *S)``, …)."""
    dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    spatial = tuple(u.shape[3:])
    nd = len(spatial)
    K = len(orders)

    def sequences(x: torch.Tensor) -> torch.Tensor:
        # (B, K, ..., *S) -> (B, K, ..., L) with each order's own visiting order
        return torch.stack([to_sequence(x[:, k].to(dtype), orders[k], nd) for k in range(K)], dim=1)

    u_seq = sequences(u)
    dt = delta.to(dtype)
    if delta_bias is not None:
        dt = dt + delta_bias.to(dtype).reshape(1, K, -1, *([1] * nd))
    if delta_softplus:
        dt = F.softplus(dt)
    y_seq, last_state = _ChunkedRecurrence.apply(
        u_seq, sequences(dt), A.to(dtype), sequences(B), sequences(C), MEMORY_BUDGET_BYTES
    )
    y = torch.stack([from_sequence(y_seq[:, k], orders[k], spatial) for k in range(K)], dim=1)  # (B, K, C, *S)
    if D is not None:
        y = y + D.to(dtype).reshape(1, K, -1, *([1] * nd)) * u.to(dtype)
    if z is not None:
        y = y * F.silu(z.to(dtype)).unsqueeze(1)
    if merge == "sum":
        y = y.sum(dim=1)
    return y.to(u.dtype), (last_state if return_last_state else None)


def _chunk_length(L: int) -> int:
    # Balances the 2·T sequential steps (Python overhead each) against the nc-step carry pass.
    return max(1, min(L, round(math.sqrt(L / 8))))


class _Layout:
    """Step-major chunk layout ``(T, B, K, G, C/G, nc)`` of sequences ``(B, K, C, L)``, padded to ``nc·T``."""

    def __init__(self, u: torch.Tensor, groups: int) -> None:
        self.batch, self.orders, self.channels, self.length = u.shape
        self.groups = groups
        self.T = _chunk_length(self.length)
        self.nc = -(-self.length // self.T)

    def channel_major(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, C, L) -> (T, B, K, G, C/G, nc)."""
        x = F.pad(x, (0, self.nc * self.T - self.length))
        x = x.reshape(self.batch, self.orders, self.groups, -1, self.nc, self.T)
        return x.permute(5, 0, 1, 2, 3, 4).contiguous()

    def group_major(self, x: torch.Tensor) -> torch.Tensor:
        """(B, K, G, N, L) -> (T, B, K, G, 1, nc, N): broadcasts against states (B, K, G, C/G, nc, N)."""
        x = F.pad(x, (0, self.nc * self.T - self.length))
        x = x.reshape(self.batch, self.orders, self.groups, x.shape[3], self.nc, self.T)
        return x.permute(5, 0, 1, 2, 4, 3).unsqueeze(4).contiguous()

    def channel_major_back(self, x: torch.Tensor) -> torch.Tensor:
        """(T, B, K, G, C/G, nc) -> (B, K, C, L)."""
        x = x.permute(1, 2, 3, 4, 5, 0).reshape(self.batch, self.orders, self.channels, -1)
        return x[..., : self.length]

    def group_major_back(self, x: torch.Tensor) -> torch.Tensor:
        """(T, B, K, G, 1, nc, N) -> (B, K, G, N, L)."""
        x = x.squeeze(4).permute(1, 2, 3, 5, 4, 0).reshape(self.batch, self.orders, self.groups, x.shape[-1], -1)
        return x[..., : self.length]

    def group_size(self, per_chunk_bytes: int, budget: int) -> int:
        """How many chunks one group may hold so that the group's buffers stay within the budget."""
        return max(1, min(self.nc, budget // max(per_chunk_bytes, 1)))


class _ChunkedRecurrence(torch.autograd.Function):
    """``y_t = Σ_n C_t·h_t`` with ``h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·u_t·B_t`` over sequences.

    Inputs: u, dt ``(B, K, C, L)`` (dt already softplus'ed), A ``(K, C, N)``, B, C ``(B, K, G, N, L)``, all in
    the compute dtype. Outputs: y ``(B, K, C, L)``, last state ``(B, K, C, N)``.
    Saved for backward: the inputs in chunk layout and the chunk-start states ``(B, K, G, C/G, nc, N)``.
    """

    @staticmethod
    def forward(ctx, u, dt, A, Bm, Cm, budget):  # type: ignore[override]
        lay = _Layout(u, Bm.shape[2])
        N = A.shape[-1]
        U, DT = lay.channel_major(u), lay.channel_major(dt)
        DTU = DT * U
        Bc, Cc = lay.group_major(Bm), lay.group_major(Cm)
        Ab = A.reshape(1, lay.orders, lay.groups, -1, 1, N)
        state_shape = (lay.batch, lay.orders, lay.groups, lay.channels // lay.groups)

        chunk_decay = torch.exp(DT.sum(0).unsqueeze(-1) * Ab)  # (B, K, G, C/G, nc, N)
        per_chunk = 4 * math.prod(state_shape) * N * u.element_size()
        ng = lay.group_size(per_chunk, budget)
        ends = torch.empty(*state_shape, lay.nc, N, dtype=u.dtype, device=u.device)
        for c0 in range(0, lay.nc, ng):
            sl = slice(c0, c0 + ng)
            ends[..., sl, :] = _advance(
                torch.zeros_like(ends[..., sl, :]), DT[..., sl], DTU[..., sl], Ab, Bc[..., sl, :]
            )

        starts = torch.empty_like(ends)
        carry = torch.zeros_like(ends[..., 0, :])
        for c in range(lay.nc):
            starts[..., c, :] = carry
            carry = chunk_decay[..., c, :] * carry + ends[..., c, :]

        Y = torch.empty_like(U)
        for c0 in range(0, lay.nc, ng):
            sl = slice(c0, c0 + ng)
            _advance(
                starts[..., sl, :].clone(), DT[..., sl], DTU[..., sl], Ab, Bc[..., sl, :], Cc[..., sl, :], Y[..., sl]
            )

        ctx.save_for_backward(U, DT, A, Bc, Cc, starts, chunk_decay)
        ctx.layout, ctx.budget = lay, budget
        return lay.channel_major_back(Y), carry.reshape(lay.batch, lay.orders, lay.channels, N)

    @staticmethod
    def backward(ctx, grad_y, grad_last):  # type: ignore[override]
        U, DT, A, Bc, Cc, starts, chunk_decay = ctx.saved_tensors
        lay: _Layout = ctx.layout
        N = A.shape[-1]
        Ab = A.reshape(1, lay.orders, lay.groups, -1, 1, N)
        GY = lay.channel_major(
            grad_y.to(U.dtype) if grad_y is not None else torch.zeros_like(lay.channel_major_back(U))
        )
        T = lay.T

        # Reverse pass 1: each chunk's adjoint from its own outputs only, carried to its start (times a_0).
        local = torch.empty_like(starts)
        per_chunk_fwd = 4 * starts[..., 0, :].numel() * U.element_size()
        ng = lay.group_size(per_chunk_fwd, ctx.budget)
        for c0 in range(0, lay.nc, ng):
            sl = slice(c0, c0 + ng)
            lam = torch.zeros_like(starts[..., sl, :])
            decay = torch.empty_like(lam)
            for t in range(T - 1, -1, -1):
                lam.addcmul_(GY[t, ..., sl].unsqueeze(-1), Cc[t, ..., sl, :])
                torch.mul(DT[t, ..., sl].unsqueeze(-1), Ab, out=decay)
                lam.mul_(decay.exp_())
            local[..., sl, :] = lam

        # Reverse carry: rho[c] = a·λ flowing into the last step of chunk c from everything after it.
        rho = torch.empty_like(starts)
        carry = (
            grad_last.to(U.dtype).reshape(rho[..., 0, :].shape)
            if grad_last is not None
            else torch.zeros_like(rho[..., 0, :])
        )
        for c in range(lay.nc - 1, -1, -1):
            rho[..., c, :] = carry
            carry = local[..., c, :] + chunk_decay[..., c, :] * carry

        dU, dDT = torch.empty_like(U), torch.empty_like(DT)
        dB, dC = torch.zeros_like(Bc), torch.zeros_like(Cc)
        dA = torch.zeros_like(starts[:, :, :, :, :1, :])  # (B, K, G, C/G, 1, N), summed over B at the end
        per_chunk_bwd = (T + 8) * starts[..., 0, :].numel() * U.element_size()
        ng = lay.group_size(per_chunk_bwd, ctx.budget)
        for c0 in range(0, lay.nc, ng):
            sl = slice(c0, c0 + ng)
            dA += _backward_group(
                U[..., sl], DT[..., sl], Ab, Bc[..., sl, :], Cc[..., sl, :], GY[..., sl],
                starts[..., sl, :], rho[..., sl, :],
                dU[..., sl], dDT[..., sl], dB[..., sl, :], dC[..., sl, :],
            )  # fmt: skip
        dA = dA.sum(dim=(0, 4)).reshape(A.shape)
        return (
            lay.channel_major_back(dU),
            lay.channel_major_back(dDT),
            dA,
            lay.group_major_back(dB),
            lay.group_major_back(dC),
            None,
        )


def _advance(h, DT, DTU, Ab, Bc, Cc=None, Y=None):
    """Run the recurrence over the T steps for one chunk group in place on ``h``; optionally write y into Y."""
    decay = torch.empty_like(h)
    for t in range(DT.shape[0]):
        torch.mul(DT[t].unsqueeze(-1), Ab, out=decay)
        h.mul_(decay.exp_()).addcmul_(DTU[t].unsqueeze(-1), Bc[t])
        if Y is not None:
            Y[t] = torch.linalg.vecdot(h, Cc[t])
    return h


def _backward_group(U, DT, Ab, Bc, Cc, GY, h0, rho, dU, dDT, dB, dC):
    """Gradients for one chunk group: recompute the states forward, then run the adjoint backward.

    Writes dU, dDT (T, B, K, G, C/G, ng) and dB, dC (T, B, K, G, 1, ng, N) in place; returns the group's
    contribution to dA, summed over its chunks: (B, K, G, C/G, 1, N). Every state-sized temporary is allocated
    once per group: fresh multi-megabyte tensors per step cost a page-faulting mmap each on the CPU.
    """
    T = DT.shape[0]
    states = torch.empty(T, *h0.shape, dtype=h0.dtype, device=h0.device)
    decay, scratch = torch.empty_like(h0), torch.empty_like(h0)
    h = h0
    for t in range(T):
        torch.mul(DT[t].unsqueeze(-1), Ab, out=decay)
        torch.mul(h, decay.exp_(), out=states[t])
        h = states[t].addcmul_((DT[t] * U[t]).unsqueeze(-1), Bc[t])
        torch.mul(GY[t].unsqueeze(-1), h, out=scratch)
        torch.sum(scratch, dim=3, keepdim=True, out=dC[t])

    lam = rho.clone()
    dA = torch.zeros_like(h0)
    for t in range(T - 1, -1, -1):
        lam.addcmul_(GY[t].unsqueeze(-1), Cc[t])  # λ_t
        torch.mul(DT[t].unsqueeze(-1), Ab, out=decay)
        decay.exp_()
        lam_B = torch.linalg.vecdot(lam, Bc[t])  # Σ_n λ·B
        dU[t] = DT[t] * lam_B
        torch.mul(lam, (DT[t] * U[t]).unsqueeze(-1), out=scratch)
        torch.sum(scratch, dim=3, keepdim=True, out=dB[t])
        torch.mul(lam, states[t - 1] if t > 0 else h0, out=scratch)
        scratch.mul_(decay)  # ∂L/∂(Δ·A) through a_t = exp(Δ·A)
        dDT[t] = U[t] * lam_B + torch.linalg.vecdot(scratch, Ab)
        dA.addcmul_(scratch, DT[t].unsqueeze(-1))
        lam.mul_(decay)  # a_t·λ_t flows into step t-1
    return dA.sum(dim=4, keepdim=True)
