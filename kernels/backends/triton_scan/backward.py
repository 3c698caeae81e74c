"""Backward kernels of the Triton selective scan and their launcher: recomputation from fp32 chunk states.

With g_t = ∂L/∂y_t (the output gradient times silu(z)) the adjoint of the state is a reverse recurrence::

    λ_t = g_t·C_t + exp(Δ_{t+1}·A)·λ_{t+1}          (λ after the last token: ∂L/∂last_state)
    ∂u_t = Δ_t·Σ_n λ_t·B_t + D·g_t                  ∂B_t = Σ_c λ_t·Δ_t·u_t        ∂C_t = Σ_c g_t·h_t
    ∂Δ_t = u_t·Σ_n λ_t·B_t + Σ_n λ_t·(h_t − Δ_t·u_t·B_t)·A        (a_t·h_{t-1} = h_t − Δ_t·u_t·B_t)
    ∂A = Σ_t λ_t·(h_t − Δ_t·u_t·B_t)·Δ_t    ∂D = Σ_t g_t·u_t    ∂delta = ∂Δ·sigmoid(delta + bias)

A program owns (b, k, one warp's 32 channels of a group, a segment), one thread per channel as in the forward, and
walks its chunks of 16 tokens from last to first in halves of 8 (the tokens in each thread's registers): the state
in the chunk's middle is recomputed from the saved chunk-start state (``exp(A·ΣΔ)·h_0 + Σ_t exp(A·Σ_{j>t}Δ_j)·x_t``,
no scan), then each half runs h forwards and λ backwards token by token — one FMA a step on rows split out of the
thread's tiles (common._split8; Triton's reverse associative_scan exchanged every step across the warp) — with
the adjoint flowing in from the next half, ρ = a_{t1}·λ_{t1}. On the GPU path of raster and reversed orders
(``VEC_MODE`` 1 and 3) that loop runs on the split rows alone, B_n and C_n by broadcast 16-byte loads (_states8): no
tile, so no layout change per state. The states are a run-time loop (unrolled, their tiles spill); ρ, the
middle state and dA live in fp32 slots laid out channels-fastest (each thread touches only its own: no barriers,
and a warp's access is one coalesced line). dB and dC are summed over the warp's channels and
written once per program; dA, dD and d(delta_bias) per segment; the host sums the partials — everything
deterministic, no atomics.

Segments: ``_bwd_segment_kernel`` computes each segment's outgoing adjoint from zero without scanning
(``ρ = Σ_t exp(A·Σ_{j≤t} Δ_j)·g_t·C_t``), ``_bwd_carry_kernel`` chains them from the last segment backwards.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from medmamba.kernels.orders import ScanOrder

from . import configs, layout
from .common import (
    _adjoint8,
    _chunk_offsets,
    _forward8,
    _halves,
    _join8,
    _linear_combine,
    _load_delta,
    _load_row,
    _load_tile,
    _order_row,
    _split8,
    _state_sums8,
    _store_tile,
    _token_offsets,
    _vload8,
)
from .forward import CARRY_CHANNELS, CARRY_WARPS, Part, Plan, _line_vector_length, carry_blocks, carry_grid, split
from .launch import Launcher
from .lines_backward import _bwd_lines_kernel, _bwd_lines_segment_kernel
from .ptx import _lane_id, _lane_sum8, _ld16, _prefetch, _slot_ld, _slot_st, _st1_if
from .tokens import _seg_chunk16

__all__ = ["backward", "grouped_backward"]


@triton.jit
def _half_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev, VEC_MODE: tl.constexpr):
    # Offsets of tokens q of an order. Under VEC_MODE 1 and 3 (raster or reversed raster orders, whole chunks) they
    # need no divisions; under 3 the direction is the order's.
    if VEC_MODE == 3:
        lin = tl.where(rev != 0, L - 1 - q, q)
    else:
        lin = _chunk_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev, VEC_MODE == 1)
    return lin


@triton.jit
def _in_token_order(rev, x0, x1, x2, x3, x4, x5, x6, x7, BOTH_WAYS: tl.constexpr):
    # 8 values loaded from a half's lowest offset up, in token order: descending when rev (BOTH_WAYS)
    if BOTH_WAYS:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if rev != 0:
            x0, x1, x2, x3, x4, x5, x6, x7 = x7, x6, x5, x4, x3, x2, x1, x0
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _row8(p, rev, BOTH_WAYS: tl.constexpr):
    # B_n or C_n of a half-chunk as 8 per-token vectors, every lane loading the same 16-byte words at p (the half's
    # lowest offset), in token order. As (8,) rows broadcast against the tiles, Triton spread them over lanes and
    # moved every product through shared memory, twice per state.
    x0, x1, x2, x3, x4, x5, x6, x7 = _vload8(p)
    return _in_token_order(rev, x0, x1, x2, x3, x4, x5, x6, x7, BOTH_WAYS)


@triton.jit
def _unpack8(w0, w1, w2, w3, rev, ELT: tl.constexpr, BOTH_WAYS: tl.constexpr):
    # _row8 from its four loaded words (16-bit elements)
    x0, x1 = _halves(w0, ELT)
    x2, x3 = _halves(w1, ELT)
    x4, x5 = _halves(w2, ELT)
    x6, x7 = _halves(w3, ELT)
    return _in_token_order(rev, x0, x1, x2, x3, x4, x5, x6, x7, BOTH_WAYS)


# fmt: off
@triton.jit
def _mid_tail8(A2, f0, f1, f2, f3, f4, f5, f6, f7, d0, d1, d2, d3, d4, d5, d6, d7, b0, b1, b2, b3, b4, b5, b6, b7):
    # Σ_t exp2(A2·f_t)·d_t·B_t over a half's 8 tokens (f_t = Σ_{j>t} Δ_j, d_t = Δ_t·u_t)
    s = tl.exp2(f0 * A2) * (d0 * b0) + tl.exp2(f1 * A2) * (d1 * b1)
    s += tl.exp2(f2 * A2) * (d2 * b2) + tl.exp2(f3 * A2) * (d3 * b3)
    s += tl.exp2(f4 * A2) * (d4 * b4) + tl.exp2(f5 * A2) * (d5 * b5)
    s += tl.exp2(f6 * A2) * (d6 * b6) + tl.exp2(f7 * A2) * (d7 * b7)
    return s


@triton.jit
def _states8(
    N, CH, L, A_rows, B_base, C_base, sB_n, sC_n, off, rev, start_ptr, has_start, rho_rows, dA_rows, dB_ptr, dC_ptr,
    part_row, lin_l, store_l, lane,
    t0, t1, t2, t3, t4, t5, t6, t7, d0, d1, d2, d3, d4, d5, d6, d7, g0, g1, g2, g3, g4, g5, g6, g7,
    BOTH_WAYS: tl.constexpr, GATE_GRAD: tl.constexpr, LOAD_AHEAD: tl.constexpr = False,
):
    # _bwd_half's loop over the states on per-token vectors (one element per thread, t_ = Δ, d_ = Δ·u, g_ = the
    # gated output gradient): no tile, so nothing to move between layouts. Returns Σ_n λ·B, Σ_n λ·a·h_{t-1}·A and
    # (GATE_GRAD) y = Σ_n C·h per token.
    z = tl.zeros_like(t0)
    lb0, lb1, lb2, lb3, lb4, lb5, lb6, lb7 = z, z, z, z, z, z, z, z
    la0, la1, la2, la3, la4, la5, la6, la7 = z, z, z, z, z, z, z, z
    y0, y1, y2, y3, y4, y5, y6, y7 = z, z, z, z, z, z, z, z
    # LOAD_AHEAD (16-bit B and C): state n + 1's rows are loaded as words during state n, a whole iteration before
    # their use (without it, the loop's first instructions wait on them). State 0's words are loaded outside the
    # switch, since Triton 3.8 resolves a run-time loop body's names in both branches of a constexpr if; unused,
    # they compile away.
    ELT: tl.constexpr = B_base.dtype.element_ty
    AHEAD: tl.constexpr = LOAD_AHEAD and ELT.primitive_bitwidth == 16
    bw0, bw1, bw2, bw3 = _ld16(B_base + off)
    cw0, cw1, cw2, cw3 = _ld16(C_base + off)
    # and (any dtype) A_n and the slots: the start state, ρ and dA of state n + 1 (only state n + 1 writes them)
    A_at = tl.load(A_rows)
    start_at = _slot_ld(start_ptr, has_start, True)
    rho_at = _slot_ld(rho_rows, True, True)
    dA_at = _slot_ld(dA_rows, True, True)
    for n in range(N):
        n_next = tl.minimum(n + 1, N - 1)
        if LOAD_AHEAD:
            A_n, start_n, rho_n, dA_old = A_at, start_at, rho_at, dA_at
            A_at = tl.load(A_rows + n_next)
            start_at = _slot_ld(start_ptr + n_next * CH, has_start, True)
            rho_at = _slot_ld(rho_rows + n_next * CH, True, True)
            dA_at = _slot_ld(dA_rows + n_next * CH, True, True)
        else:
            A_n = tl.load(A_rows + n)
        A2 = A_n * 1.4426950408889634
        if AHEAD:
            nb0, nb1, nb2, nb3 = _ld16(B_base + n_next * sB_n + off)
            nc0, nc1, nc2, nc3 = _ld16(C_base + n_next * sC_n + off)
            b0, b1, b2, b3, b4, b5, b6, b7 = _unpack8(bw0, bw1, bw2, bw3, rev, ELT, BOTH_WAYS)
            c0, c1, c2, c3, c4, c5, c6, c7 = _unpack8(cw0, cw1, cw2, cw3, rev, ELT, BOTH_WAYS)
            bw0, bw1, bw2, bw3 = nb0, nb1, nb2, nb3
            cw0, cw1, cw2, cw3 = nc0, nc1, nc2, nc3
        else:
            b0, b1, b2, b3, b4, b5, b6, b7 = _row8(B_base + n * sB_n + off, rev, BOTH_WAYS)
            c0, c1, c2, c3, c4, c5, c6, c7 = _row8(C_base + n * sC_n + off, rev, BOTH_WAYS)
        a0 = tl.exp2(t0 * A2)
        a1 = tl.exp2(t1 * A2)
        a2 = tl.exp2(t2 * A2)
        a3 = tl.exp2(t3 * A2)
        a4 = tl.exp2(t4 * A2)
        a5 = tl.exp2(t5 * A2)
        a6 = tl.exp2(t6 * A2)
        a7 = tl.exp2(t7 * A2)
        x0 = d0 * b0
        x1 = d1 * b1
        x2 = d2 * b2
        x3 = d3 * b3
        x4 = d4 * b4
        x5 = d5 * b5
        x6 = d6 * b6
        x7 = d7 * b7
        if not LOAD_AHEAD:  # loaded here, where they are used
            start_n = _slot_ld(start_ptr + n * CH, has_start, True)
        h0, h1, h2, h3, h4, h5, h6, h7 = _forward8(
            start_n, a0, a1, a2, a3, a4, a5, a6, a7, x0, x1, x2, x3, x4, x5, x6, x7
        )  # fmt: skip
        if not LOAD_AHEAD:
            rho_n = _slot_ld(rho_rows + n * CH, True, True)
        l0, l1, l2, l3, l4, l5, l6, l7 = _adjoint8(
            rho_n, a1, a2, a3, a4, a5, a6, a7, g0 * c0, g1 * c1, g2 * c2, g3 * c3, g4 * c4, g5 * c5, g6 * c6, g7 * c7
        )  # fmt: skip
        _slot_st(rho_rows + n * CH, a0 * l0, True)  # ρ = a·λ of the half's first token
        lb0, lb1, lb2, lb3, lb4, lb5, lb6, lb7, la0, la1, la2, la3, la4, la5, la6, la7, dA_n = _state_sums8(
            l0, l1, l2, l3, l4, l5, l6, l7, h0, h1, h2, h3, h4, h5, h6, h7, x0, x1, x2, x3, x4, x5, x6, x7,
            b0, b1, b2, b3, b4, b5, b6, b7, t0, t1, t2, t3, t4, t5, t6, t7, A_n,
            lb0, lb1, lb2, lb3, lb4, lb5, lb6, lb7, la0, la1, la2, la3, la4, la5, la6, la7,
        )  # fmt: skip
        if not LOAD_AHEAD:
            dA_old = _slot_ld(dA_rows + n * CH, True, True)
        _slot_st(dA_rows + n * CH, dA_old + dA_n, True)
        if GATE_GRAD:
            y0 += c0 * h0
            y1 += c1 * h1
            y2 += c2 * h2
            y3 += c3 * h3
            y4 += c4 * h4
            y5 += c5 * h5
            y6 += c6 * h6
            y7 += c7 * h7
        dB_l = _lane_sum8(l0 * d0, l1 * d1, l2 * d2, l3 * d3, l4 * d4, l5 * d5, l6 * d6, l7 * d7, lane)
        dC_l = _lane_sum8(g0 * h0, g1 * h1, g2 * h2, g3 * h3, g4 * h4, g5 * h5, g6 * h6, g7 * h7, lane)
        tl.store(dB_ptr + (part_row + n) * L + lin_l, dB_l, mask=store_l)
        tl.store(dC_ptr + (part_row + n) * L + lin_l, dC_l, mask=store_l)
    return (lb0, lb1, lb2, lb3, lb4, lb5, lb6, lb7, la0, la1, la2, la3, la4, la5, la6, la7,
            y0, y1, y2, y3, y4, y5, y6, y7)
# fmt: on


@triton.jit
def _bwd_half(
    c, half, u_rows, d_rows, g_rows, z_rows, tok_rows, A_rows, B_base, C_base, start_ptr, has_start,
    rho_rows,
    dA_rows, du_ptr, ddl_ptr, dB_ptr, dC_ptr, dz_ptr, part_row, bias, Dv,
    L, N, CH, sB_n, sC_n, fast, mid, st_fast, st_mid, st_slow, rev, neighbours,
    HALF: tl.constexpr, SUB: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    LANE_SUMS: tl.constexpr, VEC_MODE: tl.constexpr, GATE_GRAD: tl.constexpr, LOAD_AHEAD: tl.constexpr = False,
):  # fmt: skip
    # One half-chunk of HALF tokens, from its start state (start_ptr, states CH apart; zero unless has_start)
    # with the adjoint ρ of the tokens after it (rho_rows); returns the (Σ g·u, Σ dΔ_raw) of its tokens. Per-state
    # slots are CH apart. GATE_GRAD (one order): dz from y = Σ_n C·h + D·u rebuilt here, so that the forward
    # need not store the pre-gate output and no separate pass reads it back.
    q0 = (c * 2 + half) * HALF
    q = q0 + tl.arange(0, HALF)
    valid = q < L
    lin = _half_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev, VEC_MODE)
    tok = valid[:, None]
    VEC: tl.constexpr = VEC_MODE != 0
    MIXED: tl.constexpr = VEC_MODE == 2
    BOTH_WAYS: tl.constexpr = VEC_MODE == 3
    # the states on per-token vectors (_states8) when every program's halves are neighbours in memory
    TOKENS: tl.constexpr = LANE_SUMS and (VEC_MODE == 1 or VEC_MODE == 3)
    base = tl.where(rev != 0, L - HALF - q0, q0)  # the half's lowest offset when its tokens are neighbours
    u = _load_tile(u_rows, lin, tok, base, HALF, VEC, neighbours, rev, MIXED, BOTH_WAYS)  # (HALF, SUB)
    pre, dt = _load_delta(
        d_rows, lin, tok, bias, HAS_BIAS, SOFTPLUS, base, HALF, VEC, neighbours, rev, MIXED, BOTH_WAYS
    )
    gy = _load_tile(g_rows, lin, tok, base, HALF, VEC, neighbours, rev, MIXED, BOTH_WAYS)
    if HAS_Z:
        zz = _load_tile(z_rows, lin, tok, base, HALF, VEC, neighbours, rev, MIXED, BOTH_WAYS)
        sig = tl.sigmoid(zz)
        if GATE_GRAD:  # ∂out/∂z = y·silu'(z) = y·σ(z)·(1 + z·(1 − σ(z)))
            g_dz = gy * sig * (1.0 + zz * (1.0 - sig))
        gy = gy * zz * sig
    dtu = dt * u
    if LANE_SUMS:
        # dB/dC by a reduce-scatter over the warp: lane l sums token (l >> 2) & 7, lanes l % 4 == 0 store it
        lane = _lane_id(tl.arange(0, SUB))
        q_l = (c * 2 + half) * HALF + ((lane >> 2) & 7)
        lin_l = _half_offsets(q_l, L, fast, mid, st_fast, st_mid, st_slow, rev, VEC_MODE)
        store_l = (q_l < L) & ((lane & 3) == 0)
        d0, d1, d2, d3, d4, d5, d6, d7 = _split8(dtu, SUB)
        g0, g1, g2, g3, g4, g5, g6, g7 = _split8(gy, SUB)
    lam_B = tl.zeros([HALF, SUB], dtype=tl.float32)  # Σ_n λ·B
    lam_hA = tl.zeros([HALF, SUB], dtype=tl.float32)  # Σ_n λ·(h − Δ·u·B)·A
    if GATE_GRAD:
        y = tl.zeros([HALF, SUB], dtype=tl.float32)  # the pre-gate output, rebuilt
    if TOKENS:
        t0, t1, t2, t3, t4, t5, t6, t7 = _split8(dt, SUB)
        (lb0, lb1, lb2, lb3, lb4, lb5, lb6, lb7, la0, la1, la2, la3, la4, la5, la6, la7,
         y0, y1, y2, y3, y4, y5, y6, y7) = _states8(
            N, CH, L, A_rows, B_base, C_base, sB_n, sC_n, base + tl.zeros_like(lane).to(tl.int64), rev, start_ptr,
            has_start, rho_rows, dA_rows, dB_ptr, dC_ptr, part_row, lin_l, store_l, lane,
            t0, t1, t2, t3, t4, t5, t6, t7, d0, d1, d2, d3, d4, d5, d6, d7, g0, g1, g2, g3, g4, g5, g6, g7,
            BOTH_WAYS, GATE_GRAD, LOAD_AHEAD,
        )  # fmt: skip
        lam_B = _join8(lb0, lb1, lb2, lb3, lb4, lb5, lb6, lb7, SUB)
        lam_hA = _join8(la0, la1, la2, la3, la4, la5, la6, la7, SUB)
        if GATE_GRAD:
            y = _join8(y0, y1, y2, y3, y4, y5, y6, y7, SUB)
    if not TOKENS:
        for n in range(N):
            A_n = tl.load(A_rows + n)
            # no masks: offsets are clamped in range and padding tokens have Δ = 0 and g = 0 (the masks cost ~15 %
            # of this loop in predicate juggling; in the forward dropping them measured slower)
            B_n = _load_row(B_base + n * sB_n, lin, valid, q0, tok_rows, HALF, False, MASKED=False)
            C_n = _load_row(C_base + n * sC_n, lin, valid, q0, tok_rows, HALF, False, MASKED=False)
            a = tl.exp2(dt * (A_n * 1.4426950408889634)[None, :])
            x = dtu * B_n
            # both recurrences token by token, one FMA a step, on the rows of the thread's own tiles
            a0, a1, a2, a3, a4, a5, a6, a7 = _split8(a, SUB)
            x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x, SUB)
            h0, h1, h2, h3, h4, h5, h6, h7 = _forward8(
                _slot_ld(start_ptr + n * CH, has_start, LANE_SUMS), a0, a1, a2, a3, a4, a5, a6, a7, x0, x1, x2, x3,
                x4, x5, x6, x7,
            )  # fmt: skip
            h = _join8(h0, h1, h2, h3, h4, h5, h6, h7, SUB)
            v0, v1, v2, v3, v4, v5, v6, v7 = _split8(gy * C_n, SUB)
            l0, l1, l2, l3, l4, l5, l6, l7 = _adjoint8(
                _slot_ld(rho_rows + n * CH, True, LANE_SUMS), a1, a2, a3, a4, a5, a6, a7, v0, v1, v2, v3, v4, v5, v6,
                v7,
            )  # fmt: skip
            lam = _join8(l0, l1, l2, l3, l4, l5, l6, l7, SUB)
            if GATE_GRAD:
                y += h * C_n
            # each thread reads and writes only its own channel's ρ and dA: no barrier needed
            _slot_st(rho_rows + n * CH, a0 * l0, LANE_SUMS)
            lam_B += lam * B_n
            through_decay = lam * (h - x)  # λ_t·a_t·h_{t-1}
            lam_hA += through_decay * A_n[None, :]
            dA_n = _slot_ld(dA_rows + n * CH, True, LANE_SUMS) + tl.sum(through_decay * dt, axis=0)
            _slot_st(dA_rows + n * CH, dA_n, LANE_SUMS)
            if LANE_SUMS:
                dB_l = _lane_sum8(l0 * d0, l1 * d1, l2 * d2, l3 * d3, l4 * d4, l5 * d5, l6 * d6, l7 * d7, lane)
                dC_l = _lane_sum8(g0 * h0, g1 * h1, g2 * h2, g3 * h3, g4 * h4, g5 * h5, g6 * h6, g7 * h7, lane)
                tl.store(dB_ptr + (part_row + n) * L + lin_l, dB_l, mask=store_l)
                tl.store(dC_ptr + (part_row + n) * L + lin_l, dC_l, mask=store_l)
            else:  # Σ over the channels
                tl.store(dB_ptr + (part_row + n) * L + lin, tl.sum(lam * dtu, axis=1), mask=valid)
                tl.store(dC_ptr + (part_row + n) * L + lin, tl.sum(gy * h, axis=1), mask=valid)
    du = dt * lam_B
    if HAS_D:
        du += Dv[None, :] * gy
    if GATE_GRAD:
        if HAS_D:
            y += Dv[None, :] * u
        _store_tile(dz_ptr + tok_rows, lin, tok, g_dz * y)
    ddt = u * lam_B + lam_hA
    if SOFTPLUS:
        ddt = ddt * tl.sigmoid(pre)
    ddt = tl.where(tok, ddt, 0.0)
    _store_tile(du_ptr + tok_rows, lin, tok, du)
    _store_tile(ddl_ptr + tok_rows, lin, tok, ddt)
    return tl.sum(gy * u, axis=0), tl.sum(ddt, axis=0)


@triton.jit
def _bwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, gy_ptr, state_ptr, last_ptr,
    rho_ptr, mid_ptr, dA_slot_ptr, order_ptr, saved_mid_ptr,
    du_ptr, ddl_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dz_ptr,
    L, CH, N, K, G, CPG, nchunks, cps, nsplit,
    su_b, su_k, su_c, sd_b, sd_k, sd_c,
    sB_b, sB_k, sB_g, sB_n, sC_b, sC_k, sC_g, sC_n,
    sz_b, sz_c, sg_b, sg_k, sg_c, so_b,
    SUB: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr,
    LANE_SUMS: tl.constexpr, VEC_MODE: tl.constexpr, GATE_GRAD: tl.constexpr = False,
    PREFETCH: tl.constexpr = False, LOAD_AHEAD: tl.constexpr = False, HAS_MIDS: tl.constexpr = False,
):  # fmt: skip
    # One thread per channel, as in the forward, with half-chunks of BLOCK_T/2 tokens in registers and the state
    # loop at run time (unrolled, the states' tiles would spill). Per chunk: the state at its middle is recomputed
    # from the saved chunk-start state (or, HAS_MIDS on the per-token path, read where the forward saved it at
    # saved_mid_ptr, laid out as the chunk-start states), then the second half and the first half are
    # differentiated. Per-state values that outlive one half (ρ = a_{t1}·λ_{t1}, the middle state, dA) live in
    # per-thread fp32 slots; dB_n and dC_n are summed over the warp's channels and written once per program; the host
    # sums programs.
    HALF: tl.constexpr = BLOCK_T // 2
    tl.static_assert(HALF == 8, "the backward's recurrences are written out for half-chunks of 8 tokens")
    pid_blk = tl.program_id(0)
    seg = tl.program_id(1)
    bk = tl.program_id(2)
    b = (bk // K).to(tl.int64)
    k = bk % K
    c0 = pid_blk * SUB
    grp = c0 // CPG
    blk_in_grp = (c0 % CPG) // SUB
    bpg = CPG // SUB
    fast, mid, st_fast, st_mid, st_slow, rev = _order_row(order_ptr, k)
    neighbours = (st_fast == 1) & (st_mid == fast) & (st_slow == fast * mid)  # as in the forward
    first = seg * cps
    last = tl.minimum(first + cps, nchunks)

    ch = c0 + tl.arange(0, SUB)
    ch64 = ch.to(tl.int64)
    chan_row = bk * CH + ch64  # (SUB,)
    A_rows = A_ptr + (k * CH + ch64) * N
    bias = tl.zeros([SUB], dtype=tl.float32)
    Dv = tl.zeros([SUB], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * CH + ch)
    if HAS_D:
        Dv = tl.load(D_ptr + k * CH + ch)
    u_rows = u_ptr + b * su_b + k * su_k + ch64 * su_c
    d_rows = dl_ptr + b * sd_b + k * sd_k + ch64 * sd_c
    g_rows = gy_ptr + b * sg_b + k * sg_k + ch64 * sg_c
    z_rows = z_ptr + b * sz_b + ch64 * sz_c
    tok_rows = b * so_b + (k * CH + ch64) * L  # du/ddelta: (B, K, C, L), rows contiguous, batch stride so_b
    B_base = B_ptr + b * sB_b + k * sB_k + grp.to(tl.int64) * sB_g
    C_base = C_ptr + b * sC_b + k * sC_k + grp.to(tl.int64) * sC_g
    part_row = ((bk.to(tl.int64) * G + grp) * bpg + blk_in_grp) * N  # dB/dC partials (B, K, G, BPG, N, L)
    # per-state slots (B, K, nsplit, N, C), channels fastest (coalesced); state n of a channel is n·CH further
    slot = (bk.to(tl.int64) * nsplit + seg) * N * CH + ch64  # (SUB,)
    rho_rows = rho_ptr + slot
    mid_rows = mid_ptr + slot
    dA_rows = dA_slot_ptr + slot
    state_rows = state_ptr + bk.to(tl.int64) * nchunks * N * CH + ch64  # chunk-start states (B, K, nchunks, N, C)
    saved_mid_rows = saved_mid_ptr + bk.to(tl.int64) * nchunks * N * CH + ch64  # HAS_MIDS: the middle states, alike
    for n in range(N):
        tl.store(dA_rows + n * CH, tl.zeros([SUB], dtype=tl.float32))
        if seg == nsplit - 1:  # the adjoint after the last token (the carry pass wrote the other segments')
            tl.store(rho_rows + n * CH, tl.load(last_ptr + chan_row * N + n))
    dD_acc = tl.zeros([SUB], dtype=tl.float32)
    dbias_acc = tl.zeros([SUB], dtype=tl.float32)
    th = tl.arange(0, HALF)
    for i in range(last - first):
        c = last - 1 - i
        # chunk 0 starts from zero (its slot of the saved states is never written)
        start_rows = state_rows + c * N * CH
        has_start = c > 0
        # the state after the first half, from the chunk-start state
        q = c * BLOCK_T + th
        valid = q < L
        lin = _half_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev, VEC_MODE)
        tok = valid[:, None]
        base = tl.where(rev != 0, L - HALF - c * BLOCK_T, c * BLOCK_T)
        VEC: tl.constexpr = VEC_MODE != 0
        MIXED: tl.constexpr = VEC_MODE == 2
        BOTH_WAYS: tl.constexpr = VEC_MODE == 3
        _, dt = _load_delta(
            d_rows, lin, tok, bias, HAS_BIAS, SOFTPLUS, base, HALF, VEC, neighbours, rev, MIXED, BOTH_WAYS
        )
        dtu = dt * _load_tile(u_rows, lin, tok, base, HALF, VEC, neighbours, rev, MIXED, BOTH_WAYS)
        total = tl.sum(dt, axis=0)
        after = total[None, :] - tl.cumsum(dt, axis=0)  # Σ_{j>t} Δ_j within the half
        TOKENS: tl.constexpr = LANE_SUMS and (VEC_MODE == 1 or VEC_MODE == 3)
        USE_MIDS: tl.constexpr = HAS_MIDS and TOKENS
        if PREFETCH and TOKENS:
            # Each state loop below starts with loads that its next instructions need. With two warps per scheduler
            # (255 registers) nothing hides their latency, and the lines have mostly left L1 since the last chunk:
            # ask for them now, a line per lane — the chunk's B_n and C_n rows, its start states and the next
            # chunk's, the slots
            lane_p = _lane_id(ch)
            n_p = tl.minimum(lane_p & 15, N - 1)
            low = lane_p < 16
            chunk_base = tl.where(rev != 0, L - BLOCK_T - c * BLOCK_T, c * BLOCK_T)
            rows_p = tl.where(low, B_base + n_p * sB_n + chunk_base, C_base + n_p * sC_n + chunk_base)
            _prefetch(rows_p)
            blk_states = state_ptr + bk.to(tl.int64) * nchunks * N * CH + c0
            _prefetch(blk_states + (tl.where(low, c, tl.maximum(c - 1, 0)) * N + n_p) * CH)
            blk_slots = (bk.to(tl.int64) * nsplit + seg) * N * CH + c0 + n_p * CH
            _prefetch(tl.where(low, rho_ptr, dA_slot_ptr) + blk_slots)
            # where the second half starts from: the middle-state slots, or the saved middle states (HAS_MIDS)
            if USE_MIDS:
                mid_p = saved_mid_ptr + bk.to(tl.int64) * nchunks * N * CH + c0 + (c * N + n_p) * CH
            else:
                mid_p = mid_ptr + blk_slots
        if TOKENS:
            f0, f1, f2, f3, f4, f5, f6, f7 = _split8(after, SUB)
            e0, e1, e2, e3, e4, e5, e6, e7 = _split8(dtu, SUB)
        if USE_MIDS:
            pass  # the forward saved the middle states (PassConfig.mid_states)
        elif TOKENS and LOAD_AHEAD:
            # the state loop below with state n + 1's loads issued before state n's work (PassConfig.load_ahead)
            row_ptr = B_base + base + tl.zeros_like(ch64)
            b0, b1, b2, b3, b4, b5, b6, b7 = _row8(row_ptr, rev, BOTH_WAYS)
            A_n = tl.load(A_rows) * 1.4426950408889634
            h_start = _slot_ld(start_rows, has_start, LANE_SUMS)
            for n in range(N):
                n_next = tl.minimum(n + 1, N - 1)
                x0, x1, x2, x3, x4, x5, x6, x7 = _row8(row_ptr + n_next * sB_n, rev, BOTH_WAYS)
                A_next = tl.load(A_rows + n_next) * 1.4426950408889634
                h_next = _slot_ld(start_rows + n_next * CH, has_start, LANE_SUMS)
                tail = _mid_tail8(A_n, f0, f1, f2, f3, f4, f5, f6, f7, e0, e1, e2, e3, e4, e5, e6, e7,
                                  b0, b1, b2, b3, b4, b5, b6, b7)  # fmt: skip
                _slot_st(mid_rows + n * CH, tl.exp2(total * A_n) * h_start + tail, LANE_SUMS)
                b0, b1, b2, b3, b4, b5, b6, b7 = x0, x1, x2, x3, x4, x5, x6, x7
                A_n = A_next
                h_start = h_next
        else:
            for n in range(N):
                # h_mid = exp(A·ΣΔ)·h_start + Σ_t exp(A·Σ_{j>t} Δ_j)·Δ_t·u_t·B_t: no scan needed for one state
                A_n = tl.load(A_rows + n) * 1.4426950408889634
                if TOKENS:
                    b0, b1, b2, b3, b4, b5, b6, b7 = _row8(B_base + n * sB_n + base + tl.zeros_like(ch64), rev,
                                                           BOTH_WAYS)  # fmt: skip
                    tail = _mid_tail8(A_n, f0, f1, f2, f3, f4, f5, f6, f7, e0, e1, e2, e3, e4, e5, e6, e7,
                                      b0, b1, b2, b3, b4, b5, b6, b7)  # fmt: skip
                else:
                    B_n = _load_row(B_base + n * sB_n, lin, valid, c * BLOCK_T, ch, HALF, False, MASKED=False)
                    tail = tl.sum(tl.exp2(after * A_n[None, :]) * (dtu * B_n), axis=0)
                h_start = _slot_ld(start_rows + n * CH, has_start, LANE_SUMS)
                _slot_st(mid_rows + n * CH, tl.exp2(total * A_n) * h_start + tail, LANE_SUMS)
        for half in tl.static_range(1, -1, -1):  # the second half first: the adjoint flows backwards
            if half == 1:
                if USE_MIDS:
                    half_start = saved_mid_rows + c * N * CH
                else:
                    half_start = mid_rows
                half_has_start = c >= 0  # always: the middle state exists (a mask-shaped True)
            else:
                half_start = start_rows
                half_has_start = has_start
            if PREFETCH and TOKENS:  # again for this half: a half's loads evict about a chunk of lines
                _prefetch(rows_p)
                _prefetch(tl.where(low, mid_p, dA_slot_ptr + blk_slots))
                _prefetch(tl.where(low, rho_ptr, blk_states + (c * N + n_p) * CH))
            gu, gd = _bwd_half(
                c, half, u_rows, d_rows, g_rows, z_rows, tok_rows, A_rows, B_base, C_base, half_start,
                half_has_start, rho_rows, dA_rows, du_ptr, ddl_ptr, dB_ptr, dC_ptr, dz_ptr, part_row, bias, Dv,
                L, N, CH, sB_n, sC_n, fast, mid, st_fast, st_mid, st_slow, rev, neighbours,
                HALF=HALF, SUB=SUB, HAS_D=HAS_D, HAS_BIAS=HAS_BIAS, HAS_Z=HAS_Z, SOFTPLUS=SOFTPLUS,
                LANE_SUMS=LANE_SUMS, VEC_MODE=VEC_MODE, GATE_GRAD=GATE_GRAD, LOAD_AHEAD=LOAD_AHEAD,
            )  # fmt: skip
            dD_acc += gu
            dbias_acc += gd
    part = (bk.to(tl.int64) * nsplit + seg) * CH + ch64  # (SUB,): per-segment partials (B, K, nsplit, C)
    for n in range(N):  # dA's partials in the parameter's layout (B, K, nsplit, C, N): written once
        tl.store(dA_ptr + part * N + n, tl.load(dA_rows + n * CH))
    if HAS_D:
        tl.store(dD_ptr + part, dD_acc)
    if HAS_BIAS:
        tl.store(dbias_ptr + part, dbias_acc)


@triton.jit
def _bwd_segment_kernel(
    dl_ptr, A_ptr, C_ptr, bias_ptr, z_ptr, gy_ptr, seg_rho_ptr, seg_dt_ptr, order_ptr,
    L, CH, N, K, CPG, nchunks, cps, nsplit,
    sd_b, sd_k, sd_c, sC_b, sC_k, sC_g, sC_n, sz_b, sz_c, sg_b, sg_k, sg_c,
    SUB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, VEC_MODE: tl.constexpr = 0,
):  # fmt: skip
    # Each segment's outgoing adjoint from zero. VEC_MODE 1 or 3 (every order raster or reversed, one warp of 32
    # channels, 16 states): token by token (_seg_chunk16); else on (T, N, SUB) tiles.
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
    if VEC_MODE == 1 or VEC_MODE == 3:
        tl.static_assert(BLOCK_T == 16, "chunks of 16 tokens")
        nn = tl.arange(0, BLOCK_N)
        ch64 = (c0 + tl.arange(0, SUB)).to(tl.int64)
        zero_i = tl.zeros([SUB], dtype=tl.int32)
        bias_v = tl.zeros([SUB], dtype=tl.float32)
        if HAS_BIAS:
            bias_v = tl.load(bias_ptr + k * CH + ch64)
        r = tl.zeros([BLOCK_N, SUB], dtype=tl.float32)
        dt_acc = tl.zeros([SUB], dtype=tl.float32)
        for i in range(last - first):
            c = last - 1 - i
            base = tl.where(rev != 0, L - BLOCK_T - c * BLOCK_T, c * BLOCK_T)  # the chunk's lowest offset
            r, total = _seg_chunk16(
                r, base, True, rev, dl_ptr + b * sd_b + k * sd_k + ch64 * sd_c,
                gy_ptr + b * sg_b + k * sg_k + ch64 * sg_c, z_ptr + b * sz_b + ch64 * sz_c,
                A_ptr + (k * CH + ch64) * N, C_ptr + b * sC_b + k * sC_k + grp * sC_g, sC_n, bias_v, nn, zero_i,
                VEC_MODE == 3, HAS_BIAS, HAS_Z, SOFTPLUS, BLOCK_N,
            )  # fmt: skip
            dt_acc += total
        row = bk.to(tl.int64) * nsplit + seg  # (B, K, nsplit, N, C) and (B, K, nsplit, C), channels fastest
        _st1_if(seg_rho_ptr + row * N * CH + nn[:, None] * CH + ch64[None, :], r, (nn < N)[:, None])
        tl.store(seg_dt_ptr + row * CH + ch64, dt_acc)
    else:
        t = tl.arange(0, BLOCK_T)
        n = tl.arange(0, BLOCK_N)
        n_ok = n < N
        ch = c0 + tl.arange(0, SUB)
        ch64 = ch.to(tl.int64)
        A = tl.load(A_ptr + (k * CH + ch64)[None, :] * N + n[:, None], mask=n_ok[:, None], other=0.0)  # (N, SUB)
        bias = tl.zeros([SUB], dtype=tl.float32)
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
            _, dt = _load_delta(d_rows, lin, tok, bias, HAS_BIAS, SOFTPLUS)
            gy = tl.load(g_rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)
                gy = gy * zz * tl.sigmoid(zz)
            total = tl.sum(dt, axis=0)
            upto = tl.cumsum(dt, axis=0)  # Σ_{j≤t} Δ_j from the chunk start
            w = tl.exp(A[None, :, :] * upto[:, None, :])
            r = tl.exp(A * total[None, :]) * r + tl.sum(w * gy[:, None, :] * Ct[:, :, None], axis=0)
            dt_sum += total
        seg_row = bk.to(tl.int64) * nsplit + seg  # (B, K, nsplit, N, C) and (B, K, nsplit, C), channels fastest
        tl.store(seg_rho_ptr + seg_row * N * CH + n[:, None] * CH + ch64[None, :], r, mask=n_ok[:, None])
        tl.store(seg_dt_ptr + seg_row * CH + ch64, dt_sum)


@triton.jit
def _bwd_carry_kernel(
    A_ptr, seg_rho_ptr, seg_dt_ptr, last_ptr, rho_ptr, CH, N, K, nsplit,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # Chains the segments' adjoints of BLOCK_C channels of one (b, k) from the last segment backwards, BLOCK_S
    # segments at a time (an associative scan, as forward._fwd_carry_kernel): r_{s-1} = ρ_s + exp(A·ΣΔ_s)·r_s.
    bk = tl.program_id(1).to(tl.int64)
    k = bk % K
    n_blocks = tl.cdiv(N, BLOCK_N)  # a program: BLOCK_C channels × BLOCK_N states
    ch = (tl.program_id(0) // n_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = ch < CH
    ok = (n < N)[:, None] & c_ok[None, :]
    A = tl.load(A_ptr + (k * CH + ch[None, :]) * N + n[:, None], mask=ok, other=0.0)  # (BLOCK_N, BLOCK_C)
    tile = (n[:, None] * CH + ch[None, :])[None, :, :]
    r = tl.load(last_ptr + (bk * CH + ch[None, :]) * N + n[:, None], mask=ok, other=0.0)  # (B, K, C, N)
    sb = tl.arange(0, BLOCK_S)
    for i0 in range(0, nsplit - 1, BLOCK_S):
        s = nsplit - 1 - (i0 + sb)  # segments nsplit-1 down to 1, latest first
        s_ok = s >= 1
        m = s_ok[:, None, None] & ok[None, :, :]
        row = bk * nsplit + s
        dt_sum = tl.load(seg_dt_ptr + row[:, None] * CH + ch[None, :], mask=s_ok[:, None] & c_ok[None, :], other=0.0)
        rho = tl.load(seg_rho_ptr + row[:, None, None] * N * CH + tile, mask=m, other=0.0)
        decay, local = tl.associative_scan((tl.exp(A[None, :, :] * dt_sum[:, None, :]), rho), 0, _linear_combine)
        rs = local + decay * r[None, :, :]  # the adjoint before each segment of the block
        tl.store(rho_ptr + (row - 1)[:, None, None] * N * CH + tile, rs, mask=m)
        r = tl.sum(tl.where((sb == BLOCK_S - 1)[:, None, None], rs, 0.0), axis=0)


@triton.jit
def _gate_grad_kernel(
    gy_ptr, pre_ptr, z_ptr, dz_ptr, geff_ptr, L, CH, KT,
    sg_b, sg_k, sg_c, sp_b, sp_k, sp_c, sz_b, sz_c, se_b, se_k, se_c,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # dz = (Σ_k g_k·y_k) · silu'(z) in one pass (y_k before the gate; one term when the orders were summed), and
    # the gradient at the scan's output, g_k·silu(z) in fp32, so that the scan passes need not load z
    row = tl.program_id(0).to(tl.int64)  # b·CH + c
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    b = row // CH
    c = row % CH
    zz = tl.load(z_ptr + b * sz_b + c * sz_c + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(zz)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(KT):
        g = tl.load(gy_ptr + b * sg_b + k * sg_k + c * sg_c + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(pre_ptr + b * sp_b + k * sp_k + c * sp_c + offs, mask=mask, other=0.0).to(tl.float32)
        acc += g * y
        tl.store(geff_ptr + b * se_b + k * se_k + c * se_c + offs, g * zz * sig, mask=mask)
    tl.store(dz_ptr + row * L + offs, acc * sig * (1.0 + zz * (1.0 - sig)), mask=mask)


@triton.jit
def _bwd_finish_kernel(
    dB_part_ptr, dC_part_ptr, dB_ptr, dC_ptr, dA_part_ptr, dD_part_ptr, dbias_part_ptr, dA_ptr, dD_ptr, dbias_ptr,
    L, N, BPG, CH, K, batch, nsplit, n_a, n_sums, bc_rows, sbc_b, sbc_k,
    HAS_BC: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
    COLS: tl.constexpr,
):  # fmt: skip
    # The backward's partial sums, summed in a fixed order (deterministic) and stored in the parameters' dtypes, in
    # one launch: programs [0, n_a) sum dA over batch and segments (B, K, nsplit, C, N) -> (K, C, N), COLS columns
    # each; [n_a, n_sums) sum dD and d(delta_bias) likewise (B, K, nsplit, C) -> (K, C); the rest sum dB and dC
    # over the channel blocks of a group (B, K, G, BPG, N, L) -> (B, K, G, N, L), BLOCK tokens each (bc_rows =
    # K·G·N rows of L per batch; batch stride sbc_b and order stride sbc_k: a slice along K of a larger buffer for a
    # group of orders, or rows of a buffer laid out as x_proj's output, _sibling_rows).
    # The sums over segments come first so that they start first: with thousands of segments each walks many rows,
    # and started last they ran alone at the end of the launch (H200, SegMamba's three orders at 64³: 0.162 -> 0.146
    # and 0.266 -> 0.241 ms).
    pid = tl.program_id(0)
    bc_pid = pid - n_sums
    sum_pid = pid
    if HAS_BC and bc_pid >= 0:
        tiles = tl.cdiv(L, BLOCK)
        row = (bc_pid // tiles).to(tl.int64)  # (b, k, g, n)
        q = (bc_pid % tiles) * BLOCK + tl.arange(0, BLOCK)
        mask = q < L
        bkg = row // N
        n = row % N
        acc_b = tl.zeros([BLOCK], dtype=tl.float32)
        acc_c = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(BPG):
            part = ((bkg * BPG + j) * N + n) * L + q
            acc_b += tl.load(dB_part_ptr + part, mask=mask, other=0.0)
            acc_c += tl.load(dC_part_ptr + part, mask=mask, other=0.0)
        gn_rows = bc_rows // K  # G·N rows of L per order
        in_batch = row % bc_rows
        at = (row // bc_rows) * sbc_b + (in_batch // gn_rows) * sbc_k + (in_batch % gn_rows) * L + q
        tl.store(dB_ptr + at, acc_b, mask=mask)
        tl.store(dC_ptr + at, acc_c, mask=mask)
    else:
        # dA (columns C·N of each (b, k, segment) row) or dD and d(delta_bias) (columns C): a program sums one
        # block of columns of one k over all batch × segment rows, ROWS rows at a time (a loop of one row per step
        # was latency-bound: 4 ms for SegMamba's 8,192 line segments at 64³), then over the tile's rows
        is_a = sum_pid < n_a
        j = tl.where(is_a, sum_pid, sum_pid - n_a)
        width = tl.where(is_a, CH * N, CH)
        per_k = tl.cdiv(width, COLS)
        k = j // per_k
        col = (j % per_k) * COLS + tl.arange(0, COLS)
        c_ok = col < width
        r = tl.arange(0, ROWS)
        acc = tl.zeros([ROWS, COLS], dtype=tl.float32)  # dA, or dD
        acc_bias = tl.zeros([ROWS, COLS], dtype=tl.float32)
        for r0 in range(0, batch * nsplit, ROWS):
            rows = r0 + r
            bs = (rows // nsplit * K + k) * nsplit + rows % nsplit  # (b, k, s) of the partials' rows
            ok = (rows < batch * nsplit)[:, None] & c_ok[None, :]
            at = bs.to(tl.int64)[:, None] * width + col[None, :]
            if is_a:
                acc += tl.load(dA_part_ptr + at, mask=ok, other=0.0)
            else:
                if HAS_D:
                    acc += tl.load(dD_part_ptr + at, mask=ok, other=0.0)
                if HAS_BIAS:
                    acc_bias += tl.load(dbias_part_ptr + at, mask=ok, other=0.0)
        out = k * width + col
        if is_a:
            tl.store(dA_ptr + out, tl.sum(acc, axis=0), mask=c_ok)
        else:
            if HAS_D:
                tl.store(dD_ptr + out, tl.sum(acc, axis=0), mask=c_ok)
            if HAS_BIAS:
                tl.store(dbias_ptr + out, tl.sum(acc_bias, axis=0), mask=c_ok)


_bwd_segment_launch = Launcher(_bwd_segment_kernel)
_bwd_carry_launch = Launcher(_bwd_carry_kernel)
_bwd_launch = Launcher(_bwd_kernel)
_gate_grad_launch = Launcher(_gate_grad_kernel)
_bwd_finish_launch = Launcher(_bwd_finish_kernel)
_bwd_lines_launch = Launcher(_bwd_lines_kernel)
_bwd_lines_segment_launch = Launcher(_bwd_lines_segment_kernel)


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
    given_shapes: tuple | None = None,
    into: tuple | None = None,
    mids: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias)`` in the canonical shapes of the inputs.

    ``mids``: the chunks' middle states the forward saved (PassConfig.mid_states), laid out as ``states``; the
    per-token main pass then reads them instead of recomputing them. Other paths ignore them.

    ``into``: ``(du, ddelta, dA, dB, dC, dD, ddelta_bias)`` to write instead of fresh tensors (``None`` for an absent
    D or delta_bias): slices along K of larger buffers, for a group of orders. du and ddelta are ``(B, K, C, *S)``
    views with contiguous ``(K, C, *S)`` blocks and one batch stride; dB and dC ``(B, K, G, N, *S)`` likewise; dA,
    dD and ddelta_bias contiguous.

    ``given_shapes``: the shapes of the arguments as given (canonical.py); a gradient is allocated in its argument's
    shape wherever that holds the same elements in the same order (an added axis of size one), which spares a view
    per gradient on the way back. A constant B or C keeps its broadcast shape.
    """
    dev = u.device
    shapes = _grad_shapes(p, given_shapes)
    nd = len(p.spatial)
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
    gate_grad = z is not None and pre_gate is None  # dz in the kernel (PassConfig.save_pre_gate, one order)
    gated = z is not None and not gate_grad
    cfg = configs.backward_config()
    siblings = _sibling_extent(B, C) if into is None else None  # dB and dC laid out as B and C (_sibling_rows)
    # everything the launches specialise on follows from this key (Launcher.at): the gated output gradient is a
    # fresh fp32 tensor shaped like gy, the gradients are fresh (dB and dC as siblings' or packed) or ``into``, A, D
    # and delta_bias go in as fp32
    key = (
        p, orders, delta_softplus, merge, cfg, dev, gate_grad, siblings is not None, u.stride(), delta.stride(),
        B.stride(), C.stride(),
        z_arg.stride(), gy.stride(), u.dtype, delta.dtype, B.dtype, C.dtype, z_arg.dtype, gy.dtype, A.dtype,
        None if D is None else D.dtype, None if delta_bias is None else delta_bias.dtype,
        None if pre_gate is None else pre_gate.stride(),
        None if into is None else tuple(None if t is None else t.stride() for t in into),
        layout.alignment(u, delta, B, C, z_arg, gy, A, D, delta_bias, pre_gate, grad_last, states, mids,
                         *(into or ())),
        grad_last is None, dev.type != "cuda" and layout.interpreted(),
    )  # fmt: skip
    launch = _LAUNCHES.get(key)
    dz = torch.empty(shapes[6], device=dev, dtype=z.dtype) if z is not None else None
    if gated:  # dz, and the scan passes' output gradient g·silu(z), in one pass
        gy = _gate(gy, pre_gate, z, dz, p, merge, launch.sites if launch is not None else {})
    if launch is None:
        launch = layout.remembered(
            _LAUNCHES, key, lambda: _launch_settings(p, cfg, orders, u, delta, B, C, z_arg, gy, merge, gate_grad)
        )
    nsplit, cps, bpg = launch.nsplit, launch.cps, p.cpg // launch.sub
    if grad_last is None:  # the last state was not used: a zero adjoint, allocated once per shape (read only)
        grad_last = layout.remembered(
            _ZERO_ADJOINTS, (p.batch, p.K, p.channels, p.N, dev),
            lambda: torch.zeros(p.batch, p.K, p.channels, p.N, device=dev, dtype=torch.float32),
        )  # fmt: skip
    grad_last = grad_last.float().contiguous()  # (B, K, C, N): the adjoint after the last token
    # the passes' fp32 scratch in one allocation, cut by one call into flat 256-byte-aligned pieces (the kernels
    # take pointers and derive every offset; an allocation and a view per buffer cost host time at every call)
    scratch = torch.empty(sum(launch.scratch), device=dev, dtype=torch.float32).split(launch.scratch)
    rho, mid, dA_slot, seg_rho, seg_dt, dA_part, dD_part, dbias_part, dB_part, dC_part = scratch

    # the line-vector passes read A laid out (N, C): a state's values for 32 channels in one line (one order)
    A_by_state = A32.transpose(1, 2).contiguous() if launch.line_vectors or launch.segment_lines else None
    # launched first: the GPU starts while the host allocates the rest
    if launch.segment_lines:  # every line a segment, its lines side by side (lines_backward.py)
        _bwd_lines_segment_launch.at(launch.sites, "segments", launch.segment_grid)(
            delta, A_by_state, C, bias, gy, seg_rho, seg_dt, launch.table, p.channels, p.N, p.cpg, cps, nsplit,
            *launch.segment_strides, SUB=launch.sub, LV=launch.line_vectors, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, num_warps=1,
        )  # fmt: skip
    elif nsplit > 1:
        _bwd_segment_launch.at(launch.sites, "segments", launch.segment_grid)(
            delta, A32, C, bias, z_arg, gy, seg_rho, seg_dt, launch.table,
            p.L, p.channels, p.N, p.K, p.cpg, p.nchunks, cps, nsplit, *launch.segment_strides,
            SUB=launch.segment_sub, BLOCK_T=p.block_t, BLOCK_N=p.block_n, HAS_BIAS=delta_bias is not None,
            HAS_Z=gate_grad, SOFTPLUS=delta_softplus, VEC_MODE=launch.segment_vec,
            num_warps=1 if launch.segment_vec else 4,
        )  # fmt: skip
    if nsplit > 1:
        _bwd_carry_launch.at(launch.sites, "carry", launch.carry_grid)(
            A32, seg_rho, seg_dt, grad_last, rho, p.channels, p.N, p.K, nsplit,
            BLOCK_N=launch.carry_blocks[1], BLOCK_C=CARRY_CHANNELS, BLOCK_S=launch.carry_blocks[0],
            num_warps=CARRY_WARPS,
        )  # fmt: skip

    if into is None:
        du = torch.empty(shapes[0], device=dev, dtype=u.dtype)
        ddelta = torch.empty(shapes[1], device=dev, dtype=delta.dtype)
    else:
        du, ddelta = into[:2]
    if not launch.fused_bc:  # the partials are the gradients: owned and shaped (B, K, G, 1, N, *S)
        dB_part = torch.empty(p.batch, p.K, p.groups, bpg, p.N, *p.spatial, device=dev, dtype=torch.float32)
        dC_part = torch.empty_like(dB_part)
    if launch.line_vectors:  # one strided order, its lines side by side (lines_backward.py)
        _bwd_lines_launch.at(launch.sites, "main", launch.grid)(
            u, delta, A_by_state, B, C, Dv, bias, gy, states, grad_last, rho, mid, dA_slot, launch.table,
            mids if mids is not None else states, du, ddelta, dB_part, dC_part, dA_part, dD_part, dbias_part,
            p.L, p.channels, p.N, p.groups, p.cpg, cps, nsplit, *launch.strides, du.stride(0),
            SUB=launch.sub, LV=launch.line_vectors, HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, LANE_SUMS=launch.ptx, LOAD_AHEAD=cfg.line_vector_load_ahead,
            HAS_MIDS=mids is not None, num_warps=1, **launch.options,
        )  # fmt: skip
    else:
        _bwd_launch.at(launch.sites, "main", launch.grid)(
            u, delta, A32, B, C, Dv, bias, z_arg, gy, states, grad_last, rho, mid, dA_slot, launch.table,
            mids if mids is not None else states,
            du, ddelta, dB_part, dC_part, dA_part, dD_part, dbias_part, dz if gate_grad else du,
            p.L, p.channels, p.N, p.K, p.groups, p.cpg, p.nchunks, cps, nsplit, *launch.strides, du.stride(0),
            SUB=launch.sub, BLOCK_T=p.block_t, HAS_D=D is not None, HAS_BIAS=delta_bias is not None,
            HAS_Z=gate_grad, SOFTPLUS=delta_softplus, LANE_SUMS=launch.ptx, VEC_MODE=launch.vec_mode,
            GATE_GRAD=gate_grad, PREFETCH=cfg.prefetch, LOAD_AHEAD=cfg.load_ahead, HAS_MIDS=mids is not None,
            num_warps=launch.num_warps, **launch.options,
        )  # fmt: skip

    dA, dB, dC, dD, dbias = _finish(
        dA_part, dD_part, dbias_part, dB_part, dC_part, A, B, C, D, delta_bias, p, nsplit, bpg, launch.fused_bc, shapes,
        launch.sites, into[2:] if into is not None else None, siblings,
    )  # fmt: skip
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def grouped_backward(
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
    parts: Sequence[Part],
    pre_gate: torch.Tensor | None,
    *,
    orders: Sequence[ScanOrder],
    delta_softplus: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of a ``merge="sum"`` call that ran as groups of orders (PassConfig.split_orders), canonical shapes.

    The gate's gradient is taken once, from the summed pre-gate output; each group's backward then runs ungated on
    its orders and writes its gradients into their slices along the orders (no joining copies).
    """
    p = parts[0].plan
    if grad_out is None:
        grad_out = torch.zeros((p.batch, p.channels, *p.spatial), device=u.device, dtype=u.dtype)
    gy = layout.natural_spatial(grad_out, len(p.spatial))
    dz = None
    if z is not None:
        dz = torch.empty(z.shape, device=u.device, dtype=z.dtype)
        gy = _gate(gy, pre_gate, z, dz, p, "sum")

    dev = u.device
    du = torch.empty(p.batch, parts[-1].stop, p.channels, *p.spatial, device=dev, dtype=u.dtype)
    ddelta = torch.empty(du.shape, device=dev, dtype=delta.dtype)
    dA = torch.empty(A.shape, device=dev, dtype=A.dtype)
    dB, dC = _sibling_rows(B, C, _sibling_extent(B, C)) or (
        torch.empty(B.shape, device=dev, dtype=B.dtype),
        torch.empty(C.shape, device=dev, dtype=C.dtype),
    )
    dD = torch.empty(D.shape, device=dev, dtype=D.dtype) if D is not None else None
    dbias = torch.empty(delta_bias.shape, device=dev, dtype=delta_bias.dtype) if delta_bias is not None else None
    for part in parts:
        k = slice(part.start, part.stop)
        dl, uk, dk, Bk, Ck = (None if x is None else x[:, k] for x in (grad_last, u, delta, B, C))
        Ak, Dk, bk = (None if x is None else x[k] for x in (A, D, delta_bias))
        kw = {"p": part.plan, "orders": orders[k], "delta_softplus": delta_softplus, "merge": "sum"}
        into = (du[:, k], ddelta[:, k], dA[k], dB[:, k], dC[:, k], *(None if x is None else x[k] for x in (dD, dbias)))
        backward(gy, dl, uk, dk, Ak, Bk, Ck, Dk, None, bk, part.states, None, into=into, mids=part.mids, **kw)
    return du, ddelta, dA, dB, dC, dD, dz, dbias


def _sibling_extent(B: torch.Tensor, C: torch.Tensor) -> int | None:
    """The elements of storage that B and C span from its start when they are sibling row blocks, else ``None``.

    Siblings: disjoint blocks of rows of one tensor, as mamba's B and C are of x_proj's output. Each (b, k) block
    ``(G, N, *S)`` is contiguous, no two blocks overlap, and the storage they span is at most twice their elements.
    """
    if (
        B.dtype != C.dtype
        or B.shape != C.shape
        or B.stride() != C.stride()
        or B.ndim < 5
        or B.untyped_storage().data_ptr() != C.untyped_storage().data_ptr()
        or not B[0, 0].is_contiguous()
    ):
        return None
    block = math.prod(B.shape[2:])
    starts = sorted(
        x.storage_offset() + i * x.stride(0) + k * x.stride(1)
        for x in (B, C)
        for i in range(B.shape[0])
        for k in range(B.shape[1])
    )
    if block == 0 or any(b - a < block for a, b in itertools.pairwise(starts)):
        return None
    end = starts[-1] + block
    return end if end <= 2 * (B.numel() + C.numel()) else None


def _sibling_rows(B: torch.Tensor, C: torch.Tensor, extent: int | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The gradients of sibling B and C as views of one new buffer laid out as their storage (None: not siblings).

    ``extent``: from :func:`_sibling_extent`. The buffer mirrors that storage from its start, the other rows left
    unwritten, so whoever made B and C can take it as the gradient of the whole tensor without copying dB and dC into
    it (``MambaLayer``'s x_proj: token_linear.order_projections). Anyone else reads dB and dC as the views they are.
    The finish pass then writes them with B's order stride: a call's launch settings key on whether B and C are
    siblings.
    """
    if extent is None:
        return None
    buf = torch.empty(extent, device=B.device, dtype=B.dtype)
    return (buf.as_strided(B.shape, B.stride(), B.storage_offset()),
            buf.as_strided(C.shape, C.stride(), C.storage_offset()))  # fmt: skip


def _order_stride(dB: torch.Tensor, p: Plan) -> int:
    # dB's stride between orders as the finish kernel addresses it: (G·N) rows of L per order when dB is packed
    return dB.stride(1) if dB.ndim >= 5 and p.K > 1 else p.groups * p.N * p.L


FINISH_BLOCK = 1024  # tokens per program of _bwd_finish_kernel's dB/dC sums
# its tiles of (batch, segment) rows × columns for the dA, dD and d(delta_bias) sums, (ROWS, COLS, warps): tall and
# narrow ones from FINISH_TALL_FROM rows on (many segments: on the H200 SegMamba's slice order at 64³, 2 × 4,096
# rows, took 0.266 ms in 64 × 64 tiles and 0.108 in 256 × 16, by more programs and more loads in flight)
FINISH_TILES = (64, 64, 4)
FINISH_TALL_TILES = (256, 16, 8)
FINISH_TALL_FROM = 2048


def _finish(dA_part, dD_part, dbias_part, dB_part, dC_part, A, B, C, D, delta_bias, p: Plan, nsplit: int, bpg: int,
            fused_bc: bool, shapes, sites: dict, outs: tuple | None = None,
            siblings: int | None = None):  # fmt: skip
    """``(dA, dB, dC, dD, ddelta_bias)`` from the main pass's partials, by one launch (was up to eight torch ops).

    ``bpg`` channel blocks per group wrote dB/dC partials; without ``fused_bc`` (one block, fp32 B and C) the
    partials are the gradients. ``sites``: the memo of the call's launches (Launcher.at). ``outs``: the five
    gradients' tensors to write (backward's ``into``), else fresh ones, dB and dC as siblings' when ``siblings``
    (:func:`_sibling_extent`) is given.
    """
    dev = dA_part.device
    if outs is not None:
        dA, dB, dC, dD, dbias = outs
        if not fused_bc:
            dB.copy_(dB_part[:, :, :, 0])
            dC.copy_(dC_part[:, :, :, 0])
    else:
        if fused_bc:
            dB, dC = _sibling_rows(B, C, siblings) or (
                torch.empty(shapes[3], device=dev, dtype=B.dtype),
                torch.empty(shapes[4], device=dev, dtype=C.dtype),
            )
        else:
            dB, dC = dB_part[:, :, :, 0], dC_part[:, :, :, 0]
        dA = torch.empty(shapes[2], device=dev, dtype=A.dtype)
        dD = torch.empty(shapes[5], device=dev, dtype=D.dtype) if D is not None else None
        dbias = torch.empty(shapes[7], device=dev, dtype=delta_bias.dtype) if delta_bias is not None else None
    bc_rows = p.K * p.groups * p.N
    rows, cols, warps = FINISH_TALL_TILES if p.batch * nsplit >= FINISH_TALL_FROM else FINISH_TILES
    n_bc = p.batch * p.K * p.groups * p.N * layout.cdiv(p.L, FINISH_BLOCK) if fused_bc else 0
    n_a = p.K * layout.cdiv(p.channels * p.N, cols)
    n_d = p.K * layout.cdiv(p.channels, cols) if (D is not None or delta_bias is not None) else 0
    _bwd_finish_launch.at(sites, "finish", (n_bc + n_a + n_d,))(
        dB_part, dC_part, dB, dC, dA_part, dD_part, dbias_part, dA, dD if dD is not None else dA,
        dbias if dbias is not None else dA, p.L, p.N, bpg, p.channels, p.K, p.batch, nsplit, n_a, n_a + n_d, bc_rows,
        dB.stride(0) if fused_bc else bc_rows * p.L, _order_stride(dB, p) if fused_bc else p.groups * p.N * p.L,
        HAS_BC=fused_bc, HAS_D=D is not None, HAS_BIAS=delta_bias is not None, BLOCK=FINISH_BLOCK, ROWS=rows,
        COLS=cols, num_warps=warps,
    )  # fmt: skip
    return dA, dB, dC, dD, dbias


def _grad_shapes(p: Plan, given_shapes: tuple | None) -> tuple:
    """The shape each gradient is allocated in: its argument's as given, or the canonical one.

    The given shape is used where it holds the canonical tensor's elements in the same order (the same count: the
    canonical view only added axes of size one).
    """
    return layout.remembered(_GRAD_SHAPES, (p, given_shapes), lambda: _derive_grad_shapes(p, given_shapes))


def _derive_grad_shapes(p: Plan, given_shapes: tuple | None) -> tuple:
    per_token = (p.batch, p.K, p.channels, *p.spatial)
    bc = (p.batch, p.K, p.groups, p.N, *p.spatial)
    per_channel = (p.K, p.channels)
    canonical = (per_token, per_token, (p.K, p.channels, p.N), bc, bc, per_channel, (p.batch, p.channels, *p.spatial),
                 per_channel)  # fmt: skip
    if given_shapes is None:
        return canonical
    return tuple(
        tuple(g) if g is not None and math.prod(g) == math.prod(c) else c
        for g, c in zip(given_shapes, canonical, strict=True)
    )


@dataclass(frozen=True)
class _Launch:
    """What the launches of a backward call take besides its tensors (as forward._Launch, once per signature)."""

    sub: int
    nsplit: int
    cps: int
    num_warps: int
    ptx: bool
    vec_mode: int
    segment_sub: int
    segment_vec: int  # VEC_MODE of the chunk path's segment pass: 1 or 3 per token (one warp), 0 on tiles (four)
    grid: tuple[int, int, int]
    segment_grid: tuple[int, int, int]
    carry_grid: tuple[int, int]
    carry_blocks: tuple[int, int]  # BLOCK_S, BLOCK_N of the carry pass
    table: torch.Tensor
    strides: tuple[int, ...]
    segment_strides: tuple[int, ...]
    options: dict
    fused_bc: bool  # dB/dC partials summed and cast by the finish pass (else they are the gradients)
    line_vectors: int  # lines per thread of the main pass (lines_backward.py); 0: the chunk path
    segment_lines: bool  # the segment pass as line vectors too (PassConfig.line_vector_segments)
    scratch: tuple[int, ...]  # fp32 elements of rho, mid, dA_slot, seg_rho, seg_dt, dA/dD/dbias partials, dB/dC
    # partials (0 when not fused_bc), each rounded up to 64 (256 bytes)
    sites: dict = field(default_factory=dict, compare=False, repr=False)  # the launches' kernels (Launcher.at)


_LAUNCHES: dict[tuple, _Launch] = {}
_ZERO_ADJOINTS: dict[tuple, torch.Tensor] = {}
_GRAD_SHAPES: dict[tuple, tuple] = {}


def _launch_settings(p, cfg, orders, u, delta, B, C, z_arg, gy, merge, gate_grad) -> _Launch:
    dev = u.device
    sub, nsplit, cps = split(p, cfg, dev, orders)  # as the forward
    # line vectors: an ungated call of one strided order whose lines are neighbours; every line a segment
    line_len = (
        _line_vector_length(p, orders, cfg, any_states=True) if p.K == 1 and not gate_grad and p.block_t == 16 else 0
    )
    if line_len:
        sub, nsplit, cps = 32, p.L // line_len, line_len // p.block_t
    num_warps = max(1, min(cfg.num_warps, sub // 32))
    ptx = cfg.ptx(dev, sub, num_warps)
    seg_sub = layout.channel_blocking(p.channels, p.groups, 32)
    g_b, g_k, g_c = _output_strides(gy, merge)
    # du and ddelta are fresh (B, K, C, *S) tensors: contiguous and aligned
    vec = cfg.vector_mode(ptx, orders, p.spatial, u, delta, B, C, z_arg, gy)
    # PassConfig.token_segments: tokens.py's 16 states are written out
    segment_vec = vec if cfg.token_segments and vec in (1, 3) and p.N == p.block_n == 16 else 0
    if segment_vec:
        seg_sub = 32
    strides = (
        u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
        B.stride(0), B.stride(1), B.stride(2), B.stride(3), C.stride(0), C.stride(1), C.stride(2), C.stride(3),
        z_arg.stride(0), z_arg.stride(1), g_b, g_k, g_c,
    )  # fmt: skip
    segment_strides = (
        delta.stride(0), delta.stride(1), delta.stride(2), C.stride(0), C.stride(1), C.stride(2), C.stride(3),
        z_arg.stride(0), z_arg.stride(1), g_b, g_k, g_c,
    )  # fmt: skip
    grid = (p.channels // sub, nsplit, p.batch * p.K)
    segment_grid = (p.channels // seg_sub, nsplit, p.batch * p.K)
    segment_lines = bool(line_len) and cfg.line_vector_segments
    if line_len:
        strides = (
            u.stride(0), u.stride(2), delta.stride(0), delta.stride(2), B.stride(0), B.stride(2), B.stride(3),
            C.stride(0), C.stride(2), C.stride(3), g_b, g_c,
        )  # fmt: skip
        grid = (p.channels // sub, nsplit // cfg.line_vectors, p.batch)
    if segment_lines:
        segment_strides = (delta.stride(0), delta.stride(2), C.stride(0), C.stride(2), C.stride(3), g_b, g_c)
        segment_grid = grid
    bpg = p.cpg // sub
    cap = cfg.maxnreg if any(layout.directions(orders, p.spatial)) else cfg.strided_maxnreg
    if line_len:  # it takes 255 registers without spills (sm_90a, bf16); a cap of 168 spilled 2,500 bytes
        cap = cfg.line_vector_maxnreg
    fused_bc = not (bpg == 1 and B.dtype == C.dtype == torch.float32)
    bk = p.batch * p.K
    states = bk * nsplit * p.N * p.channels  # (B, K, nsplit, N, C): rho, mid, dA_slot, seg_rho; dA partials
    per_channel = bk * nsplit * p.channels  # (B, K, nsplit, C): seg_dt, dD and d(delta_bias) partials
    bc = bk * p.groups * bpg * p.N * p.L if fused_bc else 0  # (B, K, G, bpg, N, *S)
    sizes = (states, states, states, states, per_channel, states, per_channel, per_channel, bc, bc)
    return _Launch(
        sub=sub,
        nsplit=nsplit,
        cps=cps,
        num_warps=num_warps,
        ptx=ptx,
        vec_mode=vec,
        segment_sub=seg_sub,
        segment_vec=segment_vec,
        grid=grid,
        segment_grid=segment_grid,
        carry_grid=carry_grid(p.channels, p.N, p.batch * p.K, nsplit, p.block_n),
        carry_blocks=carry_blocks(nsplit, p.block_n),
        table=layout.order_table(orders, p.spatial, dev),
        strides=strides,
        segment_strides=segment_strides,
        options={"maxnreg": cap} if cap else {},
        fused_bc=fused_bc,
        line_vectors=cfg.line_vectors if line_len else 0,
        segment_lines=segment_lines,
        scratch=tuple(-(-n // 64) * 64 for n in sizes),
    )


def _gate(
    gy: torch.Tensor,
    pre: torch.Tensor,
    z: torch.Tensor,
    dz: torch.Tensor,
    p: Plan,
    merge: str,
    sites: dict | None = None,
) -> torch.Tensor:
    """Fill ``dz`` and return the gradient at the scan's output, ``gy·silu(z)`` in fp32, shaped like ``gy``.

    ``pre`` is the saved pre-gate output: ``(B, C, *S)`` summed or ``(B, K, C, *S)`` stacked, spatial contiguous.
    ``sites``: the memo of the call's launches (Launcher.at), if it has one.
    """
    k_terms = 1 if merge == "sum" else p.K
    geff = torch.empty(gy.shape, device=gy.device, dtype=torch.float32)
    g_b, g_k, g_c = _output_strides(gy, merge)
    pre_b, pre_k, pre_c = _output_strides(pre, merge)
    e_b, e_k, e_c = _output_strides(geff, merge)
    block = min(1024, layout.next_power_of_2(p.L))
    grid = (p.batch * p.channels, layout.cdiv(p.L, block))
    run = _gate_grad_launch[grid] if sites is None else _gate_grad_launch.at(sites, "gate", grid)
    run(
        gy, pre, z, dz, geff, p.L, p.channels, k_terms,
        g_b, g_k, g_c, pre_b, pre_k, pre_c, z.stride(0), z.stride(1), e_b, e_k, e_c,
        BLOCK=block, num_warps=4,
    )  # fmt: skip
    return geff


def _output_strides(x: torch.Tensor, merge: str) -> tuple[int, int, int]:
    """(batch, order, channel) strides of an output-shaped tensor.

    ``(B, C, *S)`` when the orders were summed (order stride 0: every order sees the same values), ``(B, K, C, *S)``
    when stacked.
    """
    if merge == "sum":
        return x.stride(0), 0, x.stride(1)
    return x.stride(0), x.stride(1), x.stride(2)
