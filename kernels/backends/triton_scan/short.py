"""One-launch forward for short calls that need no gradient: a lane per (channel, state).

The chunk passes (forward.py) give each thread a channel and its N states. At U-Mamba's and SegMamba's 16³ stages
(4,096 tokens, 384-512 channels, batch 2) that is 24-32 warps a batch entry, so each sequence is cut into segments,
and a call takes three launches (segment pass, carry, main pass). There the GPU waits for the host's launches.

Here a warp holds ``32 / N`` channels × N states, one per lane, and walks the whole sequence in chunks of 16 tokens:
N times more warps, and no segments, so no carry and one launch. The recurrence of a (channel, state) pair runs
along the chunk inside its thread; ``y = Σ_n C·h`` is a sum over the N lanes of a channel.

It takes calls that save nothing for a backward (``save=False``), of one order (``K = 1``), at most
``PassConfig.short_max_length`` tokens, with N a power of two up to 32: an opt-in path (``short_max_length = 0``
by default) until timed on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from . import configs, layout
from .common import _linear_combine, _order_row, _softplus, _token_offsets
from .launch import Launcher


@triton.jit
def _fwd_short_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, out_ptr, last_ptr, order_ptr,
    L, CH, N, K, CPG,
    su_b, su_k, su_c, sd_b, sd_k, sd_c,
    sB_b, sB_k, sB_g, sB_n, sC_b, sC_k, sC_g, sC_n,
    sz_b, sz_c, so_b, so_c,
    CHP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, GATE: tl.constexpr,
):  # fmt: skip
    # A program: (b, k) and CHP channels of one group, all their states; tiles (T, CHP, N) with T in each thread's
    # registers (the scan along it stays in the thread) and (channel, state) across lanes and warps.
    pid = tl.program_id(0)
    bk = tl.program_id(1)
    b = (bk // K).to(tl.int64)
    k = bk % K
    c = pid * CHP + tl.arange(0, CHP)
    c_ok = c < CH
    c64 = c.to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    grp = ((pid * CHP) // CPG).to(tl.int64)
    fast, mid, st_fast, st_mid, st_slow, rev = _order_row(order_ptr, k)
    cn_ok = c_ok[:, None] & n_ok[None, :]
    A2 = tl.load(A_ptr + (k * CH + c64)[:, None] * N + n[None, :], mask=cn_ok, other=0.0) * 1.4426950408889634
    bias = tl.zeros([CHP], dtype=tl.float32)
    Dv = tl.zeros([CHP], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * CH + c, mask=c_ok, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + k * CH + c, mask=c_ok, other=0.0)
    u_rows = u_ptr + b * su_b + k * su_k + c64 * su_c
    d_rows = dl_ptr + b * sd_b + k * sd_k + c64 * sd_c
    z_rows = z_ptr + b * sz_b + c64 * sz_c
    o_rows = out_ptr + b * so_b + c64 * so_c
    B_rows = B_ptr + b * sB_b + k * sB_k + grp * sB_g + n.to(tl.int64) * sB_n
    C_rows = C_ptr + b * sC_b + k * sC_k + grp * sC_g + n.to(tl.int64) * sC_n
    t = tl.arange(0, BLOCK_T)
    h = tl.zeros([CHP, BLOCK_N], dtype=tl.float32)
    for q0 in range(0, L, BLOCK_T):
        q = q0 + t
        valid = q < L
        lin = _token_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev)  # (T,) offsets in the natural layout
        tok = valid[:, None] & c_ok[None, :]
        u = tl.load(u_rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)  # (T, CHP)
        dt = tl.load(d_rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias[None, :]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(tok, dt, 0.0)  # padding tokens: exp(0·A) = 1 and Δ·u·B = 0 carry the state unchanged
        tn = valid[:, None] & n_ok[None, :]
        Bn = tl.load(B_rows[None, :] + lin[:, None], mask=tn, other=0.0).to(tl.float32)  # (T, N)
        Cn = tl.load(C_rows[None, :] + lin[:, None], mask=tn, other=0.0).to(tl.float32)
        a = tl.exp2(dt[:, :, None] * A2[None, :, :])  # (T, CHP, N)
        x = (dt * u)[:, :, None] * Bn[:, None, :]
        decay, local = tl.associative_scan((a, x), 0, _linear_combine)
        hs = local + decay * h[None, :, :]
        y = tl.sum(hs * Cn[:, None, :], axis=2)  # (T, CHP): the sum over a channel's state lanes
        if HAS_D:
            y += Dv[None, :] * u
        if GATE:
            zz = tl.load(z_rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(o_rows[None, :] + lin[:, None], y.to(out_ptr.dtype.element_ty), mask=tok)
        h = tl.sum(tl.where((t == BLOCK_T - 1)[:, None, None], hs, 0.0), axis=0)
    tl.store(last_ptr + (bk * CH + c64)[:, None] * N + n[None, :], h, mask=cn_ok)


_short_launch = Launcher(_fwd_short_kernel)


@dataclass(frozen=True)
class ShortLaunch:
    """What a short call's launch takes besides its tensors (derived once per call signature, as forward._Launch)."""

    plan: object  # forward.Plan
    grid: tuple[int, int]
    table: torch.Tensor
    strides: tuple[int, ...]
    flags: dict
    out_shape: tuple[int, ...]
    sites: dict = field(default_factory=dict, compare=False, repr=False)  # the launch's kernel (Launcher.at)


def channels_per_program(N: int, cfg: configs.PassConfig) -> int:
    """Channels a program holds: ``32 / N`` a warp (N rounded up to a power of two), times its warps."""
    return max(1, 32 // layout.next_power_of_2(N)) * cfg.short_warps


def eligible(p, cfg: configs.PassConfig, save: bool, out: torch.Tensor | None) -> bool:
    """Whether a call with plan ``p`` (forward.Plan) runs here: short, one order, nothing saved, N ≤ 32."""
    if save or out is not None or p.K != 1 or not 0 < p.L <= cfg.short_max_length or p.N > 32:
        return False
    chp = channels_per_program(p.N, cfg)
    return p.groups == 1 or (p.channels // p.groups) % chp == 0  # a program's channels share one group's B and C


def settings(p, u, delta, B, C, z, D, delta_bias, orders, delta_softplus: bool, merge: str, cfg: configs.PassConfig):
    """The :class:`ShortLaunch` of an eligible call (canonical tensors, see forward.forward)."""
    chp = channels_per_program(p.N, cfg)
    z_arg = z if z is not None else u
    strides = (
        u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
        B.stride(0), B.stride(1), B.stride(2), B.stride(3), C.stride(0), C.stride(1), C.stride(2), C.stride(3),
        z_arg.stride(0), z_arg.stride(1), p.channels * p.L, p.L,
    )  # fmt: skip
    flags = {
        "CHP": chp, "BLOCK_N": layout.next_power_of_2(p.N), "BLOCK_T": p.block_t, "HAS_D": D is not None,
        "HAS_BIAS": delta_bias is not None, "SOFTPLUS": delta_softplus, "GATE": z is not None,
        "num_warps": cfg.short_warps,
    }  # fmt: skip
    return ShortLaunch(
        plan=p,
        grid=(layout.cdiv(p.channels, chp), p.batch * p.K),
        table=layout.order_table(orders, p.spatial, u.device),
        strides=strides,
        flags=flags,
        out_shape=(p.batch, p.channels, *p.spatial) if merge == "sum" else (p.batch, 1, p.channels, *p.spatial),
    )


def run(launch: ShortLaunch, u, delta, A, B, C, D, z, delta_bias) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, last_state)`` of a short call (one launch).

    out ``(B, C, *S)`` (``(B, 1, C, *S)`` stacked) in u's dtype; the state after the last token ``(B, K, C, N)``, fp32.
    """
    p, dev = launch.plan, u.device
    out = torch.empty(launch.out_shape, device=dev, dtype=u.dtype)
    last = torch.empty(p.batch, p.K, p.channels, p.N, device=dev, dtype=torch.float32)
    A = A.float().contiguous()
    Dv = D.float().contiguous() if D is not None else A
    bias = delta_bias.float().contiguous() if delta_bias is not None else A
    _short_launch.at(launch.sites, "short", launch.grid)(
        u, delta, A, B, C, Dv, bias, z if z is not None else u, out, last, launch.table,
        p.L, p.channels, p.N, p.K, p.channels // p.groups, *launch.strides, **launch.flags,
    )  # fmt: skip
    return out, last
