"""The forward of a strided order as line vectors: several of its lines per thread, side by side.

SegMamba's slice order (depth fastest) steps H·W elements from token to token, so a program that walks it token
by token reads a new 32-byte sector per token and, worse, issues one load per B/C value: 512 per chunk where a
raster program issues 64 broadcast 16-byte loads (kernels/DESIGN.md). But its lines (one pass along the depth
axis) are neighbours in memory: token d of line i + 1 sits next to token d of line i. Here a thread holds ``LV``
neighbouring lines of its channel as one ``(SUB, LV)`` tile row and walks them together, one token a step: each
step loads u, Δ and z of its LV lines as one vector and B_n, C_n of the LV lines as one vector broadcast to the
program's 32 channels. The LV recurrences of a step are independent, so they also hide each other's latency, and
no value ever leaves its thread (no shuffles; the 16 states are 16 named tiles, not a tensor axis that Triton
could spread over lanes).

Each line is a segment. The segment pass (``END_ONLY``) leaves every line's end state from zero and its Σ Δ, and
folds its LV lines into one affine map per program (a group); ``forward._fwd_carry_kernel`` chains the groups;
the main pass starts its first line from the carried state and each next line from the previous one through the
lines' maps, then saves the chunk-start states for the backward in the layout of the other path.

It serves calls of one such order with 16 states (layout.line_groups says which; ``PassConfig.line_vectors`` sets
LV). On an H100, SegMamba's slice order alone at 64³ (d 96, batch 2, z, back to back): bf16 forward 4.09 → 1.88 ms
and forward+backward 12.79 → 12.00 ms against the chunk passes; fp32 4.08 → 4.12 and 13.34 → 13.09 ms (its main
pass takes 255 registers). The backward reads the chunk-start states saved here: by default as line vectors too
(lines_backward.py), else on the chunk path.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _order_row, _softplus

__all__: list[str] = []

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x·log2 e)


@triton.jit
def _step(h, dt, dtu, A_n, b_ptr, c_ptr, y, OUT: tl.constexpr):
    # one token of LV lines for state n: h ← exp(Δ·A)·h + Δ·u·B, and y += C·h when the output is wanted
    h = tl.exp2(dt * A_n[:, None]) * h + dtu * tl.load(b_ptr).to(tl.float32)[None, :]
    if OUT:
        y += h * tl.load(c_ptr).to(tl.float32)[None, :]
    return h, y


@triton.jit
def _pick(x, jj, j: tl.constexpr):
    # column j of a (SUB, LV) tile as a (SUB,) vector: a register pick, the LV columns are in the thread
    return tl.sum(tl.where(jj[None, :] == j, x, 0.0), axis=1)


@triton.jit
def _store_lines(rows, line_stride, x, jj, LV: tl.constexpr):
    # column j of the (SUB, LV) tile x to rows + j·line_stride, one (SUB,) store per line: the stores stay
    # coalesced over the channels without Triton moving the tile to another layout (a 2D store of channel-contiguous
    # addresses went through shared memory)
    for j in tl.static_range(LV):
        tl.store(rows + j * line_stride, _pick(x, jj, j))


@triton.jit
def _store_states16(rows, line_stride, CH, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15, jj,
                    LV: tl.constexpr):  # fmt: skip
    # the 16 states' (SUB, LV) tiles: state n to rows + n·CH, its lines line_stride apart
    _store_lines(rows + 0 * CH, line_stride, h0, jj, LV)
    _store_lines(rows + 1 * CH, line_stride, h1, jj, LV)
    _store_lines(rows + 2 * CH, line_stride, h2, jj, LV)
    _store_lines(rows + 3 * CH, line_stride, h3, jj, LV)
    _store_lines(rows + 4 * CH, line_stride, h4, jj, LV)
    _store_lines(rows + 5 * CH, line_stride, h5, jj, LV)
    _store_lines(rows + 6 * CH, line_stride, h6, jj, LV)
    _store_lines(rows + 7 * CH, line_stride, h7, jj, LV)
    _store_lines(rows + 8 * CH, line_stride, h8, jj, LV)
    _store_lines(rows + 9 * CH, line_stride, h9, jj, LV)
    _store_lines(rows + 10 * CH, line_stride, h10, jj, LV)
    _store_lines(rows + 11 * CH, line_stride, h11, jj, LV)
    _store_lines(rows + 12 * CH, line_stride, h12, jj, LV)
    _store_lines(rows + 13 * CH, line_stride, h13, jj, LV)
    _store_lines(rows + 14 * CH, line_stride, h14, jj, LV)
    _store_lines(rows + 15 * CH, line_stride, h15, jj, LV)


@triton.jit
def _line_starts(h_group, A_n, n, line_ptr, ldt_ptr, jj, CH, N, LV: tl.constexpr):
    # (SUB, LV) start states of state n for the group's lines: line 0 starts from the group's state, line j + 1 from
    # line j's through its map h ← exp(A·ΣΔ_j)·h + h_j (the segment pass's end state from zero and Σ Δ)
    tile = tl.where(jj[None, :] == 0, h_group[:, None], 0.0)
    s = h_group
    for j in tl.static_range(LV - 1):
        dts = tl.load(ldt_ptr + j * CH)
        s = tl.exp2(A_n * dts) * s + tl.load(line_ptr + (j * N + n) * CH)
        tile = tl.where(jj[None, :] == j + 1, s[:, None], tile)
    return tile


@triton.jit
def _fold(h, dts, A_n, jj, LV: tl.constexpr):
    # the group's map of state n: its LV lines' maps composed in order (from zero)
    g = _pick(h, jj, 0)
    for j in tl.static_range(1, LV):
        g = tl.exp2(A_n * _pick(dts, jj, j)) * g + _pick(h, jj, j)
    return g


@triton.jit
def _fwd_lines_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr,
    out_ptr, pre_ptr, state_ptr, last_ptr, seg_state_ptr, seg_dt_ptr, line_ptr, ldt_ptr, order_ptr, mid_ptr,
    CH, CPG, cps, n_state, nlines, ngroups,
    su_b, su_c, sd_b, sd_c, sB_b, sB_g, sB_n, sC_b, sC_g, sC_n, sz_b, sz_c, so_b, so_c, sp_b, sp_c,
    SUB: tl.constexpr, LV: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    GATE: tl.constexpr, STORE_PRE: tl.constexpr, SAVE_STATES: tl.constexpr, END_ONLY: tl.constexpr,
    SAVE_MID: tl.constexpr = False,
):  # fmt: skip
    # A program: (32 channels of one group, LV neighbouring lines of the order = a group, one batch entry); one
    # thread per channel holding the group's lines side by side. END_ONLY: the segment pass (each line's end state
    # from zero and Σ Δ, and the group's map for the carry pass); else the main pass from the carried states.
    # SAVE_MID: each chunk's middle state too (after its 8th token), at mid_ptr in the chunk-start states' layout
    # (PassConfig.mid_states).
    N: tl.constexpr = 16
    pid_blk = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    c0 = pid_blk * SUB
    grp = (c0 // CPG).to(tl.int64)
    _, mid, st_fast, _, st_slow, _ = _order_row(order_ptr, 0)  # one order, not reversed, st_mid == 1
    ch = (c0 + tl.arange(0, SUB)).to(tl.int64)
    jj = tl.arange(0, LV)
    l0 = g * LV  # the group's first line; its LV lines share the slow coordinate (mid % LV == 0)
    # the lines' first tokens (st_mid == 1). Both strides are multiples of mid, a multiple of LV (layout.line_groups):
    # the hints let Triton keep a thread's LV lines in its registers and load them as one vector
    line_off = tl.multiple_of((l0 // mid).to(tl.int64) * st_slow + (l0 % mid), LV) + jj
    # rows of the channels; a step's (SUB, LV) tile is rows[:, None] + the lines' offsets of the step's token
    u_rows = u_ptr + b * su_b + ch * su_c
    d_rows = dl_ptr + b * sd_b + ch * sd_c
    z_rows = z_ptr + b * sz_b + ch * sz_c
    o_rows = out_ptr + b * so_b + ch * so_c
    p_rows = pre_ptr + b * sp_b + ch * sp_c
    B_line = B_ptr + b * sB_b + grp * sB_g + line_off  # (LV,): B_n of the lines, broadcast to the channels
    C_line = C_ptr + b * sC_b + grp * sC_g + line_off
    bias = tl.zeros([SUB], dtype=tl.float32)
    Dv = tl.zeros([SUB], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + ch)
    if HAS_D:
        Dv = tl.load(D_ptr + ch)
    A_rows = A_ptr + ch * N
    A0 = tl.load(A_rows + 0) * LOG2E
    A1 = tl.load(A_rows + 1) * LOG2E
    A2 = tl.load(A_rows + 2) * LOG2E
    A3 = tl.load(A_rows + 3) * LOG2E
    A4 = tl.load(A_rows + 4) * LOG2E
    A5 = tl.load(A_rows + 5) * LOG2E
    A6 = tl.load(A_rows + 6) * LOG2E
    A7 = tl.load(A_rows + 7) * LOG2E
    A8 = tl.load(A_rows + 8) * LOG2E
    A9 = tl.load(A_rows + 9) * LOG2E
    A10 = tl.load(A_rows + 10) * LOG2E
    A11 = tl.load(A_rows + 11) * LOG2E
    A12 = tl.load(A_rows + 12) * LOG2E
    A13 = tl.load(A_rows + 13) * LOG2E
    A14 = tl.load(A_rows + 14) * LOG2E
    A15 = tl.load(A_rows + 15) * LOG2E
    l_rows = line_ptr + (b * nlines + l0) * N * CH + ch  # per-line end states (B, nlines, N, C), the group's first
    t_rows = ldt_ptr + (b * nlines + l0) * CH + ch  # per-line Σ Δ (B, nlines, C)
    if END_ONLY:
        h0 = tl.zeros([SUB, LV], dtype=tl.float32)
        h1 = tl.zeros([SUB, LV], dtype=tl.float32)
        h2 = tl.zeros([SUB, LV], dtype=tl.float32)
        h3 = tl.zeros([SUB, LV], dtype=tl.float32)
        h4 = tl.zeros([SUB, LV], dtype=tl.float32)
        h5 = tl.zeros([SUB, LV], dtype=tl.float32)
        h6 = tl.zeros([SUB, LV], dtype=tl.float32)
        h7 = tl.zeros([SUB, LV], dtype=tl.float32)
        h8 = tl.zeros([SUB, LV], dtype=tl.float32)
        h9 = tl.zeros([SUB, LV], dtype=tl.float32)
        h10 = tl.zeros([SUB, LV], dtype=tl.float32)
        h11 = tl.zeros([SUB, LV], dtype=tl.float32)
        h12 = tl.zeros([SUB, LV], dtype=tl.float32)
        h13 = tl.zeros([SUB, LV], dtype=tl.float32)
        h14 = tl.zeros([SUB, LV], dtype=tl.float32)
        h15 = tl.zeros([SUB, LV], dtype=tl.float32)
    else:
        # the group's start state (zero for the row's first group), then each line's through the lines' maps
        if SAVE_STATES:
            start = g * LV * cps
        else:
            start = g
        g_rows = state_ptr + ((b * n_state + start) * N) * CH + ch
        has_start = (tl.zeros([SUB], dtype=tl.int32) + g) > 0
        h0 = _line_starts(tl.load(g_rows + 0 * CH, mask=has_start, other=0.0), A0, 0, l_rows, t_rows, jj, CH, N, LV)
        h1 = _line_starts(tl.load(g_rows + 1 * CH, mask=has_start, other=0.0), A1, 1, l_rows, t_rows, jj, CH, N, LV)
        h2 = _line_starts(tl.load(g_rows + 2 * CH, mask=has_start, other=0.0), A2, 2, l_rows, t_rows, jj, CH, N, LV)
        h3 = _line_starts(tl.load(g_rows + 3 * CH, mask=has_start, other=0.0), A3, 3, l_rows, t_rows, jj, CH, N, LV)
        h4 = _line_starts(tl.load(g_rows + 4 * CH, mask=has_start, other=0.0), A4, 4, l_rows, t_rows, jj, CH, N, LV)
        h5 = _line_starts(tl.load(g_rows + 5 * CH, mask=has_start, other=0.0), A5, 5, l_rows, t_rows, jj, CH, N, LV)
        h6 = _line_starts(tl.load(g_rows + 6 * CH, mask=has_start, other=0.0), A6, 6, l_rows, t_rows, jj, CH, N, LV)
        h7 = _line_starts(tl.load(g_rows + 7 * CH, mask=has_start, other=0.0), A7, 7, l_rows, t_rows, jj, CH, N, LV)
        h8 = _line_starts(tl.load(g_rows + 8 * CH, mask=has_start, other=0.0), A8, 8, l_rows, t_rows, jj, CH, N, LV)
        h9 = _line_starts(tl.load(g_rows + 9 * CH, mask=has_start, other=0.0), A9, 9, l_rows, t_rows, jj, CH, N, LV)
        h10 = _line_starts(tl.load(g_rows + 10 * CH, mask=has_start, other=0.0), A10, 10, l_rows, t_rows, jj, CH, N, LV)
        h11 = _line_starts(tl.load(g_rows + 11 * CH, mask=has_start, other=0.0), A11, 11, l_rows, t_rows, jj, CH, N, LV)
        h12 = _line_starts(tl.load(g_rows + 12 * CH, mask=has_start, other=0.0), A12, 12, l_rows, t_rows, jj, CH, N, LV)
        h13 = _line_starts(tl.load(g_rows + 13 * CH, mask=has_start, other=0.0), A13, 13, l_rows, t_rows, jj, CH, N, LV)
        h14 = _line_starts(tl.load(g_rows + 14 * CH, mask=has_start, other=0.0), A14, 14, l_rows, t_rows, jj, CH, N, LV)
        h15 = _line_starts(tl.load(g_rows + 15 * CH, mask=has_start, other=0.0), A15, 15, l_rows, t_rows, jj, CH, N, LV)
    dts = tl.zeros([SUB, LV], dtype=tl.float32)
    for i in range(cps):
        if SAVE_STATES:  # chunk-start states (B, n_state, N, C) for the backward
            s_rows = state_ptr + ((b * n_state + l0 * cps + i) * N) * CH + ch  # lines cps·N·CH apart
            _store_states16(
                s_rows, cps * N * CH, CH, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15, jj, LV
            )
        for t in range(16):
            d = tl.multiple_of(st_fast.to(tl.int64) * (i * 16 + t), LV)
            tok = (line_off + d)[None, :]
            uu = tl.load(u_rows[:, None] + tok).to(tl.float32)
            dt = tl.load(d_rows[:, None] + tok).to(tl.float32) + bias[:, None]
            if SOFTPLUS:
                dt = _softplus(dt)
            dtu = dt * uu
            if END_ONLY:
                dts += dt
            y = Dv[:, None] * uu
            bp = B_line + d
            cp = C_line + d
            h0, y = _step(h0, dt, dtu, A0, bp + 0 * sB_n, cp + 0 * sC_n, y, not END_ONLY)
            h1, y = _step(h1, dt, dtu, A1, bp + 1 * sB_n, cp + 1 * sC_n, y, not END_ONLY)
            h2, y = _step(h2, dt, dtu, A2, bp + 2 * sB_n, cp + 2 * sC_n, y, not END_ONLY)
            h3, y = _step(h3, dt, dtu, A3, bp + 3 * sB_n, cp + 3 * sC_n, y, not END_ONLY)
            h4, y = _step(h4, dt, dtu, A4, bp + 4 * sB_n, cp + 4 * sC_n, y, not END_ONLY)
            h5, y = _step(h5, dt, dtu, A5, bp + 5 * sB_n, cp + 5 * sC_n, y, not END_ONLY)
            h6, y = _step(h6, dt, dtu, A6, bp + 6 * sB_n, cp + 6 * sC_n, y, not END_ONLY)
            h7, y = _step(h7, dt, dtu, A7, bp + 7 * sB_n, cp + 7 * sC_n, y, not END_ONLY)
            h8, y = _step(h8, dt, dtu, A8, bp + 8 * sB_n, cp + 8 * sC_n, y, not END_ONLY)
            h9, y = _step(h9, dt, dtu, A9, bp + 9 * sB_n, cp + 9 * sC_n, y, not END_ONLY)
            h10, y = _step(h10, dt, dtu, A10, bp + 10 * sB_n, cp + 10 * sC_n, y, not END_ONLY)
            h11, y = _step(h11, dt, dtu, A11, bp + 11 * sB_n, cp + 11 * sC_n, y, not END_ONLY)
            h12, y = _step(h12, dt, dtu, A12, bp + 12 * sB_n, cp + 12 * sC_n, y, not END_ONLY)
            h13, y = _step(h13, dt, dtu, A13, bp + 13 * sB_n, cp + 13 * sC_n, y, not END_ONLY)
            h14, y = _step(h14, dt, dtu, A14, bp + 14 * sB_n, cp + 14 * sC_n, y, not END_ONLY)
            h15, y = _step(h15, dt, dtu, A15, bp + 15 * sB_n, cp + 15 * sC_n, y, not END_ONLY)
            if SAVE_MID:  # noqa: SIM102 (a compile-time switch around a run-time test)
                if t == 7:
                    m_rows = mid_ptr + ((b * n_state + l0 * cps + i) * N) * CH + ch  # lines cps·N·CH apart
                    _store_states16(m_rows, cps * N * CH, CH, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11,
                                    h12, h13, h14, h15, jj, LV)  # fmt: skip
            if not END_ONLY:
                if GATE:
                    zz = tl.load(z_rows[:, None] + tok).to(tl.float32)
                    if STORE_PRE:
                        tl.store(p_rows[:, None] + tok, y)
                    y = y * zz * tl.sigmoid(zz)
                tl.store(o_rows[:, None] + tok, y)
    if END_ONLY:
        # per-line maps for the main pass, the group's map for the carry pass ((B, C, ngroups, N), (B, C, ngroups))
        _store_states16(
            l_rows, N * CH, CH, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13, h14, h15, jj, LV
        )
        _store_lines(t_rows, CH, dts, jj, LV)
        seg_row = (b * CH + ch) * ngroups + g
        tl.store(seg_state_ptr + seg_row * N + 0, _fold(h0, dts, A0, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 1, _fold(h1, dts, A1, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 2, _fold(h2, dts, A2, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 3, _fold(h3, dts, A3, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 4, _fold(h4, dts, A4, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 5, _fold(h5, dts, A5, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 6, _fold(h6, dts, A6, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 7, _fold(h7, dts, A7, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 8, _fold(h8, dts, A8, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 9, _fold(h9, dts, A9, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 10, _fold(h10, dts, A10, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 11, _fold(h11, dts, A11, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 12, _fold(h12, dts, A12, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 13, _fold(h13, dts, A13, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 14, _fold(h14, dts, A14, jj, LV))
        tl.store(seg_state_ptr + seg_row * N + 15, _fold(h15, dts, A15, jj, LV))
        tl.store(seg_dt_ptr + seg_row, tl.sum(dts, axis=1))
    else:
        is_last = (tl.zeros([SUB], dtype=tl.int32) + g) == ngroups - 1  # the row's last line ends the scan
        last_rows = last_ptr + (b * CH + ch) * N
        tl.store(last_rows + 0, _pick(h0, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 1, _pick(h1, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 2, _pick(h2, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 3, _pick(h3, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 4, _pick(h4, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 5, _pick(h5, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 6, _pick(h6, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 7, _pick(h7, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 8, _pick(h8, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 9, _pick(h9, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 10, _pick(h10, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 11, _pick(h11, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 12, _pick(h12, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 13, _pick(h13, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 14, _pick(h14, jj, LV - 1), mask=is_last)
        tl.store(last_rows + 15, _pick(h15, jj, LV - 1), mask=is_last)
