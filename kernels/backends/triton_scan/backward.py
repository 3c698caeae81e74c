"""Backward kernels of the Triton selective scan and their launcher: recomputation from fp32 chunk states.

With g_t = ∂L/∂y_t (the output gradient times silu(z)) the adjoint of the state is a reverse recurrence::

    λ_t = g_t·C_t + exp(Δ_{t+1}·A)·λ_{t+1}          (λ after the last token: ∂L/∂last_state)
    ∂u_t = Δ_t·Σ_n λ_t·B_t + D·g_t                  ∂B_t = Σ_c λ_t·Δ_t·u_t        ∂C_t = Σ_c g_t·h_t
    ∂Δ_t = u_t·Σ_n λ_t·B_t + Σ_n λ_t·(h_t − Δ_t·u_t·B_t)·A        (a_t·h_{t-1} = h_t − Δ_t·u_t·B_t)
    ∂A = Σ_t λ_t·(h_t − Δ_t·u_t·B_t)·Δ_t    ∂D = Σ_t g_t·u_t    ∂delta = ∂Δ·sigmoid(delta + bias)

A program walks its chunks from last to first (same channel blocks, chunk size and segments logic as the
forward). Per chunk it recomputes h from the saved chunk-start state with the forward scan, then λ with one
reverse ``tl.associative_scan`` over triples (see common._adjoint_combine, which gives λ_t without shifting any
tile by one token), with the adjoint flowing in from the next chunk, ρ = a_{t1}·λ_{t1}, kept in a small fp32
buffer. dB and dC are summed over the program's channels in registers and written once per chunk; dA, dD and
d(delta_bias) are written per chunk and summed on the host — everything deterministic, no atomics.

Segments: ``_bwd_segment_kernel`` computes each segment's outgoing adjoint from zero without scanning
(``ρ = Σ_t exp(A·Σ_{j≤t} Δ_j)·g_t·C_t``), ``_bwd_carry_kernel`` chains them from the last segment backwards.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from medmamba.kernels.orders import ScanOrder

from . import configs, layout
from .common import _adjoint_combine, _linear_combine, _order_row, _softplus, _token_offsets
from .forward import Plan, split

__all__ = ["backward"]


@triton.jit
def _bwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, gy_ptr, state_ptr, rho_ptr, order_ptr,
    du_ptr, ddl_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    L, CH, N, K, G, CPG, nchunks, cps, nsplit,
    su_b, su_k, su_c, sd_b, sd_k, sd_c,
    sB_b, sB_k, sB_g, sB_n, sC_b, sC_k, sC_g, sC_n,
    sz_b, sz_c, sg_b, sg_k, sg_c,
    RC: tl.constexpr, SUB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    # Tiles (T, N, SUB) as in the forward. dB/dC terms are accumulated per lane over the RC/SUB sub-blocks and
    # summed across the lanes once per chunk.
    pid_blk = tl.program_id(0)
    seg = tl.program_id(1)
    bk = tl.program_id(2)
    b = (bk // K).to(tl.int64)
    k = bk % K
    c0 = pid_blk * RC
    grp = c0 // CPG
    blk_in_grp = (c0 % CPG) // RC
    bpg = CPG // RC
    fast, mid, st_fast, st_mid, st_slow, rev = _order_row(order_ptr, k)
    first = seg * cps
    last = tl.minimum(first + cps, nchunks)

    t = tl.arange(0, BLOCK_T)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    B_base = B_ptr + b * sB_b + k * sB_k + grp.to(tl.int64) * sB_g
    C_base = C_ptr + b * sC_b + k * sC_k + grp.to(tl.int64) * sC_g
    part_row = ((bk.to(tl.int64) * G + grp) * bpg + blk_in_grp) * N  # dB/dC partials (B, K, G, BPG, N, L)
    for i in range(last - first):
        c = last - 1 - i
        q = c * BLOCK_T + t
        valid = q < L
        lin = _token_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev)
        tok = valid[:, None]
        bc_mask = tok & n_ok[None, :]
        Bt = tl.load(B_base + n[None, :] * sB_n + lin[:, None], mask=bc_mask, other=0.0).to(tl.float32)  # (T, N)
        Ct = tl.load(C_base + n[None, :] * sC_n + lin[:, None], mask=bc_mask, other=0.0).to(tl.float32)
        dB_acc = tl.zeros([BLOCK_T, BLOCK_N, SUB], dtype=tl.float32)
        dC_acc = tl.zeros([BLOCK_T, BLOCK_N, SUB], dtype=tl.float32)
        for sb in range(RC // SUB):
            ch = c0 + sb * SUB + tl.arange(0, SUB)
            ch64 = ch.to(tl.int64)
            u = tl.load((u_ptr + b * su_b + k * su_k + ch64 * su_c)[None, :] + lin[:, None], mask=tok, other=0.0)
            u = u.to(tl.float32)  # (T, SUB)
            pre = tl.load((dl_ptr + b * sd_b + k * sd_k + ch64 * sd_c)[None, :] + lin[:, None], mask=tok, other=0.0)
            pre = pre.to(tl.float32)
            if HAS_BIAS:
                pre += tl.load(bias_ptr + k * CH + ch)[None, :]
            if SOFTPLUS:
                dt = _softplus(pre)
            else:
                dt = pre
            dt = tl.where(tok, dt, 0.0)
            gy = tl.load((gy_ptr + b * sg_b + k * sg_k + ch64 * sg_c)[None, :] + lin[:, None], mask=tok, other=0.0)
            gy = gy.to(tl.float32)
            if HAS_Z:
                zz = tl.load((z_ptr + b * sz_b + ch64 * sz_c)[None, :] + lin[:, None], mask=tok, other=0.0)
                zz = zz.to(tl.float32)
                gy = gy * zz * tl.sigmoid(zz)
            A = tl.load(A_ptr + (k * CH + ch64)[None, :] * N + n[:, None], mask=n_ok[:, None], other=0.0)  # (N, SUB)

            # recompute the states of this chunk from its saved start state
            a = tl.exp(dt[:, None, :] * A[None, :, :])  # (T, N, SUB)
            x = (dt * u)[:, None, :] * Bt[:, :, None]
            decay, h_local = tl.associative_scan((a, x), 0, _linear_combine)
            chan_row = bk * CH + ch64  # (SUB,)
            h0 = tl.load(
                state_ptr + (chan_row * nchunks + c)[None, :] * N + n[:, None], mask=n_ok[:, None] & (c > 0), other=0.0
            )
            h = h_local + decay * h0[None, :, :]

            # adjoint, with ρ flowing in from the next chunk
            rho_ptrs = rho_ptr + (chan_row * nsplit + seg)[None, :] * N + n[:, None]
            rho = tl.load(rho_ptrs, mask=n_ok[:, None], other=0.0)  # (N, SUB)
            gC = gy[:, None, :] * Ct[:, :, None]
            ones = tl.full([BLOCK_T, BLOCK_N, SUB], 1.0, tl.float32)
            after, _, lam_local = tl.associative_scan((ones, a, gC), 0, _adjoint_combine, reverse=True)
            lam = lam_local + after * rho[None, :, :]
            tl.store(rho_ptrs, tl.sum(tl.where(t[:, None, None] == 0, a * lam, 0.0), axis=0), mask=n_ok[:, None])

            dtu = dt * u
            dC_acc += gy[:, None, :] * h
            dB_acc += lam * dtu[:, None, :]
            lam_B = tl.sum(lam * Bt[:, :, None], axis=1)  # (T, SUB)
            du = dt * lam_B
            if HAS_D:
                du += tl.load(D_ptr + k * CH + ch)[None, :] * gy
            through_decay = lam * (h - x)  # λ_t·a_t·h_{t-1}
            ddt = u * lam_B + tl.sum(through_decay * A[None, :, :], axis=1)
            if SOFTPLUS:
                ddt = ddt * tl.sigmoid(pre)
            ddt = tl.where(tok, ddt, 0.0)
            tok_rows = (bk * CH + ch64) * L  # du/ddelta are (B, K, C, L) contiguous
            tl.store(du_ptr + tok_rows[None, :] + lin[:, None], du, mask=tok)
            tl.store(ddl_ptr + tok_rows[None, :] + lin[:, None], ddt, mask=tok)
            part = chan_row * nchunks + c  # (SUB,) rows of the per-chunk partials
            dA_c = tl.sum(through_decay * dt[:, None, :], axis=0)  # (N, SUB)
            tl.store(dA_ptr + part[None, :] * N + n[:, None], dA_c, mask=n_ok[:, None])
            if HAS_D:
                tl.store(dD_ptr + part, tl.sum(gy * u, axis=0))
            if HAS_BIAS:
                tl.store(dbias_ptr + part, tl.sum(ddt, axis=0))
        dB = tl.sum(dB_acc, axis=2)  # (T, N)
        tl.store(dB_ptr + (part_row + n[None, :]) * L + lin[:, None], dB, mask=bc_mask)
        dC = tl.sum(dC_acc, axis=2)
        tl.store(dC_ptr + (part_row + n[None, :]) * L + lin[:, None], dC, mask=bc_mask)
        # the previous chunk reads the ρ stored above, possibly from other threads
        tl.debug_barrier()


@triton.jit
def _bwd_segment_kernel(
    dl_ptr, A_ptr, C_ptr, bias_ptr, z_ptr, gy_ptr, seg_rho_ptr, seg_dt_ptr, order_ptr,
    L, CH, N, K, CPG, nchunks, cps, nsplit,
    sd_b, sd_k, sd_c, sC_b, sC_k, sC_g, sC_n, sz_b, sz_c, sg_b, sg_k, sg_c,
    SUB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    pid_blk = tl.program_id(0)
    seg = tl.program_id(1)
    bk = tl.program_id(2)
    b = (bk // K).to(tl.int64)
    k = bk % K
    c0 = pid_blk * SUB
    grp = (c0 // CPG).to(tl.int64)
    fast, mid, st_fast, st_mid, st_slow, rev = _order_row(order_ptr, k)
    first = seg * cps
    last = tl.minimum(first + cps, nchunks)

    t = tl.arange(0, BLOCK_T)
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    ch = c0 + tl.arange(0, SUB)
    ch64 = ch.to(tl.int64)
    A = tl.load(A_ptr + (k * CH + ch64)[None, :] * N + n[:, None], mask=n_ok[:, None], other=0.0)  # (N, SUB)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * CH + ch)
    d_rows = dl_ptr + b * sd_b + k * sd_k + ch64 * sd_c
    g_rows = gy_ptr + b * sg_b + k * sg_k + ch64 * sg_c
    z_rows = z_ptr + b * sz_b + ch64 * sz_c
    C_base = C_ptr + b * sC_b + k * sC_k + grp * sC_g
    r = tl.zeros([BLOCK_N, SUB], dtype=tl.float32)
    dt_sum = tl.zeros([SUB], dtype=tl.float32)
    for i in range(last - first):
        c = last - 1 - i
        q = c * BLOCK_T + t
        valid = q < L
        lin = _token_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev)
        tok = valid[:, None]
        Ct = tl.load(C_base + n[None, :] * sC_n + lin[:, None], mask=tok & n_ok[None, :], other=0.0).to(tl.float32)
        dt = tl.load(d_rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias[None, :]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(tok, dt, 0.0)
        gy = tl.load(g_rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)
            gy = gy * zz * tl.sigmoid(zz)
        total = tl.sum(dt, axis=0)
        upto = tl.cumsum(dt, axis=0)  # Σ_{j≤t} Δ_j from the chunk start
        w = tl.exp(A[None, :, :] * upto[:, None, :])
        r = tl.exp(A * total[None, :]) * r + tl.sum(w * gy[:, None, :] * Ct[:, :, None], axis=0)
        dt_sum += total
    seg_row = (bk * CH + ch64) * nsplit + seg
    tl.store(seg_rho_ptr + seg_row[None, :] * N + n[:, None], r, mask=n_ok[:, None])
    tl.store(seg_dt_ptr + seg_row, dt_sum)


@triton.jit
def _bwd_carry_kernel(A_ptr, seg_rho_ptr, seg_dt_ptr, rho_ptr, CH, N, K, nsplit, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (b·K + k)·CH + c
    k = (row // CH) % K
    c = row % CH
    n = tl.arange(0, BLOCK_N)
    n_ok = n < N
    A = tl.load(A_ptr + (k * CH + c) * N + n, mask=n_ok, other=0.0)
    r = tl.load(rho_ptr + (row * nsplit + nsplit - 1) * N + n, mask=n_ok, other=0.0)
    for i in range(nsplit - 1):
        s = nsplit - 1 - i
        dt_sum = tl.load(seg_dt_ptr + row * nsplit + s)
        r = tl.load(seg_rho_ptr + (row * nsplit + s) * N + n, mask=n_ok, other=0.0) + tl.exp(A * dt_sum) * r
        tl.store(rho_ptr + (row * nsplit + s - 1) * N + n, r, mask=n_ok)


def backward(
    grad_out: torch.Tensor | None,
    grad_last: torch.Tensor | None,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    states: torch.Tensor,
    pre_gate: torch.Tensor | None,
    *,
    p: Plan,
    orders: Sequence[ScanOrder],
    delta_softplus: bool,
    merge: str,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` in the canonical shapes of the inputs."""
    dev = u.device
    nd = len(p.spatial)
    cfg = configs.backward_config(p.L)
    sub, rc, nsplit, cps = split(p, cfg, dev)
    seg_sub = layout.channel_blocking(p.channels, p.groups, cfg.sub, cfg.sub)[0]
    table = layout.order_table(orders, p.spatial, dev)
    A32 = A.float().contiguous()
    Dv = D.float().contiguous() if D is not None else A32
    bias = delta_bias.float().contiguous() if delta_bias is not None else A32
    z_arg = z if z is not None else u

    if grad_out is None:
        grad_out = torch.zeros(
            (p.batch, p.channels, *p.spatial) if merge == "sum" else (p.batch, p.K, p.channels, *p.spatial),
            device=dev,
            dtype=u.dtype,
        )
    gy = layout.natural_spatial(grad_out, nd)
    if merge == "sum":  # every order sees the same output gradient
        g_b, g_k, g_c = gy.stride(0), 0, gy.stride(1)
    else:
        g_b, g_k, g_c = gy.stride(0), gy.stride(1), gy.stride(2)

    bpg = p.cpg // rc
    du = torch.empty(p.batch, p.K, p.channels, *p.spatial, device=dev, dtype=u.dtype)
    ddelta = torch.empty(p.batch, p.K, p.channels, *p.spatial, device=dev, dtype=delta.dtype)
    dB_part = torch.empty(p.batch, p.K, p.groups, bpg, p.N, *p.spatial, device=dev, dtype=torch.float32)
    dC_part = torch.empty_like(dB_part)
    dA_part = torch.empty(p.batch, p.K, p.channels, p.nchunks, p.N, device=dev, dtype=torch.float32)
    dD_part = torch.empty(p.batch, p.K, p.channels, p.nchunks, device=dev, dtype=torch.float32)
    dbias_part = torch.empty_like(dD_part)
    rho = torch.empty(p.batch, p.K, p.channels, nsplit, p.N, device=dev, dtype=torch.float32)
    if grad_last is not None:
        rho[..., -1, :] = grad_last
    else:
        rho[..., -1, :] = 0
    grid = (p.channels // rc, nsplit, p.batch * p.K)

    if nsplit > 1:
        seg_rho = torch.empty(p.batch, p.K, p.channels, nsplit, p.N, device=dev, dtype=torch.float32)
        seg_dt = torch.empty(p.batch, p.K, p.channels, nsplit, device=dev, dtype=torch.float32)
        _bwd_segment_kernel[(p.channels // seg_sub, nsplit, p.batch * p.K)](
            delta, A32, C, bias, z_arg, gy, seg_rho, seg_dt, table,
            p.L, p.channels, p.N, p.K, p.cpg, p.nchunks, cps, nsplit,
            delta.stride(0), delta.stride(1), delta.stride(2), C.stride(0), C.stride(1), C.stride(2), C.stride(3),
            z_arg.stride(0), z_arg.stride(1), g_b, g_k, g_c,
            SUB=seg_sub, BLOCK_T=p.block_t, BLOCK_N=p.block_n, HAS_BIAS=delta_bias is not None,
            HAS_Z=z is not None, SOFTPLUS=delta_softplus, num_warps=cfg.num_warps,
        )  # fmt: skip
        _bwd_carry_kernel[(p.batch * p.K * p.channels,)](
            A32, seg_rho, seg_dt, rho, p.channels, p.N, p.K, nsplit, BLOCK_N=p.block_n, num_warps=1
        )

    _bwd_kernel[grid](
        u, delta, A32, B, C, Dv, bias, z_arg, gy, states, rho, table,
        du, ddelta, dB_part, dC_part, dA_part, dD_part, dbias_part,
        p.L, p.channels, p.N, p.K, p.groups, p.cpg, p.nchunks, cps, nsplit,
        u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
        B.stride(0), B.stride(1), B.stride(2), B.stride(3), C.stride(0), C.stride(1), C.stride(2), C.stride(3),
        z_arg.stride(0), z_arg.stride(1), g_b, g_k, g_c,
        RC=rc, SUB=sub, BLOCK_T=p.block_t, BLOCK_N=p.block_n, HAS_D=D is not None,
        HAS_BIAS=delta_bias is not None, HAS_Z=z is not None, SOFTPLUS=delta_softplus, num_warps=cfg.num_warps,
    )  # fmt: skip

    dA = dA_part.sum(dim=(0, 3)).to(A.dtype)
    dD = dD_part.sum(dim=(0, 3)).to(D.dtype) if D is not None else None
    dbias = dbias_part.sum(dim=(0, 3)).to(delta_bias.dtype) if delta_bias is not None else None
    dB = (dB_part[:, :, :, 0] if bpg == 1 else dB_part.sum(dim=3)).to(B.dtype)
    dC = (dC_part[:, :, :, 0] if bpg == 1 else dC_part.sum(dim=3)).to(C.dtype)
    dz = None
    if z is not None:
        zf = z.float()
        sig = torch.sigmoid(zf)
        dsilu = sig * (1 + zf * (1 - sig))
        if merge == "sum":
            dz = (gy.float() * pre_gate.float() * dsilu).to(z.dtype)
        else:
            dz = ((gy.float() * pre_gate.float()).sum(dim=1) * dsilu).to(z.dtype)
    return du, ddelta, dA, dB, dC, dD, dz, dbias
