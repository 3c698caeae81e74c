"""The backward's main pass for a strided order as line vectors: LV of its lines per thread, side by side.

The forward's line vectors (lines.py) made SegMamba's slice order cheap to scan forwards, but its backward ran on
the chunk path, one token at a time: each token of each channel a separate 2-byte load from its own sector, and
B_n, C_n one load per value. On an H100 that main pass took 5.96 ms at 64³ (bf16, d 96, batch 2), as long as the
raster and reversed orders' two together. Here a thread holds LV neighbouring lines of its channel, as in the
forward: a token's u, Δ, g of the LV lines come in one vector load, and B_n, C_n of the LV lines in one vector
load broadcast to the program's 32 channels.

Every line is a segment of the chunk path's segment and carry passes (backward.py), which leave each line's
incoming adjoint in its ρ slot; the lines of a program are then independent. Per line, chunk by chunk from the
last, the pass works as the chunk path's main pass (backward.py's module docstring has the formulas): the state in
the chunk's middle from the saved chunk-start state, then each half of 8 tokens, last half first, with the states
a run-time loop (unrolled, they would spill) and, per state, h run forwards and λ backwards one token a step. The
tokens of a half are 8 named (SUB, LV) tiles, so each thread keeps u, Δ, g and the two λ sums of its LV lines
across the state loop (40·LV registers). ρ, the middle state and dA live in the per-line fp32 slots of the chunk
path, channels fastest; each thread touches only its own. dB and dC are summed over the program's 32 channels per
token and line: on the GPU path by a reduce-scatter over the warp per line (ptx._lane_sum8, as the chunk path), else
``tl.sum``. On sm_90a, with the launch's specialisation of strides that are multiples of 16, Triton keeps a
thread's LV lines in its registers (benchmarks/scan_sass.py --kernel lines-backward --divisible: LV 2 in bf16, 255
registers, no spills, 532 instructions per state and half with 36 shuffles).

Chosen by ``PassConfig.line_vectors`` in the backward's settings (2 by default; 0: off) for ungated calls of one
such order (layout.line_groups); the forward's saved chunk-start states are read as they are, whichever path saved
them.

The segment pass of such calls can run as line vectors too (``_bwd_lines_segment_kernel``,
``PassConfig.line_vector_segments``): each line's outgoing adjoint from zero, ``ρ = Σ_t exp(A·Σ_{j≤t} Δ_j)·g_t·C_t``,
by the reverse recurrence ``r ← exp(Δ_t·A)·(g_t·C_t + r)`` a token at a time, chunk by chunk from the last, with
the states a run-time loop over per-line slots (ρ itself); the chunk path's segment pass gathers each token of
the lines from its own sector.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _forward8, _order_row, _softplus, _state_sums8
from .lines import _pick, _store_lines
from .ptx import _lane_id, _lane_sum8

__all__: list[str] = []

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _at(q, st_fast, LV: tl.constexpr):
    # offset of token q along the lines from their first tokens (st_fast: a multiple of LV, layout.line_groups)
    return tl.multiple_of(st_fast.to(tl.int64) * q, LV)


@triton.jit
def _tok(rows, line_off, q, st_fast, LV: tl.constexpr):
    # (SUB, LV) fp32: token q of the LV lines for the channels' rows, one vector load per thread
    return tl.load(rows[:, None] + (line_off + _at(q, st_fast, LV))[None, :]).to(tl.float32)


@triton.jit
def _put(rows, line_off, q, st_fast, x, LV: tl.constexpr):
    tl.store(rows[:, None] + (line_off + _at(q, st_fast, LV))[None, :], x)


@triton.jit
def _pre(d_rows, line_off, q, st_fast, bias, HAS_BIAS: tl.constexpr, LV: tl.constexpr):
    # Δ_raw + bias of token q: the softplus argument
    pre = _tok(d_rows, line_off, q, st_fast, LV)
    if HAS_BIAS:
        pre += bias[:, None]
    return pre


@triton.jit
def _dt(d_rows, line_off, q, st_fast, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LV: tl.constexpr):
    # Δ of token q
    dt = _pre(d_rows, line_off, q, st_fast, bias, HAS_BIAS, LV)
    if SOFTPLUS:
        dt = _softplus(dt)
    return dt


@triton.jit
def _tok8(rows, line_off, q0, st_fast, LV: tl.constexpr):
    # tokens q0 … q0 + 7 of the LV lines (8 named tiles: Triton has no lists of tensors)
    return (
        _tok(rows, line_off, q0 + 0, st_fast, LV), _tok(rows, line_off, q0 + 1, st_fast, LV),
        _tok(rows, line_off, q0 + 2, st_fast, LV), _tok(rows, line_off, q0 + 3, st_fast, LV),
        _tok(rows, line_off, q0 + 4, st_fast, LV), _tok(rows, line_off, q0 + 5, st_fast, LV),
        _tok(rows, line_off, q0 + 6, st_fast, LV), _tok(rows, line_off, q0 + 7, st_fast, LV),
    )  # fmt: skip


@triton.jit
def _dt8(d_rows, line_off, q0, st_fast, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LV: tl.constexpr):
    # Δ of tokens q0 … q0 + 7
    return (
        _dt(d_rows, line_off, q0 + 0, st_fast, bias, HAS_BIAS, SOFTPLUS, LV),
        _dt(d_rows, line_off, q0 + 1, st_fast, bias, HAS_BIAS, SOFTPLUS, LV),
        _dt(d_rows, line_off, q0 + 2, st_fast, bias, HAS_BIAS, SOFTPLUS, LV),
        _dt(d_rows, line_off, q0 + 3, st_fast, bias, HAS_BIAS, SOFTPLUS, LV),
        _dt(d_rows, line_off, q0 + 4, st_fast, bias, HAS_BIAS, SOFTPLUS, LV),
        _dt(d_rows, line_off, q0 + 5, st_fast, bias, HAS_BIAS, SOFTPLUS, LV),
        _dt(d_rows, line_off, q0 + 6, st_fast, bias, HAS_BIAS, SOFTPLUS, LV),
        _dt(d_rows, line_off, q0 + 7, st_fast, bias, HAS_BIAS, SOFTPLUS, LV),
    )


@triton.jit
def _bc(line_ptr, line_off, q, st_fast, LV: tl.constexpr):
    # (1, LV) fp32: B_n or C_n of token q of the lines, broadcast to the channels
    return tl.load(line_ptr + line_off + _at(q, st_fast, LV)).to(tl.float32)[None, :]


@triton.jit
def _bc8(line_ptr, line_off, q0, st_fast, LV: tl.constexpr):
    # (LV,) in B's or C's dtype: B_n or C_n of tokens q0 … q0 + 7 of the lines, as loaded (converted where used, so
    # that values carried a state ahead hold half the registers in 16 bits)
    rows = line_ptr + line_off
    return (
        tl.load(rows + _at(q0 + 0, st_fast, LV)), tl.load(rows + _at(q0 + 1, st_fast, LV)),
        tl.load(rows + _at(q0 + 2, st_fast, LV)), tl.load(rows + _at(q0 + 3, st_fast, LV)),
        tl.load(rows + _at(q0 + 4, st_fast, LV)), tl.load(rows + _at(q0 + 5, st_fast, LV)),
        tl.load(rows + _at(q0 + 6, st_fast, LV)), tl.load(rows + _at(q0 + 7, st_fast, LV)),
    )  # fmt: skip


@triton.jit
def _f32(x):
    # (LV,) as loaded -> (1, LV) fp32, broadcast to the channels
    return x.to(tl.float32)[None, :]


@triton.jit
def _load_lines(rows, line_stride, jj, LV: tl.constexpr):
    # (SUB, LV): column j is the (SUB,) vector at rows + j·line_stride. Loaded line by line: each load is coalesced
    # over the channels and the tile keeps its columns in the thread
    tile = tl.where(jj[None, :] == 0, tl.load(rows)[:, None], 0.0)
    for j in tl.static_range(1, LV):
        tile = tl.where(jj[None, :] == j, tl.load(rows + j * line_stride)[:, None], tile)
    return tile


@triton.jit
def _reduce_store(ptr, line_off, q, st_fast, x, LV: tl.constexpr):
    # Σ over the program's channels of the (SUB, LV) tile x, stored at token q of the lines
    tl.store(ptr + line_off + _at(q, st_fast, LV), tl.sum(x, axis=0))


@triton.jit
def _half(
    q0, u_rows, d_rows, g_rows, du_rows, dd_rows, A_rows, B_line, C_line, dB_rows, dC_rows,
    start_rows, start_stride, start_ok, rho_rows, dA_rows, line_off, st_fast, bias, Dv, jj, lane, lane_off,
    N, CH, L, sB_n, sC_n,
    LV: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    LANE_SUMS: tl.constexpr, LOAD_AHEAD: tl.constexpr,
):  # fmt: skip
    # Tokens q0 … q0 + 7 of the LV lines, from their start states (start_rows + n·CH, lines start_stride apart) with
    # the adjoint ρ of the tokens after them (the ρ slots, lines N·CH apart, updated to the half's own); writes du,
    # dΔ and the dB/dC partials of the tokens and adds the half's dA to the slots. Returns (Σ g·u, Σ dΔ_raw).
    u0, u1, u2, u3, u4, u5, u6, u7 = _tok8(u_rows, line_off, q0, st_fast, LV)
    t0, t1, t2, t3, t4, t5, t6, t7 = _dt8(d_rows, line_off, q0, st_fast, bias, HAS_BIAS, SOFTPLUS, LV)
    g0, g1, g2, g3, g4, g5, g6, g7 = _tok8(g_rows, line_off, q0, st_fast, LV)
    lb0 = tl.zeros_like(u0)  # Σ_n λ·B per token
    lb1 = tl.zeros_like(u0)
    lb2 = tl.zeros_like(u0)
    lb3 = tl.zeros_like(u0)
    lb4 = tl.zeros_like(u0)
    lb5 = tl.zeros_like(u0)
    lb6 = tl.zeros_like(u0)
    lb7 = tl.zeros_like(u0)
    la0 = tl.zeros_like(u0)  # Σ_n λ·(h − Δ·u·B)·A per token
    la1 = tl.zeros_like(u0)
    la2 = tl.zeros_like(u0)
    la3 = tl.zeros_like(u0)
    la4 = tl.zeros_like(u0)
    la5 = tl.zeros_like(u0)
    la6 = tl.zeros_like(u0)
    la7 = tl.zeros_like(u0)
    # LOAD_AHEAD: state n + 1's A and B_n row are loaded during state n (state 0's outside the switch: Triton 3.8
    # resolves a run-time loop body's names in both branches of a constexpr if; unused, they compile away)
    A_at = tl.load(A_rows)
    r0, r1, r2, r3, r4, r5, r6, r7 = _bc8(B_line, line_off, q0, st_fast, LV)
    for n in range(N):
        n_next = tl.minimum(n + 1, N - 1)
        if LOAD_AHEAD:
            A_n = A_at[:, None]
            w0, w1, w2, w3, w4, w5, w6, w7 = r0, r1, r2, r3, r4, r5, r6, r7
            A_at = tl.load(A_rows + n_next * CH)
            r0, r1, r2, r3, r4, r5, r6, r7 = _bc8(B_line + n_next * sB_n, line_off, q0, st_fast, LV)
        else:
            A_n = tl.load(A_rows + n * CH)[:, None]
            w0, w1, w2, w3, w4, w5, w6, w7 = _bc8(B_line + n * sB_n, line_off, q0, st_fast, LV)
        b0, b1, b2, b3 = _f32(w0), _f32(w1), _f32(w2), _f32(w3)
        b4, b5, b6, b7 = _f32(w4), _f32(w5), _f32(w6), _f32(w7)
        A2 = A_n * LOG2E
        Cp = C_line + n * sC_n
        a0 = tl.exp2(t0 * A2)
        a1 = tl.exp2(t1 * A2)
        a2 = tl.exp2(t2 * A2)
        a3 = tl.exp2(t3 * A2)
        a4 = tl.exp2(t4 * A2)
        a5 = tl.exp2(t5 * A2)
        a6 = tl.exp2(t6 * A2)
        a7 = tl.exp2(t7 * A2)
        x0 = t0 * u0 * b0
        x1 = t1 * u1 * b1
        x2 = t2 * u2 * b2
        x3 = t3 * u3 * b3
        x4 = t4 * u4 * b4
        x5 = t5 * u5 * b5
        x6 = t6 * u6 * b6
        x7 = t7 * u7 * b7
        h_start = tl.where(start_ok[None, :], _load_lines(start_rows + n * CH, start_stride, jj, LV), 0.0)
        h0, h1, h2, h3, h4, h5, h6, h7 = _forward8(
            h_start, a0, a1, a2, a3, a4, a5, a6, a7, x0, x1, x2, x3, x4, x5, x6, x7
        )
        # the adjoint written out, not common._adjoint8: C_t loaded inside the chain took 7 fewer instructions per
        # state and half (sm_90a, bf16) than all of them first
        l7 = g7 * _bc(Cp, line_off, q0 + 7, st_fast, LV) + _load_lines(rho_rows + n * CH, N * CH, jj, LV)
        l6 = g6 * _bc(Cp, line_off, q0 + 6, st_fast, LV) + a7 * l7
        l5 = g5 * _bc(Cp, line_off, q0 + 5, st_fast, LV) + a6 * l6
        l4 = g4 * _bc(Cp, line_off, q0 + 4, st_fast, LV) + a5 * l5
        l3 = g3 * _bc(Cp, line_off, q0 + 3, st_fast, LV) + a4 * l4
        l2 = g2 * _bc(Cp, line_off, q0 + 2, st_fast, LV) + a3 * l3
        l1 = g1 * _bc(Cp, line_off, q0 + 1, st_fast, LV) + a2 * l2
        l0 = g0 * _bc(Cp, line_off, q0 + 0, st_fast, LV) + a1 * l1
        _store_lines(rho_rows + n * CH, N * CH, a0 * l0, jj, LV)  # ρ = a·λ of the half's first token
        lb0, lb1, lb2, lb3, lb4, lb5, lb6, lb7, la0, la1, la2, la3, la4, la5, la6, la7, dA = _state_sums8(
            l0, l1, l2, l3, l4, l5, l6, l7, h0, h1, h2, h3, h4, h5, h6, h7, x0, x1, x2, x3, x4, x5, x6, x7,
            b0, b1, b2, b3, b4, b5, b6, b7, t0, t1, t2, t3, t4, t5, t6, t7, A_n,
            lb0, lb1, lb2, lb3, lb4, lb5, lb6, lb7, la0, la1, la2, la3, la4, la5, la6, la7,
        )  # fmt: skip
        _store_lines(dA_rows + n * CH, N * CH, _load_lines(dA_rows + n * CH, N * CH, jj, LV) + dA, jj, LV)
        dBn = dB_rows + n * L
        dCn = dC_rows + n * L
        if LANE_SUMS:
            # a reduce-scatter over the warp per line (ptx._lane_sum8): lane l gets the sum of token (l >> 2) & 7,
            # and lanes l % 4 == 0 store it; 9 shuffles per line and 8 tokens where the butterflies of tl.sum take 40
            store_l = (lane & 3) == 0
            for j in tl.static_range(LV):
                dB_l = _lane_sum8(
                    _pick(l0 * t0 * u0, jj, j), _pick(l1 * t1 * u1, jj, j), _pick(l2 * t2 * u2, jj, j),
                    _pick(l3 * t3 * u3, jj, j), _pick(l4 * t4 * u4, jj, j), _pick(l5 * t5 * u5, jj, j),
                    _pick(l6 * t6 * u6, jj, j), _pick(l7 * t7 * u7, jj, j), lane,
                )  # fmt: skip
                dC_l = _lane_sum8(
                    _pick(g0 * h0, jj, j), _pick(g1 * h1, jj, j), _pick(g2 * h2, jj, j), _pick(g3 * h3, jj, j),
                    _pick(g4 * h4, jj, j), _pick(g5 * h5, jj, j), _pick(g6 * h6, jj, j), _pick(g7 * h7, jj, j),
                    lane,
                )  # fmt: skip
                tl.store(dBn + lane_off + j, dB_l, mask=store_l)
                tl.store(dCn + lane_off + j, dC_l, mask=store_l)
        else:
            _reduce_store(dBn, line_off, q0 + 0, st_fast, l0 * t0 * u0, LV)
            _reduce_store(dBn, line_off, q0 + 1, st_fast, l1 * t1 * u1, LV)
            _reduce_store(dBn, line_off, q0 + 2, st_fast, l2 * t2 * u2, LV)
            _reduce_store(dBn, line_off, q0 + 3, st_fast, l3 * t3 * u3, LV)
            _reduce_store(dBn, line_off, q0 + 4, st_fast, l4 * t4 * u4, LV)
            _reduce_store(dBn, line_off, q0 + 5, st_fast, l5 * t5 * u5, LV)
            _reduce_store(dBn, line_off, q0 + 6, st_fast, l6 * t6 * u6, LV)
            _reduce_store(dBn, line_off, q0 + 7, st_fast, l7 * t7 * u7, LV)
            _reduce_store(dCn, line_off, q0 + 0, st_fast, g0 * h0, LV)
            _reduce_store(dCn, line_off, q0 + 1, st_fast, g1 * h1, LV)
            _reduce_store(dCn, line_off, q0 + 2, st_fast, g2 * h2, LV)
            _reduce_store(dCn, line_off, q0 + 3, st_fast, g3 * h3, LV)
            _reduce_store(dCn, line_off, q0 + 4, st_fast, g4 * h4, LV)
            _reduce_store(dCn, line_off, q0 + 5, st_fast, g5 * h5, LV)
            _reduce_store(dCn, line_off, q0 + 6, st_fast, g6 * h6, LV)
            _reduce_store(dCn, line_off, q0 + 7, st_fast, g7 * h7, LV)
    gd = _finish_token(q0 + 0, u0, t0, g0, lb0, la0, d_rows, du_rows, dd_rows, line_off, st_fast, bias, Dv, HAS_D,
                       HAS_BIAS, SOFTPLUS, LV)  # fmt: skip
    gd += _finish_token(q0 + 1, u1, t1, g1, lb1, la1, d_rows, du_rows, dd_rows, line_off, st_fast, bias, Dv, HAS_D,
                        HAS_BIAS, SOFTPLUS, LV)  # fmt: skip
    gd += _finish_token(q0 + 2, u2, t2, g2, lb2, la2, d_rows, du_rows, dd_rows, line_off, st_fast, bias, Dv, HAS_D,
                        HAS_BIAS, SOFTPLUS, LV)  # fmt: skip
    gd += _finish_token(q0 + 3, u3, t3, g3, lb3, la3, d_rows, du_rows, dd_rows, line_off, st_fast, bias, Dv, HAS_D,
                        HAS_BIAS, SOFTPLUS, LV)  # fmt: skip
    gd += _finish_token(q0 + 4, u4, t4, g4, lb4, la4, d_rows, du_rows, dd_rows, line_off, st_fast, bias, Dv, HAS_D,
                        HAS_BIAS, SOFTPLUS, LV)  # fmt: skip
    gd += _finish_token(q0 + 5, u5, t5, g5, lb5, la5, d_rows, du_rows, dd_rows, line_off, st_fast, bias, Dv, HAS_D,
                        HAS_BIAS, SOFTPLUS, LV)  # fmt: skip
    gd += _finish_token(q0 + 6, u6, t6, g6, lb6, la6, d_rows, du_rows, dd_rows, line_off, st_fast, bias, Dv, HAS_D,
                        HAS_BIAS, SOFTPLUS, LV)  # fmt: skip
    gd += _finish_token(q0 + 7, u7, t7, g7, lb7, la7, d_rows, du_rows, dd_rows, line_off, st_fast, bias, Dv, HAS_D,
                        HAS_BIAS, SOFTPLUS, LV)  # fmt: skip
    gu = g0 * u0 + g1 * u1 + g2 * u2 + g3 * u3 + g4 * u4 + g5 * u5 + g6 * u6 + g7 * u7
    return gu, gd


@triton.jit
def _finish_token(q, u, dt, g, lam_B, lam_hA, d_rows, du_rows, dd_rows, line_off, st_fast, bias, Dv,
                  HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LV: tl.constexpr):  # fmt: skip
    # du = Δ·Σ λB + D·g and dΔ_raw = (u·Σ λB + Σ λ(h − Δ·u·B)·A)·σ(Δ_raw + bias) of token q; returns dΔ_raw
    du = dt * lam_B
    if HAS_D:
        du += Dv[:, None] * g
    ddt = u * lam_B + lam_hA
    if SOFTPLUS:
        pre = _pre(d_rows, line_off, q, st_fast, bias, HAS_BIAS, LV)  # reloaded: kept, it would hold 8·LV registers
        ddt = ddt * tl.sigmoid(pre)
    _put(du_rows, line_off, q, st_fast, du, LV)
    _put(dd_rows, line_off, q, st_fast, ddt, LV)
    return ddt


@triton.jit
def _bwd_lines_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, gy_ptr, state_ptr, last_ptr, rho_ptr, mid_ptr, dA_slot_ptr,
    order_ptr, saved_mid_ptr, du_ptr, ddl_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr,
    L, CH, N, G, CPG, cps, nlines,
    su_b, su_c, sd_b, sd_c, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sg_b, sg_c, so_b,
    SUB: tl.constexpr, LV: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    LANE_SUMS: tl.constexpr, LOAD_AHEAD: tl.constexpr = False, HAS_MIDS: tl.constexpr = False,
):  # fmt: skip
    # HAS_MIDS: the chunks' middle states as the forward saved them (PassConfig.mid_states) at saved_mid_ptr, laid out
    # as the chunk-start states: read, not recomputed.
    # A program: (32 channels of one group, LV neighbouring lines of the order, one batch entry), one thread per
    # channel holding its LV lines side by side; every line a segment whose incoming adjoint the carry pass left in
    # its ρ slot. Buffers as the chunk path's main pass (backward._bwd_kernel) with one order: slots (B, nlines, N,
    # C), saved states (B, nlines·cps, N, C), dB/dC partials (B, G, BPG, N, L), du/dΔ rows of L with batch stride
    # so_b, and per-line partials of dA (B, nlines, C, N), dD and d(delta_bias) (B, nlines, C). A comes laid out
    # (N, C), states outermost, so that a state's A values for 32 channels are one 128-byte line (as (C, N), its
    # per-state loads touched 32 sectors each).
    pid_blk = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c0 = pid_blk * SUB
    grp = c0 // CPG
    bpg = CPG // SUB
    _, mid, st_fast, _, st_slow, _ = _order_row(order_ptr, 0)  # one order, not reversed, st_mid == 1
    ch = (c0 + tl.arange(0, SUB)).to(tl.int64)
    jj = tl.arange(0, LV)
    l0 = g * LV  # the program's first line; its LV lines share the slow coordinate (mid % LV == 0)
    first_line = tl.multiple_of((l0 // mid).to(tl.int64) * st_slow + (l0 % mid), LV)  # its first token's offset
    line_off = first_line + jj
    lane = _lane_id(tl.arange(0, SUB))  # LANE_SUMS: lane l sums token (l >> 2) & 7 of a half
    u_rows = u_ptr + b * su_b + ch * su_c
    d_rows = dl_ptr + b * sd_b + ch * sd_c
    g_rows = gy_ptr + b * sg_b + ch * sg_c
    du_rows = du_ptr + b * so_b + ch * L
    dd_rows = ddl_ptr + b * so_b + ch * L
    B_line = B_ptr + b * sB_b + grp.to(tl.int64) * sB_g
    C_line = C_ptr + b * sC_b + grp.to(tl.int64) * sC_g
    part_row = ((b * G + grp) * bpg + (c0 % CPG) // SUB) * N
    dB_rows = dB_ptr + part_row * L
    dC_rows = dC_ptr + part_row * L
    slot = (b * nlines + l0) * N * CH + ch  # the first line's slots; line j's are j·N·CH further
    rho_rows = rho_ptr + slot
    mid_rows = mid_ptr + slot
    dA_rows = dA_slot_ptr + slot
    st_rows = state_ptr + (b * nlines + l0) * cps * N * CH + ch  # chunk c of line j: (j·cps + c)·N·CH further
    saved_mid_rows = saved_mid_ptr + (b * nlines + l0) * cps * N * CH + ch  # HAS_MIDS: alike
    A_rows = A_ptr + ch  # A laid out (N, C): a state's row is one line per 32 channels
    bias = tl.zeros([SUB], dtype=tl.float32)
    Dv = tl.zeros([SUB], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch)
    if HAS_D:
        Dv = tl.load(D_ptr + ch)
    zero = tl.zeros([SUB, LV], dtype=tl.float32)
    for n in range(N):
        _store_lines(dA_rows + n * CH, N * CH, zero, jj, LV)
        if l0 + LV == nlines:  # the adjoint after the last token (the carry pass wrote the other lines')
            last = tl.load(last_ptr + (b * CH + ch) * N + n)
            tl.store(rho_rows + (LV - 1) * N * CH + n * CH, last)
    all_lines = jj == jj
    gu_acc = zero
    gd_acc = zero
    for i in range(cps):
        c = cps - 1 - i
        q0 = c * 16
        start_rows = st_rows + c * N * CH
        start_ok = (l0 + jj) * cps + c > 0  # the sequence's first chunk starts from zero (its state may be unwritten)
        if not HAS_MIDS:
            # the state after the chunk's first half: exp(A·ΣΔ)·h_start + Σ_t exp(A·Σ_{j>t} Δ_j)·Δ_t·u_t·B_t
            t0, t1, t2, t3, t4, t5, t6, t7 = _dt8(d_rows, line_off, q0, st_fast, bias, HAS_BIAS, SOFTPLUS, LV)
            u0, u1, u2, u3, u4, u5, u6, u7 = _tok8(u_rows, line_off, q0, st_fast, LV)
            x0, x1, x2, x3, x4, x5, x6, x7 = t0 * u0, t1 * u1, t2 * u2, t3 * u3, t4 * u4, t5 * u5, t6 * u6, t7 * u7
            s7 = t7  # Σ_{j>t} Δ_j for t = 6, 5, …
            s6 = s7 + t6
            s5 = s6 + t5
            s4 = s5 + t4
            s3 = s4 + t3
            s2 = s3 + t2
            s1 = s2 + t1
            total = s1 + t0
            # (LOAD_AHEAD: state n + 1's A and B_n row loaded during state n, as in _half)
            A_at = tl.load(A_rows)
            r0, r1, r2, r3, r4, r5, r6, r7 = _bc8(B_line, line_off, q0, st_fast, LV)
            for n in range(N):
                n_next = tl.minimum(n + 1, N - 1)
                if LOAD_AHEAD:
                    A2 = A_at[:, None] * LOG2E
                    w0, w1, w2, w3, w4, w5, w6, w7 = r0, r1, r2, r3, r4, r5, r6, r7
                    A_at = tl.load(A_rows + n_next * CH)
                    r0, r1, r2, r3, r4, r5, r6, r7 = _bc8(B_line + n_next * sB_n, line_off, q0, st_fast, LV)
                else:
                    A2 = tl.load(A_rows + n * CH)[:, None] * LOG2E
                    w0, w1, w2, w3, w4, w5, w6, w7 = _bc8(B_line + n * sB_n, line_off, q0, st_fast, LV)
                b0, b1, b2, b3 = _f32(w0), _f32(w1), _f32(w2), _f32(w3)
                b4, b5, b6, b7 = _f32(w4), _f32(w5), _f32(w6), _f32(w7)
                tail = x7 * b7
                tail += tl.exp2(s7 * A2) * x6 * b6
                tail += tl.exp2(s6 * A2) * x5 * b5
                tail += tl.exp2(s5 * A2) * x4 * b4
                tail += tl.exp2(s4 * A2) * x3 * b3
                tail += tl.exp2(s3 * A2) * x2 * b2
                tail += tl.exp2(s2 * A2) * x1 * b1
                tail += tl.exp2(s1 * A2) * x0 * b0
                h_start = tl.where(start_ok[None, :], _load_lines(start_rows + n * CH, cps * N * CH, jj, LV), 0.0)
                _store_lines(mid_rows + n * CH, N * CH, tl.exp2(total * A2) * h_start + tail, jj, LV)
        for half in tl.static_range(1, -1, -1):  # the second half first: the adjoint flows backwards
            if half == 1:
                if HAS_MIDS:
                    half_start, half_stride = saved_mid_rows + c * N * CH, cps * N * CH
                else:
                    half_start, half_stride = mid_rows, N * CH
                gu, gd = _half(
                    q0 + 8, u_rows, d_rows, g_rows, du_rows, dd_rows, A_rows, B_line, C_line, dB_rows, dC_rows,
                    half_start, half_stride, all_lines, rho_rows, dA_rows, line_off, st_fast, bias, Dv, jj, lane,
                    first_line + st_fast.to(tl.int64) * (q0 + 8 + ((lane >> 2) & 7)), N, CH, L, sB_n, sC_n, LV, HAS_D,
                    HAS_BIAS, SOFTPLUS, LANE_SUMS, LOAD_AHEAD,
                )  # fmt: skip
            else:
                gu, gd = _half(
                    q0, u_rows, d_rows, g_rows, du_rows, dd_rows, A_rows, B_line, C_line, dB_rows, dC_rows,
                    start_rows, cps * N * CH, start_ok, rho_rows, dA_rows, line_off, st_fast, bias, Dv, jj, lane,
                    first_line + st_fast.to(tl.int64) * (q0 + ((lane >> 2) & 7)), N, CH, L, sB_n, sC_n, LV, HAS_D,
                    HAS_BIAS, SOFTPLUS, LANE_SUMS, LOAD_AHEAD,
                )  # fmt: skip
            gu_acc += gu
            gd_acc += gd
    part = (b * nlines + l0) * CH + ch  # per-line partials; line j's are j·CH rows further
    for n in range(N):
        _store_lines(dA_ptr + part * N + n, CH * N, _load_lines(dA_rows + n * CH, N * CH, jj, LV), jj, LV)
    if HAS_D:
        _store_lines(dD_ptr + part, CH, gu_acc, jj, LV)
    if HAS_BIAS:
        _store_lines(dbias_ptr + part, CH, gd_acc, jj, LV)


@triton.jit
def _bwd_lines_segment_kernel(
    dl_ptr, A_ptr, C_ptr, bias_ptr, gy_ptr, seg_rho_ptr, seg_dt_ptr, order_ptr,
    CH, N, CPG, cps, nlines,
    sd_b, sd_c, sC_b, sC_g, sC_n, sg_b, sg_c,
    SUB: tl.constexpr, LV: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
):  # fmt: skip
    # A program: (32 channels of one group, LV neighbouring lines, one batch entry), as the main pass. Every line
    # is a segment: its adjoint at its first token from zero after its last, ρ (B, nlines, N, C), and its Σ Δ (B,
    # nlines, C), both channels fastest, the layout of backward._bwd_segment_kernel with one order. A laid out (N, C)
    # as for the main pass.
    pid_blk = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c0 = pid_blk * SUB
    grp = c0 // CPG
    _, mid, st_fast, _, st_slow, _ = _order_row(order_ptr, 0)  # one order, not reversed, st_mid == 1
    ch = (c0 + tl.arange(0, SUB)).to(tl.int64)
    jj = tl.arange(0, LV)
    l0 = g * LV
    line_off = tl.multiple_of((l0 // mid).to(tl.int64) * st_slow + (l0 % mid), LV) + jj
    d_rows = dl_ptr + b * sd_b + ch * sd_c
    g_rows = gy_ptr + b * sg_b + ch * sg_c
    C_line = C_ptr + b * sC_b + grp.to(tl.int64) * sC_g
    A_rows = A_ptr + ch  # A laid out (N, C): a state's row is one line per 32 channels
    rho_rows = seg_rho_ptr + (b * nlines + l0) * N * CH + ch  # line j's are j·N·CH further
    bias = tl.zeros([SUB], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch)
    dts = tl.zeros([SUB, LV], dtype=tl.float32)
    for i in range(cps):
        q0 = (cps - 1 - i) * 16  # chunks from the last
        t0, t1, t2, t3, t4, t5, t6, t7 = _dt8(d_rows, line_off, q0, st_fast, bias, HAS_BIAS, SOFTPLUS, LV)
        t8, t9, t10, t11, t12, t13, t14, t15 = _dt8(d_rows, line_off, q0 + 8, st_fast, bias, HAS_BIAS, SOFTPLUS, LV)
        g0, g1, g2, g3, g4, g5, g6, g7 = _tok8(g_rows, line_off, q0, st_fast, LV)
        g8, g9, g10, g11, g12, g13, g14, g15 = _tok8(g_rows, line_off, q0 + 8, st_fast, LV)
        dts += t0 + t1 + t2 + t3 + t4 + t5 + t6 + t7 + t8 + t9 + t10 + t11 + t12 + t13 + t14 + t15
        for n in range(N):
            A2 = tl.load(A_rows + n * CH)[:, None] * LOG2E
            Cp = C_line + n * sC_n
            if i == 0:  # after the line's last token: zero
                r = tl.zeros([SUB, LV], dtype=tl.float32)
            else:
                r = _load_lines(rho_rows + n * CH, N * CH, jj, LV)
            r = tl.exp2(t15 * A2) * (g15 * _bc(Cp, line_off, q0 + 15, st_fast, LV) + r)
            r = tl.exp2(t14 * A2) * (g14 * _bc(Cp, line_off, q0 + 14, st_fast, LV) + r)
            r = tl.exp2(t13 * A2) * (g13 * _bc(Cp, line_off, q0 + 13, st_fast, LV) + r)
            r = tl.exp2(t12 * A2) * (g12 * _bc(Cp, line_off, q0 + 12, st_fast, LV) + r)
            r = tl.exp2(t11 * A2) * (g11 * _bc(Cp, line_off, q0 + 11, st_fast, LV) + r)
            r = tl.exp2(t10 * A2) * (g10 * _bc(Cp, line_off, q0 + 10, st_fast, LV) + r)
            r = tl.exp2(t9 * A2) * (g9 * _bc(Cp, line_off, q0 + 9, st_fast, LV) + r)
            r = tl.exp2(t8 * A2) * (g8 * _bc(Cp, line_off, q0 + 8, st_fast, LV) + r)
            r = tl.exp2(t7 * A2) * (g7 * _bc(Cp, line_off, q0 + 7, st_fast, LV) + r)
            r = tl.exp2(t6 * A2) * (g6 * _bc(Cp, line_off, q0 + 6, st_fast, LV) + r)
            r = tl.exp2(t5 * A2) * (g5 * _bc(Cp, line_off, q0 + 5, st_fast, LV) + r)
            r = tl.exp2(t4 * A2) * (g4 * _bc(Cp, line_off, q0 + 4, st_fast, LV) + r)
            r = tl.exp2(t3 * A2) * (g3 * _bc(Cp, line_off, q0 + 3, st_fast, LV) + r)
            r = tl.exp2(t2 * A2) * (g2 * _bc(Cp, line_off, q0 + 2, st_fast, LV) + r)
            r = tl.exp2(t1 * A2) * (g1 * _bc(Cp, line_off, q0 + 1, st_fast, LV) + r)
            r = tl.exp2(t0 * A2) * (g0 * _bc(Cp, line_off, q0 + 0, st_fast, LV) + r)
            _store_lines(rho_rows + n * CH, N * CH, r, jj, LV)
    _store_lines(seg_dt_ptr + (b * nlines + l0) * CH + ch, CH, dts, jj, LV)
