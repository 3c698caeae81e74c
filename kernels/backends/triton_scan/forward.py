"""Forward kernels of the Triton selective scan and their launcher.

Per order k, batch b, channel c, state n, along the order's sequence t (state and sums fp32)::

    Δ_t = softplus(delta_t + delta_bias)     h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·u_t·B_t     y_t = C_t·h_t + D·u_t

Work split: a program owns (b, k, SUB channels of one group, one segment of the sequence), one thread per
channel, and walks the segment's chunks of BLOCK_T tokens in order. A chunk's tokens sit in the thread's
registers, so the scan along them (``tl.associative_scan`` over the pairs (exp(Δ·A), Δ·u·B)) runs inside the
thread; the states are a loop unrolled at compile time, so a channel's state vector stays in its thread and
``y = Σ_n C·h`` needs no exchange between threads. B_n and C_n of a chunk are loaded once per program and
broadcast to its lanes. The chunk-start state enters as ``h = h_local + Π a · h_0``; with gradients needed every
chunk's start state is saved for the backward. Tokens are addressed in the natural layout through the order's
stride table (layout.py): no permuted copy is ever made.

When the rows (b, k, channel block) alone would not fill the GPU, each sequence is cut into segments:
the same kernel first runs as a segment pass (``END_ONLY``: each segment's end state from zero and its Σ Δ),
``_fwd_carry_kernel`` chains the segments, and the main pass starts each segment from its true state.

Several orders with ``merge="sum"`` write fp32 per-order outputs that ``_merge_kernel`` sums in order k = 0..K-1
(deterministic) and gates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from medmamba.kernels.orders import ScanOrder

from . import configs, layout
from .common import _chunk_offsets, _linear_combine, _load_delta, _load_row, _load_tile, _order_row, _store_tile
from .launch import Launcher, launch_stream
from .lines import _fwd_lines_kernel
from .ptx import _fence, _ld1_if, _nap, _prefetch, _st1_if
from .tokens import _chunk16

__all__ = ["ForwardResult", "Part", "Plan", "forward", "plan"]

CARRY_CHANNELS = 16  # channels per program of the carry passes
CARRY_SEGMENTS = 256  # at most this many segments chained at a time by the carry passes (an associative scan)
CARRY_TILE = 512  # segments × states of a carry program's step (× CARRY_CHANNELS channels)
CARRY_WARPS = 8
MAX_GRID_Y = 65535  # CUDA's limit on a grid's second and third axes


def carry_blocks(nsplit: int, block_n: int) -> tuple[int, int]:
    """``(BLOCK_S, BLOCK_N)`` of the carry passes for ``nsplit`` segments (their ``nsplit - 1`` boundaries).

    The chain is sequential in steps of BLOCK_S segments, so many segments (SegMamba's 8,192 lines at 64³) take
    large steps over fewer states; the states, independent of each other, then spread over more programs (the
    carry passes ran on 12 programs, 0.6 ms for those lines).
    """
    block_s = min(CARRY_SEGMENTS, layout.next_power_of_2(max(1, nsplit - 1)))
    return block_s, max(1, min(block_n, CARRY_TILE // block_s))


def carry_grid(channels: int, N: int, rows: int, nsplit: int, block_n: int) -> tuple[int, int]:
    """The carry passes' grid: (channel blocks × state blocks, ``rows`` = batch × orders)."""
    return layout.cdiv(channels, CARRY_CHANNELS) * layout.cdiv(N, carry_blocks(nsplit, block_n)[1]), rows


@triton.jit
def _chunk_tiles(
    h0, dt_sum, c, base, rev, L, N, sB_n, sC_n, t, nn, ch, bias, Dv, u_rows, d_rows, z_rows, o_rows, p_rows, A_rows,
    B_base, C_base, fast, mid, st_fast, st_mid, st_slow,
    SUB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, GATE: tl.constexpr, STORE_PRE: tl.constexpr, END_ONLY: tl.constexpr, VEC: tl.constexpr,
    LINES: tl.constexpr = 1,
):  # fmt: skip
    # One chunk as (T, SUB) tiles: the tokens in each thread's registers, the scan along them inside the thread.
    # VEC (the segment pass of a call whose order reads the chunk as 16 neighbours from `base`, descending if rev):
    # tiles by 16-byte loads, rows in memory order. LINES > 1: B_base and C_base are per-lane pointers (each lane
    # its own line). Returns the state after the chunk and the running Σ Δ.
    q = c * BLOCK_T + t
    valid = q < L
    lin = _chunk_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev, VEC)
    tok = valid[:, None]
    u = _load_tile(u_rows, lin, tok, base, BLOCK_T, VEC)  # (T, SUB)
    _, dt = _load_delta(d_rows, lin, tok, bias, HAS_BIAS, SOFTPLUS, base, BLOCK_T, VEC)
    dtu = dt * u
    if END_ONLY:
        total = tl.sum(dt, axis=0)  # (SUB,)
        upto = tl.cumsum(dt, axis=0)
        if VEC:  # rows in memory order: a reversed order's later tokens are the earlier rows
            after = tl.where(rev != 0, upto - dt, total[None, :] - upto)
        else:
            after = total[None, :] - upto  # Σ_{j>t} Δ_j within the chunk
        dt_sum += total
    else:
        y = tl.zeros([BLOCK_T, SUB], dtype=tl.float32)
        if HAS_D:
            y += Dv[None, :] * u
    h_next = tl.zeros([BLOCK_N, SUB], dtype=tl.float32)
    for n in tl.static_range(BLOCK_N):
        A_n = tl.load(A_rows + n, mask=n < N, other=0.0) * 1.4426950408889634  # exp(Δ·A) = exp2(Δ·A·log2 e)
        h0_n = tl.sum(tl.where(nn[:, None] == n, h0, 0.0), axis=0)  # (SUB,): a register pick after unrolling
        if LINES > 1:
            B_n = _load_tile(B_base + n * sB_n, lin, tok & (n < N), base, BLOCK_T, False)
        else:
            B_n = _load_row(B_base + n * sB_n, lin, valid & (n < N), base, ch, BLOCK_T, VEC, not VEC)
        if END_ONLY:
            # only the end state: h_end = exp(A·ΣΔ)·h_0 + Σ_t exp(A·Σ_{j>t} Δ_j)·Δ_t·u_t·B_t, no scan
            tail = tl.exp2(after * A_n[None, :]) * (dtu * B_n)
            h_end = tl.exp2(total * A_n) * h0_n + tl.sum(tail, axis=0)
        else:
            a = tl.exp2(dt * A_n[None, :])
            decay, h_local = tl.associative_scan((a, dtu * B_n), 0, _linear_combine)
            h = h_local + decay * h0_n[None, :]
            if LINES > 1:
                C_n = _load_tile(C_base + n * sC_n, lin, tok & (n < N), base, BLOCK_T, False)
            else:
                C_n = _load_row(C_base + n * sC_n, lin, valid & (n < N), base, ch, BLOCK_T, False, True)
            y += h * C_n
            # the state after the chunk's last token (padding tokens carry it unchanged)
            h_end = tl.sum(tl.where(t[:, None] == BLOCK_T - 1, h, 0.0), axis=0)
        h_next = tl.where(nn[:, None] == n, h_end[None, :], h_next)
    if not END_ONLY:
        if GATE:
            zz = _load_tile(z_rows, lin, tok, base, BLOCK_T, VEC)
            if STORE_PRE:
                _store_tile(p_rows, lin, tok, y)
            y = y * zz * tl.sigmoid(zz)
        _store_tile(o_rows, lin, tok, y)
    return h_next, dt_sum


@triton.jit
def _fwd_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr,
    out_ptr, pre_ptr, state_ptr, last_ptr, seg_dt_ptr, order_ptr, mid_ptr,
    L, CH, N, K, CPG, nchunks, cps, n_state, nsplit,
    su_b, su_k, su_c, sd_b, sd_k, sd_c,
    sB_b, sB_k, sB_g, sB_n, sC_b, sC_k, sC_g, sC_n,
    sz_b, sz_c, so_b, so_k, so_c, sp_b, sp_k, sp_c,
    SUB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    GATE: tl.constexpr, STORE_PRE: tl.constexpr, SAVE_STATES: tl.constexpr, END_ONLY: tl.constexpr,
    VEC_MODE: tl.constexpr, LINES: tl.constexpr = 1, PREFETCH: tl.constexpr = False, SAVE_MID: tl.constexpr = False,
    CARRIED: tl.constexpr = False,
):  # fmt: skip
    # One thread per channel: tiles are (T, SUB) with the chunk's tokens in the thread's registers and the
    # channels across lanes and warps, so the scan along T runs inside each thread and the sum over the states
    # needs no exchange. The states are a loop unrolled at compile time (the state vector of a channel stays in
    # its thread's registers); B_n and C_n of a chunk are loaded once per program and broadcast to its lanes.
    # END_ONLY: the segment pass — the segment's end state from zero and its Σ Δ, no output.
    # VEC_MODE (the GPU path, rows 16-byte aligned, whole chunks): the main pass runs token by token (tokens.py)
    # and chunks that are 16 neighbours in memory move by 16-byte loads — 1: every order is the raster one; 3: every
    # order is raster or reversed (decided per program); 2: some orders are raster or reversed (decided per program
    # from the order's strides), the others load token by token and take tiles in the segment pass; 0: tiles only.
    # SAVE_MID (with SAVE_STATES, on the per-token path): each chunk's middle state too, after its 8th token, at
    # mid_ptr in the saved states' layout (PassConfig.mid_states).
    # LINES > 1 (layout.lines): a segment per line of cps chunks, and lane l runs segment LINES·pid(1) + l % LINES
    # of channel c0 + l // LINES: the lanes' pointers are shifted by the distance between neighbouring segments.
    # CARRIED (_fwd_fused_kernel): the main pass's start states were written during this launch, so their loads
    # may not be treated as reading constant memory; the segment pass stores its maps channels fastest.
    tl.static_assert(BLOCK_T == 16, "the recurrence is written out for chunks of 16 tokens")
    tl.static_assert(LINES == 1 or VEC_MODE == 0, "lines run on tiles")
    zero_i = tl.zeros([SUB], dtype=tl.int32)
    pid_blk = tl.program_id(0)
    seg = tl.program_id(1)
    bk = tl.program_id(2)
    b = (bk // K).to(tl.int64)
    k = bk % K
    c0 = pid_blk * (SUB // LINES)
    grp = (c0 // CPG).to(tl.int64)
    fast, mid, st_fast, st_mid, st_slow, rev = _order_row(order_ptr, k)
    # token t at offset t (or L - 1 - t when reversed): chunks are 16 neighbours in memory
    neighbours = (st_fast == 1) & (st_mid == fast) & (st_slow == fast * mid)
    lane = tl.arange(0, SUB)
    seg0 = seg * LINES
    first = seg0 * cps  # the first lane's chunks; lane l's are line·cps further
    last = tl.minimum(first + cps, nchunks)
    if LINES > 1:  # offset of a lane's tokens from the first lane's
        line = lane % LINES  # the lane's segment after the program's first
        shift = (line * tl.where(neighbours, tl.where(rev != 0, -cps * BLOCK_T, cps * BLOCK_T), st_mid)).to(tl.int64)
        lane_first = seg0 + line > 0
        if SAVE_STATES:
            lane_state = line * cps
        else:
            lane_state = line
    else:
        line = 0
        shift = 0
        lane_first = first > 0
        lane_state = 0

    t = tl.arange(0, BLOCK_T)
    nn = tl.arange(0, BLOCK_N)
    n_ok = nn < N
    ch = c0 + lane // LINES
    ch64 = ch.to(tl.int64)
    A_rows = A_ptr + (k * CH + ch64) * N
    bias = tl.zeros([SUB], dtype=tl.float32)
    Dv = tl.zeros([SUB], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * CH + ch)
    if HAS_D:
        Dv = tl.load(D_ptr + k * CH + ch)
    u_rows = u_ptr + b * su_b + k * su_k + ch64 * su_c + shift
    d_rows = dl_ptr + b * sd_b + k * sd_k + ch64 * sd_c + shift
    o_rows = out_ptr + b * so_b + k * so_k + ch64 * so_c + shift
    z_rows = z_ptr + b * sz_b + ch64 * sz_c + shift
    p_rows = pre_ptr + b * sp_b + k * sp_k + ch64 * sp_c + shift
    B_base = B_ptr + b * sB_b + k * sB_k + grp * sB_g
    C_base = C_ptr + b * sC_b + k * sC_k + grp * sC_g
    if LINES > 1:
        B_base += shift
        C_base += shift
    # states (B, K, n_state, N, C), channels fastest: a state tile (N, SUB) is N coalesced rows, and its layout is
    # the compute tiles' (lanes along channels; an N-fastest one made Triton move the tiles between layouts)
    state_rows = state_ptr + (bk.to(tl.int64) * n_state + lane_state) * N * CH + ch64  # (SUB,)
    mid_rows = mid_ptr + (bk.to(tl.int64) * n_state + lane_state) * N * CH + ch64  # (SUB,), used with SAVE_MID
    n_rows = nn[:, None] * CH
    if END_ONLY:
        h0 = tl.zeros([BLOCK_N, SUB], dtype=tl.float32)
    else:
        if SAVE_STATES:
            start = first
        else:
            start = seg0
        # a segment after the first starts from the state the carry pass left at its start
        if VEC_MODE != 0:
            h0 = _ld1_if(state_rows[None, :] + start * N * CH + n_rows, n_ok[:, None] & lane_first, WRITTEN=CARRIED)
        else:
            h0 = tl.load(state_rows[None, :] + start * N * CH + n_rows, mask=n_ok[:, None] & lane_first, other=0.0)
    dt_sum = tl.zeros([SUB], dtype=tl.float32)
    for c in range(first, last):
        if SAVE_STATES:  # chunk-start states for the backward (the carry pass wrote the segment's first)
            if VEC_MODE != 0 and not END_ONLY:
                _st1_if(state_rows[None, :] + c * N * CH + n_rows, h0, n_ok[:, None] & (c > first))
            else:
                tl.store(state_rows[None, :] + c * N * CH + n_rows, h0, mask=n_ok[:, None] & (c > first))
        q0 = c * BLOCK_T
        base = tl.where(rev != 0, L - BLOCK_T - q0, q0)  # the chunk's lowest offset when its tokens are neighbours
        if PREFETCH and (VEC_MODE == 1 or VEC_MODE == 3) and not END_ONLY:
            # the next chunk's lines, a line per lane: B_n and C_n rows (their first loads waited on L2), u, Δ, z
            n_p = tl.minimum(lane & 15, N - 1)
            nxt = tl.where(rev != 0, base - BLOCK_T, base + BLOCK_T)
            _prefetch(tl.where(lane < 16, B_base + n_p * sB_n + nxt, C_base + n_p * sC_n + nxt))
            _prefetch(u_rows + nxt)
            _prefetch(d_rows + nxt)
            if GATE:
                _prefetch(z_rows + nxt)
        if VEC_MODE != 0 and not END_ONLY:  # token by token (tokens.py)
            h0 = _chunk16(
                h0, q0, base, neighbours, L, fast, mid, st_fast, st_mid, st_slow, rev,
                u_rows, d_rows, z_rows, o_rows, p_rows, A_rows, B_base, C_base, sB_n, sC_n, bias, Dv, nn, zero_i,
                VEC_MODE >= 2, VEC_MODE == 2, HAS_D, HAS_BIAS, SOFTPLUS, GATE, STORE_PRE, BLOCK_N,
                mid_rows + c * N * CH, CH, SAVE_MID and SAVE_STATES,
            )  # fmt: skip
        elif VEC_MODE == 3:  # the segment pass of raster and reversed orders: every chunk is 16 neighbours
            h0, dt_sum = _chunk_tiles(
                h0, dt_sum, c, base, rev, L, N, sB_n, sC_n, t, nn, ch, bias, Dv, u_rows, d_rows, z_rows, o_rows,
                p_rows, A_rows, B_base, C_base, fast, mid, st_fast, st_mid, st_slow,
                SUB, BLOCK_T, BLOCK_N, HAS_D, HAS_BIAS, SOFTPLUS, GATE, STORE_PRE, END_ONLY, True,
            )  # fmt: skip
        elif VEC_MODE == 2:  # the segment pass of a mixed call
            if neighbours:
                h0, dt_sum = _chunk_tiles(
                    h0, dt_sum, c, base, rev, L, N, sB_n, sC_n, t, nn, ch, bias, Dv, u_rows, d_rows, z_rows, o_rows,
                    p_rows, A_rows, B_base, C_base, fast, mid, st_fast, st_mid, st_slow,
                    SUB, BLOCK_T, BLOCK_N, HAS_D, HAS_BIAS, SOFTPLUS, GATE, STORE_PRE, END_ONLY, True,
                )  # fmt: skip
            else:
                h0, dt_sum = _chunk_tiles(
                    h0, dt_sum, c, base, rev, L, N, sB_n, sC_n, t, nn, ch, bias, Dv, u_rows, d_rows, z_rows, o_rows,
                    p_rows, A_rows, B_base, C_base, fast, mid, st_fast, st_mid, st_slow,
                    SUB, BLOCK_T, BLOCK_N, HAS_D, HAS_BIAS, SOFTPLUS, GATE, STORE_PRE, END_ONLY, False,
                )  # fmt: skip
        else:
            h0, dt_sum = _chunk_tiles(
                h0, dt_sum, c, q0, rev, L, N, sB_n, sC_n, t, nn, ch, bias, Dv, u_rows, d_rows, z_rows, o_rows,
                p_rows, A_rows, B_base, C_base, fast, mid, st_fast, st_mid, st_slow,
                SUB, BLOCK_T, BLOCK_N, HAS_D, HAS_BIAS, SOFTPLUS, GATE, STORE_PRE, END_ONLY, VEC_MODE == 1, LINES,
            )  # fmt: skip
    if END_ONLY and CARRIED:
        # (B, K, nsplit, N, C) and (B, K, nsplit, C), channels fastest: _carry_states loads a state's segments as
        # rows of channels, one lane each, in the layout it stores the start states in
        seg_i = bk.to(tl.int64) * nsplit + seg0
        tl.store(state_ptr + (seg_i * N + nn[:, None]) * CH + ch64[None, :], h0, mask=n_ok[:, None])
        tl.store(seg_dt_ptr + seg_i * CH + ch64, dt_sum)
    elif END_ONLY:
        # (B, K, C, nsplit, N) and (B, K, C, nsplit): N fastest here compiles without layout moves
        seg_row = (bk * CH + ch64) * nsplit + seg0 + line  # (SUB,)
        tl.store(state_ptr + seg_row[None, :] * N + nn[:, None], h0, mask=n_ok[:, None])
        tl.store(seg_dt_ptr + seg_row, dt_sum)
    else:
        if LINES > 1:
            is_last = ((seg0 + line + 1) * cps >= nchunks)[None, :]  # the lane ran the row's last segment
        else:
            is_last = last == nchunks
        if VEC_MODE != 0:
            _st1_if(last_ptr + (bk * CH + ch64)[None, :] * N + nn[:, None], h0, n_ok[:, None] & is_last)
        else:
            tl.store(last_ptr + (bk * CH + ch64)[None, :] * N + nn[:, None], h0, mask=n_ok[:, None] & is_last)


@triton.jit
def _fwd_carry_kernel(
    A_ptr, seg_state_ptr, seg_dt_ptr, state_ptr,
    CH, N, K, nsplit, cps, n_state,
    SAVE_STATES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    # Chains the segments' end states of BLOCK_C channels of one (b, k), first segment to last, into the chunk
    # states (B, K, n_state, N, C). BLOCK_S segments at a time by an associative scan over the affine maps
    # h -> exp(A·ΣΔ)·h + h_seg: a chain of one segment per step was latency-bound.
    bk = tl.program_id(1).to(tl.int64)
    k = bk % K
    n_blocks = tl.cdiv(N, BLOCK_N)  # a program: BLOCK_C channels × BLOCK_N states
    ch = (tl.program_id(0) // n_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = (tl.program_id(0) % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = ch < CH
    ok = (n < N)[:, None] & c_ok[None, :]
    A = tl.load(A_ptr + (k * CH + ch[None, :]) * N + n[:, None], mask=ok, other=0.0)  # (BLOCK_N, BLOCK_C)
    h = tl.zeros([BLOCK_N, BLOCK_C], dtype=tl.float32)
    seg_rows = (bk * CH + ch) * nsplit  # segment states (B, K, C, nsplit, N), Σ Δ (B, K, C, nsplit)
    sb = tl.arange(0, BLOCK_S)
    for s0 in range(0, nsplit - 1, BLOCK_S):
        s = s0 + sb
        s_ok = (s < nsplit - 1)[:, None, None] & ok[None, :, :]
        dt_sum = tl.load(seg_dt_ptr + seg_rows[None, :] + s[:, None], mask=(s < nsplit - 1)[:, None] & c_ok[None, :],
                         other=0.0)  # fmt: skip
        seg_h = tl.load(seg_state_ptr + ((seg_rows[None, None, :] + s[:, None, None]) * N + n[None, :, None]),
                        mask=s_ok, other=0.0)  # fmt: skip
        decay, local = tl.associative_scan((tl.exp(A[None, :, :] * dt_sum[:, None, :]), seg_h), 0, _linear_combine)
        hs = local + decay * h[None, :, :]  # the state after each segment of the block
        if SAVE_STATES:
            idx = (s + 1) * cps
        else:
            idx = s + 1
        tile = (bk * n_state + idx)[:, None, None] * N * CH + (n[:, None] * CH + ch[None, :])[None, :, :]
        tl.store(state_ptr + tile, hs, mask=s_ok)
        h = tl.sum(tl.where((sb == BLOCK_S - 1)[:, None, None], hs, 0.0), axis=0)


@triton.jit
def _carry_states(
    A_ptr, seg_state_ptr, seg_dt_ptr, state_ptr, bk, k, ch, CH, N, nsplit, cps, n_state, n_lo,
    SUB: tl.constexpr, STATES: tl.constexpr, SAVE_STATES: tl.constexpr, STEP: tl.constexpr,
):  # fmt: skip
    # _fwd_carry_kernel's work for states n_lo .. n_lo + STATES - 1 of one row (b, k, the SUB channels `ch`), by
    # one program of _fwd_fused_kernel: h -> exp(A·ΣΔ)·h + h_seg over the segments in order, STEP segments' maps
    # loaded at once and chained by an associative scan; each segment's start state goes where the main pass
    # reads it.
    ch64 = ch.to(tl.int64)
    first = bk * nsplit  # segment states (B, K, nsplit, N, C), Σ Δ (B, K, nsplit, C): channels fastest
    j = tl.arange(0, STEP)
    for i in tl.static_range(STATES):
        n = n_lo + i
        A_n = tl.load(A_ptr + (k * CH + ch64) * N + n, mask=n < N, other=0.0) * 1.4426950408889634  # exp2
        h = tl.zeros([SUB], dtype=tl.float32)
        for s0 in range(0, nsplit - 1, STEP):
            s = s0 + j
            ok = (s < nsplit - 1)[:, None] & (n < N)
            dt = tl.load(seg_dt_ptr + (first + s)[:, None] * CH + ch64[None, :], mask=ok, other=0.0)  # (STEP, SUB)
            seg_h = tl.load(seg_state_ptr + ((first + s)[:, None] * N + n) * CH + ch64[None, :], mask=ok, other=0.0)
            # past the last boundary Σ Δ = 0 and h_seg = 0: the maps are the identity
            decay, local = tl.associative_scan((tl.exp2(A_n[None, :] * dt), seg_h), 0, _linear_combine)
            hs = local + decay * h[None, :]  # the state after each segment
            if SAVE_STATES:
                idx = (s + 1) * cps
            else:
                idx = s + 1
            tl.store(state_ptr + (bk * n_state + idx)[:, None] * N * CH + n * CH + ch64[None, :], hs, mask=ok)
            h = tl.sum(tl.where((j == STEP - 1)[:, None], hs, 0.0), axis=0)


@triton.jit
def _fwd_fused_kernel(
    u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr,
    out_ptr, pre_ptr, state_ptr, last_ptr, seg_state_ptr, seg_dt_ptr, order_ptr, mid_ptr, sync_ptr,
    L, CH, N, K, CPG, nchunks, cps, n_state, nsplit,
    su_b, su_k, su_c, sd_b, sd_k, sd_c,
    sB_b, sB_k, sB_g, sB_n, sC_b, sC_k, sC_g, sC_n,
    sz_b, sz_c, so_b, so_k, so_c, sp_b, sp_k, sp_c,
    SUB: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    GATE: tl.constexpr, STORE_PRE: tl.constexpr, SAVE_STATES: tl.constexpr,
    VEC_MODE: tl.constexpr, LINES: tl.constexpr = 1, PREFETCH: tl.constexpr = False, SAVE_MID: tl.constexpr = False,
    PHASE: tl.constexpr = 0, HELPERS: tl.constexpr = 1, CARRY_STEP: tl.constexpr = 16,
    SYNC_STRIDE: tl.constexpr = 64,
):  # fmt: skip
    # The segment pass, the carry and the main pass of _fwd_kernel in one launch (PassConfig.fused_carry). Each
    # program runs its segment's pass, then arrives at its row's counter. The row's last HELPERS programs to arrive
    # wait for the rest, then each chains BLOCK_N / HELPERS states over the row's segments (_carry_states); the last
    # of them to finish raises the row's flag, which every program waits for before its main pass. Waiting needs
    # every program of the grid resident at once: PHASE 0 is launched as a cooperative grid, which the driver
    # refuses rather than run otherwise. The interpreter runs programs one at a time, so there PHASE 1 (segment
    # pass, and the last program to arrive carries every state) and PHASE 2 (main pass) are two launches.
    # sync_ptr: SYNC_STRIDE int32 words per grid row, zero before the launch and zero again after it: the row's
    # arrivals and its helpers done in one 128-byte line, its flag (the word every program polls) in the next.
    tl.static_assert(LINES == 1, "segments of chunks only")
    if PHASE != 2:
        _fwd_kernel(
            u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, out_ptr, pre_ptr, seg_state_ptr, last_ptr,
            seg_dt_ptr, order_ptr, last_ptr, L, CH, N, K, CPG, nchunks, cps, nsplit, nsplit,
            su_b, su_k, su_c, sd_b, sd_k, sd_c, sB_b, sB_k, sB_g, sB_n, sC_b, sC_k, sC_g, sC_n,
            sz_b, sz_c, so_b, so_k, so_c, sp_b, sp_k, sp_c,
            SUB, BLOCK_T, BLOCK_N, HAS_D, HAS_BIAS, SOFTPLUS, False, False, False, True, VEC_MODE, 1, PREFETCH,
            False, True,
        )  # fmt: skip
        pid_blk = tl.program_id(0)
        bk = tl.program_id(2)
        row = bk * tl.num_programs(0) + pid_blk
        arrivals = sync_ptr + row * SYNC_STRIDE
        carried = arrivals + SYNC_STRIDE // 4
        flag = arrivals + SYNC_STRIDE // 2
        lane = tl.arange(0, SUB)
        ch = pid_blk * SUB + lane
        _fence(lane)  # every lane's end state and Σ Δ before the arrival
        tl.debug_barrier()
        order = tl.atomic_add(arrivals, 1, sem="acq_rel", scope="gpu")
        if PHASE == 1:  # one program at a time: the last to arrive carries every state
            if order == nsplit - 1:
                tl.atomic_xchg(arrivals, 0, sem="relaxed", scope="gpu")  # zero again for the next launch
                for helper in range(HELPERS):
                    _carry_states(A_ptr, seg_state_ptr, seg_dt_ptr, state_ptr, bk.to(tl.int64), bk % K, ch, CH, N,
                                  nsplit, cps, n_state, helper * (BLOCK_N // HELPERS), SUB, BLOCK_N // HELPERS,
                                  SAVE_STATES, CARRY_STEP)  # fmt: skip
        else:
            # the row's last HELPERS programs to arrive each carry BLOCK_N / HELPERS states once all have arrived;
            # the last of them to finish zeroes the counters and raises the flag
            if order >= nsplit - HELPERS:
                seen = tl.load(arrivals, volatile=True)
                while seen < nsplit:
                    _nap(lane)
                    seen = tl.load(arrivals, volatile=True)
                _fence(lane)
                _carry_states(A_ptr, seg_state_ptr, seg_dt_ptr, state_ptr, bk.to(tl.int64), bk % K, ch, CH, N,
                              nsplit, cps, n_state, (order - (nsplit - HELPERS)) * (BLOCK_N // HELPERS), SUB,
                              BLOCK_N // HELPERS, SAVE_STATES, CARRY_STEP)  # fmt: skip
                _fence(lane)
                tl.debug_barrier()
                if tl.atomic_add(carried, 1, sem="acq_rel", scope="gpu") == HELPERS - 1:
                    tl.atomic_xchg(arrivals, 0, sem="relaxed", scope="gpu")
                    tl.atomic_xchg(carried, 0, sem="relaxed", scope="gpu")
                    tl.atomic_add(flag, nsplit, sem="release", scope="gpu")
            seen = tl.load(flag, volatile=True)
            while seen == 0:
                _nap(lane)
                seen = tl.load(flag, volatile=True)
            _fence(lane)  # with the read of the flag: an acquire
            tl.atomic_add(flag, -1, sem="relaxed", scope="gpu")  # nsplit programs take it back to zero
    if PHASE != 1:
        _fwd_kernel(
            u_ptr, dl_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, z_ptr, out_ptr, pre_ptr, state_ptr, last_ptr,
            last_ptr, order_ptr, mid_ptr, L, CH, N, K, CPG, nchunks, cps, n_state, nsplit,
            su_b, su_k, su_c, sd_b, sd_k, sd_c, sB_b, sB_k, sB_g, sB_n, sC_b, sC_k, sC_g, sC_n,
            sz_b, sz_c, so_b, so_k, so_c, sp_b, sp_k, sp_c,
            SUB, BLOCK_T, BLOCK_N, HAS_D, HAS_BIAS, SOFTPLUS, GATE, STORE_PRE, SAVE_STATES, False, VEC_MODE, 1,
            PREFETCH, SAVE_MID, True,
        )  # fmt: skip


@triton.jit
def _merge_kernel(
    y_ptr, z_ptr, out_ptr, pre_ptr, L, CH, K, sz_b, sz_c,
    HAS_Z: tl.constexpr, STORE_PRE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)  # b·CH + c
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    b = row // CH
    c = row % CH
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(K):  # fixed order: deterministic
        acc += tl.load(y_ptr + ((b * K + k) * CH + c) * L + offs, mask=mask, other=0.0)
    if STORE_PRE:
        tl.store(pre_ptr + row * L + offs, acc, mask=mask)
    if HAS_Z:
        zz = tl.load(z_ptr + b * sz_b + c * sz_c + offs, mask=mask, other=0.0).to(tl.float32)
        acc = acc * zz * tl.sigmoid(zz)
    tl.store(out_ptr + row * L + offs, acc, mask=mask)


_fwd_launch = Launcher(_fwd_kernel)
_fwd_carry_launch = Launcher(_fwd_carry_kernel)
_merge_launch = Launcher(_merge_kernel)
_fused_launch = Launcher(_fwd_fused_kernel)
_lines_launch = Launcher(_fwd_lines_kernel)


@dataclass(frozen=True)
class Plan:
    """How one call is cut into chunks, channel blocks and segments (shared by the forward and the backward)."""

    batch: int
    K: int
    channels: int
    groups: int
    N: int
    L: int
    spatial: tuple[int, ...]
    block_t: int
    block_n: int
    nchunks: int

    @property
    def cpg(self) -> int:
        """Channels per group."""
        return self.channels // self.groups


def plan(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> Plan:
    """The chunking of a call with canonical ``u`` (B, K, C, *S), ``A`` (K, C, N) and ``B`` (B, K, G, N, *S)."""
    batch, K, channels = u.shape[:3]
    spatial = tuple(u.shape[3:])
    layout.spatial3(spatial)
    L = math.prod(spatial)
    N = A.shape[2]
    return Plan(
        batch,
        K,
        channels,
        B.shape[2],
        N,
        L,
        spatial,
        configs.CHUNK,
        layout.next_power_of_2(N),
        layout.cdiv(L, configs.CHUNK),
    )


def split(p: Plan, cfg: configs.PassConfig, device: torch.device, orders: Sequence[ScanOrder]) -> tuple[int, int, int]:
    """``(SUB, nsplit, chunks_per_segment)`` for a pass with settings ``cfg``.

    Segments are cut until about ``cfg.fill`` times :func:`configs.target_programs` programs run; for a call with a
    strided order (consecutive tokens in different cache lines), ``cfg.fill_strided`` decides whether to cut, and
    with ``cfg.line_segments`` segments are whole lines of it (layout.line_chunks).
    """
    sub = layout.channel_blocking(p.channels, p.groups, cfg.sub)
    rows = p.batch * p.K * (p.channels // sub)
    if cfg.segments is not None:
        per = layout.cdiv(p.nchunks, max(1, min(cfg.segments, p.nchunks)))
        return sub, layout.cdiv(p.nchunks, per), per
    strided = layout.strided(orders, p.spatial)
    fill = cfg.fill_strided if (strided and cfg.fill_strided is not None) else cfg.fill
    align = layout.line_chunks(orders, p.spatial, p.block_t) if (strided and cfg.line_segments) else 0
    target = fill * configs.target_programs(device)
    nsplit, per = layout.segments(p.nchunks, rows, target, align=align, min_chunks=cfg.min_segment_chunks)
    return sub, nsplit, per


def lines_of(p: Plan, cfg: configs.PassConfig, orders: Sequence[ScanOrder], u: torch.Tensor) -> tuple[int, int]:
    """``(LINES, line length)`` of a pass (layout.lines) with programs of one warp, ``(1, 0)``: segments of chunks."""
    if not cfg.lines or cfg.num_warps != 1 or cfg.sub != 32:
        return 1, 0
    lines, length = layout.lines(orders, p.spatial, u.element_size(), 32)
    return (lines, length) if lines > 1 and p.cpg % (32 // lines) == 0 else (1, 0)


@dataclass
class ForwardResult:
    """Outputs of :func:`forward` and what the backward needs."""

    out: torch.Tensor
    last_state: torch.Tensor
    states: torch.Tensor | None  # (B, K, nchunks, N, C) fp32 chunk-start states (chunk 0 unused), if saved
    pre_gate: torch.Tensor | None  # Σ_k y_k ("sum") or y_k ("stack") before the gate, if z and saved (see
    # PassConfig.save_pre_gate)
    plan: Plan
    parts: tuple[Part, ...] = ()  # a call run as groups of orders (PassConfig.split_orders): each group's own
    # (states is None then)
    mids: torch.Tensor | None = None  # the chunks' middle states, laid out as states (PassConfig.mid_states)


@dataclass(frozen=True)
class Part:
    """One group of a call run as groups of orders: orders ``start:stop``, its saved states and its plan."""

    start: int
    stop: int
    states: torch.Tensor | None
    plan: Plan
    mids: torch.Tensor | None = None


@dataclass(frozen=True)
class _Groups:
    """A call run as groups of orders (PassConfig.split_orders).

    ``ranges``: the ``(start, stop)`` of each group's orders; the merge's launch sums and gates their outputs.
    """

    plan: Plan
    ranges: tuple[tuple[int, int], ...]
    merge_grid: tuple[int, int]
    merge_block: int
    sites: dict = field(default_factory=dict, compare=False, repr=False)  # the merge's kernel (Launcher.at)
    # each group's launch settings, by its index: they follow from the call's (_LAUNCHES key) as much as the call's do
    group_launches: dict = field(default_factory=dict, compare=False, repr=False)


def forward(
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
    save: bool,
    out: torch.Tensor | None = None,
    launch: _Launch | _Groups | None = None,
) -> ForwardResult:
    """Run the forward passes over canonical inputs (spatial blocks contiguous, see layout.natural_spatial).

    Args:
        u: ``(B, K, C, *S)``; may be a stride-0 expand over K.
        delta: ``(B, K, C, *S)``, before bias and softplus.
        A: ``(K, C, N)``.
        B: ``(B, K, G, N, *S)``.
        C: ``(B, K, G, N, *S)``.
        D: ``(K, C)`` or None.
        z: ``(B, C, *S)`` or None.
        delta_bias: ``(K, C)`` or None.
        orders: the K scan orders.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        merge: ``"sum"`` or ``"stack"``.
        save: keep every chunk-start state and, with z, the pre-gate output (for the backward).
        out: for ``merge="stack"`` without z, the ``(B, K, C, *S)`` tensor the outputs go to (rows of the spatial
            size contiguous, e.g. a slice of one fp32 buffer for several groups of orders) instead of a fresh one.
        launch: the launch settings of this call (:func:`settings`) when the caller has them, else derived here.
    """
    if launch is None:
        _, launch, _ = settings(u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, merge, save, out)
    if type(launch) is _Groups:
        return _grouped_forward(launch, u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, save)
    return run(launch, u, delta, A, B, C, D, z, delta_bias, save, out)


def settings(u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, merge, save, out=None) -> tuple:
    """``(key, launch settings, forward settings)`` of a :func:`forward` call.

    The ``_LAUNCHES`` memo's key and entry (derived on first use), and the ``configs.PassConfig`` they follow from.
    """
    dev = u.device
    cfg = configs.forward_config()
    key = (
        u.shape, u.stride(), delta.stride(), B.shape, B.stride(), C.stride(), u.dtype, delta.dtype, B.dtype,
        C.dtype, None if z is None else (z.stride(), z.dtype), A.shape, D is None, delta_bias is None, orders,
        delta_softplus, merge, save, dev, cfg, layout.alignment(u, delta, B, C, z, A, D, delta_bias, out),
        dev.type != "cuda" and layout.interpreted(),  # the emulated GPU path exists only under the interpreter
        None if out is None else (out.stride(), out.dtype),
    )  # fmt: skip
    launch = layout.remembered(
        _LAUNCHES, key, lambda: _launch_settings(u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, merge,
                                                 save, cfg, out)
    )  # fmt: skip
    return key, launch, cfg


def _segment_pass(launch: _Launch, u, delta, A, B, C, Dv, bias, z_arg, common) -> tuple[torch.Tensor, torch.Tensor]:
    # each segment's end state from zero and its Σ Δ, for the carry pass
    p, nsplit, dev = launch.plan, launch.nsplit, u.device
    seg_state = torch.empty(p.batch, p.K, p.channels, nsplit, p.N, device=dev, dtype=torch.float32)
    seg_dt = torch.empty(p.batch, p.K, p.channels, nsplit, device=dev, dtype=torch.float32)
    _fwd_launch.at(launch.sites, "segments", launch.grid)(
        u, delta, A, B, C, Dv, bias, z_arg, u, u, seg_state, seg_state, seg_dt, launch.table, seg_state, *common,
        nsplit, nsplit, *launch.strides, GATE=False, STORE_PRE=False, SAVE_STATES=False, END_ONLY=True,
        **launch.flags,
    )  # fmt: skip
    return seg_state, seg_dt


def run(launch: _Launch, u, delta, A, B, C, D, z, delta_bias, save: bool, out=None) -> ForwardResult:
    """The launches of one ungrouped forward call with settings ``launch`` (:func:`settings`).

    The kernels read the tensors through their data pointers and ``launch``'s strides only: any tensors with the
    data, dtypes and alignment of the call the settings were derived for will do (the arguments as given to
    ``selective_scan`` included, whose canonical views only add axes).
    """
    p, nsplit, dev = launch.plan, launch.nsplit, u.device
    A = A.float().contiguous()
    Dv = D.float().contiguous() if D is not None else A
    bias = delta_bias.float().contiguous() if delta_bias is not None else A
    z_arg = z if z is not None else u
    if launch.line_vectors:
        return _line_vector_passes(launch, u, delta, A, B, C, Dv, bias, z, save, out)
    common = (p.L, p.channels, p.N, p.K, p.cpg, p.nchunks, launch.cps)
    # The segment pass first, with only its own outputs allocated: at the short stages the GPU waits for the host,
    # and it starts while the host allocates the rest. It writes nothing else (the output and the last state are
    # stand-ins: u's address for y's, its end states' for the fp32 ones)
    fusing = launch.fused and "apart" not in launch.sites
    seg = None
    if nsplit > 1 and not fusing:
        seg = _segment_pass(launch, u, delta, A, B, C, Dv, bias, z_arg, common)
    if out is None:
        y = torch.empty(launch.y_shape, device=dev, dtype=torch.float32 if launch.fused_merge else u.dtype)
    else:
        y = out
    pre = torch.empty_like(y) if launch.pre_per_order else None
    pre_arg = pre if pre is not None else y
    last = torch.empty(p.batch, p.K, p.channels, p.N, device=dev, dtype=torch.float32)
    gate = (z is not None) and not launch.fused_merge  # else the merge gates
    fused = None
    if fusing:
        fused = _fused_passes(launch, u, delta, A, B, C, Dv, bias, z_arg, y, pre_arg, last, save, gate, pre is not None)
    if fused is not None:
        states, mids = fused
    else:
        if nsplit > 1 and seg is None:  # a fused launch that ran apart after all (a CUDA graph capture)
            seg = _segment_pass(launch, u, delta, A, B, C, Dv, bias, z_arg, common)
        if nsplit > 1:
            seg_state, seg_dt = seg
        states = torch.empty(p.batch, p.K, launch.n_state, p.N, p.channels, device=dev, dtype=torch.float32)
        if nsplit > 1:
            block_s, block_n = launch.carry_blocks
            _fwd_carry_launch.at(launch.sites, "carry", launch.carry_grid)(
                A, seg_state, seg_dt, states, p.channels, p.N, p.K, nsplit, launch.cps, launch.n_state,
                SAVE_STATES=save, BLOCK_N=block_n, BLOCK_C=CARRY_CHANNELS, BLOCK_S=block_s, num_warps=CARRY_WARPS,
            )  # fmt: skip

        # the chunks' middle states too, for the backward's per-token main pass (PassConfig.mid_states)
        mids = torch.empty_like(states) if save and launch.save_mids else None
        _fwd_launch.at(launch.sites, "main", launch.grid)(
            u, delta, A, B, C, Dv, bias, z_arg, y, pre_arg, states, last, last, launch.table,
            mids if mids is not None else last, *common, launch.n_state, nsplit, *launch.strides,
            GATE=gate, STORE_PRE=pre is not None, SAVE_STATES=save, END_ONLY=False, SAVE_MID=mids is not None,
            **launch.flags,
        )  # fmt: skip

    if launch.fused_merge:
        out, pre = _merge(y, z, u, p, save, launch.merge_grid, launch.merge_block, launch.sites)
    else:  # y is the output: (B, K, C, *S) stacked, or allocated as (B, C, *S) for one order summed
        out = y
    return ForwardResult(out, last, states if save else None, pre, p, mids=mids)


SYNC_STRIDE = 64  # int32 words per row of a fused launch's counters (_fwd_fused_kernel)
CARRY_STEP = 16  # segments whose end states the fused carry loads together
_SYNC: dict[tuple, torch.Tensor] = {}  # the fused passes' counters, per device and stream (zero between launches)


def _sync_words(dev: torch.device, n: int) -> torch.Tensor | None:
    """``n`` zero int32 words for a fused launch on the current stream.

    None while a CUDA graph is being captured and the stream has none yet: a buffer made then would be zeroed only
    when the graph replays.
    """
    stream = launch_stream(dev) if dev.type == "cuda" else 0
    words = _SYNC.get((dev, stream))
    if words is None or words.numel() < n:
        if dev.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        words = _SYNC[(dev, stream)] = torch.zeros(max(n, 4096), device=dev, dtype=torch.int32)
    return words


def _fused_passes(launch, u, delta, A, B, C, Dv, bias, z_arg, y, pre_arg, last, save, gate, store_pre):
    # _fwd_fused_kernel: one cooperative launch on the GPU, its two phases apart under the interpreter; returns the
    # saved (states, mids) as run() does. None: launch the passes apart (no counters while a graph is captured, or
    # the driver refused the grid).
    p, nsplit, dev, grid = launch.plan, launch.nsplit, u.device, launch.grid
    sync = _sync_words(dev, SYNC_STRIDE * grid[0] * grid[2])
    if sync is None:
        return None
    seg_state = torch.empty(p.batch, p.K, nsplit, p.N, p.channels, device=dev, dtype=torch.float32)
    seg_dt = torch.empty(p.batch, p.K, nsplit, p.channels, device=dev, dtype=torch.float32)
    states = torch.empty(p.batch, p.K, launch.n_state, p.N, p.channels, device=dev, dtype=torch.float32)
    mids = torch.empty_like(states) if save and launch.save_mids else None
    args = (
        u, delta, A, B, C, Dv, bias, z_arg, y, pre_arg, states, last, seg_state, seg_dt, launch.table,
        mids if mids is not None else last, sync, p.L, p.channels, p.N, p.K, p.cpg, p.nchunks, launch.cps,
        launch.n_state, nsplit, *launch.strides,
    )  # fmt: skip
    meta = dict(
        GATE=gate, STORE_PRE=store_pre, SAVE_STATES=save,
        SAVE_MID=mids is not None, HELPERS=launch.helpers, CARRY_STEP=CARRY_STEP, SYNC_STRIDE=SYNC_STRIDE,
        **launch.flags,
    )  # fmt: skip
    if dev.type != "cuda":
        _fused_launch[grid](*args, PHASE=1, **meta)
        _fused_launch[grid](*args, PHASE=2, **meta)
    else:
        try:
            _fused_launch.at(launch.sites, "fused", grid)(*args, PHASE=0, launch_cooperative_grid=True, **meta)
        except RuntimeError as err:  # too many programs for a cooperative grid (shared memory, another GPU)
            if "fused" in launch.sites or "cooperative" not in str(err).lower():
                raise
            launch.sites["apart"] = True
            return None
    return states, mids


@dataclass(frozen=True)
class _Launch:
    """What the launches of a forward call take besides its tensors.

    It follows from the inputs' shapes, strides, dtypes and alignment and the settings, so :func:`forward` derives
    it once per such signature (the host time of a call matters at the small stages, where the GPU waits for it).
    """

    plan: Plan
    cps: int
    nsplit: int
    n_state: int
    grid: tuple[int, int, int]
    carry_grid: tuple[int, int]
    carry_blocks: tuple[int, int]  # BLOCK_S, BLOCK_N of the carry pass
    merge_grid: tuple[int, int]
    merge_block: int
    fused_merge: bool
    pre_per_order: bool  # allocate the pre-gate output beside y, shaped like it
    table: torch.Tensor
    strides: tuple[int, ...]
    flags: dict
    y_shape: tuple[int, ...]  # of y and the pre-gate output: (B, K, C, *S), or (B, C, *S) for one order summed
    line_vectors: int = 0  # lines per thread of the line-vector passes (lines.py); 0: the chunk passes
    save_mids: bool = False  # a saving call keeps the chunks' middle states too (PassConfig.mid_states)
    fused: bool = False  # segment pass, carry and main pass in one launch (PassConfig.fused_carry)
    helpers: int = 1  # programs per row that carry the fused launch's states, a power of two dividing BLOCK_N
    sites: dict = field(default_factory=dict, compare=False, repr=False)  # the launches' kernels (Launcher.at)


_LAUNCHES: dict[tuple, _Launch | _Groups] = {}


def _launch_settings(u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, merge, save, cfg, out):
    p = plan(u, A, B)
    dev = u.device
    block = min(1024, layout.next_power_of_2(p.L))
    ranges = _order_ranges(p, orders, merge, cfg)
    if ranges:
        return _Groups(p, ranges, (p.batch * p.channels, layout.cdiv(p.L, block)), block)
    line_len = _line_vector_length(p, orders, cfg)
    if line_len:
        return _line_vector_settings(p, u, delta, B, C, z, D, delta_bias, orders, delta_softplus, merge, save, cfg,
                                     line_len, out)  # fmt: skip
    sub, nsplit, cps = split(p, cfg, dev, orders)  # one thread per channel
    num_warps = max(1, min(cfg.num_warps, sub // 32))
    lines, line_len = lines_of(p, cfg, orders, u)
    if lines > 1:  # 32 lanes: 32 / lines channels × lines neighbouring lines
        sub, num_warps, nsplit, cps = 32, 1, p.L // line_len, line_len // p.block_t
    fused_merge = merge == "sum" and p.K > 1
    keep = cfg.save_pre_gate or p.K > 1  # else the backward rebuilds it (backward.GATE_GRAD)
    pre_per_order = not fused_merge and save and z is not None and keep
    # y and the pre-gate output are fresh (B, K, C, *S) tensors: contiguous and aligned (or y is the given out)
    y_b, y_k, y_c = p.K * p.channels * p.L, p.channels * p.L, p.L
    if out is not None:
        y_b, y_k, y_c = out.stride(0), out.stride(1), out.stride(2)
    pre_b, pre_k, pre_c = p.K * p.channels * p.L, p.channels * p.L, p.L
    z_arg = z if z is not None else u
    strides = (
        u.stride(0), u.stride(1), u.stride(2), delta.stride(0), delta.stride(1), delta.stride(2),
        B.stride(0), B.stride(1), B.stride(2), B.stride(3), C.stride(0), C.stride(1), C.stride(2), C.stride(3),
        z_arg.stride(0), z_arg.stride(1), y_b, y_k, y_c, pre_b, pre_k, pre_c,
    )  # fmt: skip
    ptx = cfg.ptx(dev, sub, num_warps) and p.block_n == p.N
    vec = 0 if lines > 1 else cfg.vector_mode(ptx, orders, p.spatial, u, delta, B, C, z_arg, saving=save)
    flags = {
        "SUB": sub, "BLOCK_T": p.block_t, "BLOCK_N": p.block_n, "HAS_D": D is not None,
        "HAS_BIAS": delta_bias is not None, "SOFTPLUS": delta_softplus, "num_warps": num_warps,
        "VEC_MODE": vec, "LINES": lines, "PREFETCH": cfg.prefetch,
    }  # fmt: skip
    cap = cfg.raster_maxnreg if vec in (1, 3) else cfg.maxnreg  # no token offsets: few registers to spare
    if cap:
        flags["maxnreg"] = cap
    fused = False
    if cfg.fused_carry and nsplit > 1 and lines == 1 and not layout.strided(orders, p.spatial):
        if dev.type == "cuda":  # every program resident at once: segments cut longer where needed
            most = configs.resident_programs(dev, num_warps, cap or 255) // (p.batch * p.K * (p.channels // sub))
            per = layout.cdiv(p.nchunks, most) if most >= 2 else p.nchunks
            if nsplit > most and cfg.segments is None and per <= cfg.fused_max_chunks:
                cps, nsplit = per, layout.cdiv(p.nchunks, per)
            fused = 2 <= nsplit <= most and cps <= cfg.fused_max_chunks
        else:
            fused = layout.interpreted()
    one_summed = merge == "sum" and p.K == 1  # then y, the output, is (B, C, *S): the memory of (B, 1, C, *S)
    return _Launch(
        plan=p,
        cps=cps,
        nsplit=nsplit,
        n_state=p.nchunks if save else nsplit,
        grid=(p.channels * lines // sub, nsplit // lines, p.batch * p.K),
        carry_grid=carry_grid(p.channels, p.N, p.batch * p.K, nsplit, p.block_n),
        carry_blocks=carry_blocks(nsplit, p.block_n),
        merge_grid=(p.batch * p.channels, layout.cdiv(p.L, block)),
        merge_block=block,
        fused_merge=fused_merge,
        pre_per_order=pre_per_order,
        table=layout.order_table(orders, p.spatial, dev),
        strides=strides,
        flags=flags,
        y_shape=(p.batch, p.channels, *p.spatial) if one_summed else (p.batch, p.K, p.channels, *p.spatial),
        save_mids=save and cfg.mid_states and vec in (1, 3),
        fused=fused,
        helpers=min(p.block_n, 1 << (nsplit.bit_length() - 1)),
    )


def _line_vector_length(p: Plan, orders: Sequence[ScanOrder], cfg: configs.PassConfig, any_states: bool = False) -> int:
    """The line length when a call of ``orders`` runs as line vectors (lines.py), else 0.

    ``any_states``: the backward's line vectors (lines_backward.py), whose states are a run-time loop; the forward's
    are 16 named tiles.
    """
    if (p.N != 16 and not any_states) or layout.channel_blocking(p.channels, p.groups, 32) != 32:
        return 0
    line_len = layout.line_groups(orders, p.spatial, cfg.line_vectors)
    return line_len if line_len and p.L // line_len // cfg.line_vectors <= MAX_GRID_Y else 0  # a grid axis of groups


def _order_ranges(p: Plan, orders, merge: str, cfg: configs.PassConfig) -> tuple[tuple[int, int], ...]:
    """The groups of a call run as groups of orders (PassConfig.split_orders), ``()``: one call."""
    if not cfg.split_orders or merge != "sum" or p.K < 2 or cfg.split_min_length > p.L:
        return ()
    dirs = layout.directions(orders, p.spatial)
    if all(dirs) or not any(not d and _line_vector_length(p, (o,), cfg) for d, o in zip(dirs, orders, strict=True)):
        return ()
    ranges, start = [], 0
    for k, d in enumerate(dirs):  # each strided order alone; raster and reversed runs between them together
        if not d or k + 1 == len(dirs) or not dirs[k + 1]:
            ranges.append((start, k + 1))
            start = k + 1
    return tuple(ranges)


def _grouped_forward(groups: _Groups, u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, save):
    # one call per group of orders, each writing its orders' ungated outputs into one fp32 (B, K, C, *S) buffer;
    # then the merge sums the K orders in order and gates, as for one call: one rounding to the output's dtype
    p = groups.plan
    y = torch.empty(p.batch, p.K, p.channels, *p.spatial, device=u.device, dtype=torch.float32)
    parts, lasts = [], []
    for i, (a, b) in enumerate(groups.ranges):
        launch = groups.group_launches.get(i)
        if launch is not None and a == 0:
            # the first group's slices start where the tensors do, and run() reads data pointers and the settings'
            # strides only: no slicing before the first kernel (host time)
            args, group_y = (u, delta, A, B, C, D, None, delta_bias), y
        else:
            args = (u[:, a:b], delta[:, a:b], A[a:b], B[:, a:b], C[:, a:b], D[a:b] if D is not None else None, None,
                    delta_bias[a:b] if delta_bias is not None else None)  # fmt: skip
            group_y = y[:, a:b]
        if launch is None:  # a group's settings, once (this is host time before the first kernel starts)
            _, launch, _ = settings(*args, orders[a:b], delta_softplus, "stack", save, group_y)
            groups.group_launches[i] = launch
        res = run(launch, *args, save, group_y)
        lasts.append(res.last_state)
        parts.append(Part(a, b, res.states, res.plan, res.mids))
    out, pre = _merge(y, z, u, p, save, groups.merge_grid, groups.merge_block, groups.sites)
    return ForwardResult(out, torch.cat(lasts, dim=1), None, pre, p, tuple(parts))


def _merge(y, z, u, p: Plan, save: bool, grid, block: int, sites: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, pre_gate)``: the fp32 per-order outputs ``y`` (B, K, C, *S) summed in order and gated, in u's dtype.

    The pre-gate sum is kept when a gated call saves for the backward. ``sites``: the memo of the call's launches
    (Launcher.at).
    """
    out = torch.empty(p.batch, p.channels, *p.spatial, device=u.device, dtype=u.dtype)
    pre = torch.empty_like(out) if (save and z is not None) else None
    z_arg = z if z is not None else u
    _merge_launch.at(sites, "merge", grid)(
        y, z_arg, out, pre if pre is not None else out, p.L, p.channels, p.K, z_arg.stride(0), z_arg.stride(1),
        HAS_Z=z is not None, STORE_PRE=pre is not None, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out, pre


def _line_vector_settings(p, u, delta, B, C, z, D, delta_bias, orders, delta_softplus, merge, save, cfg, line_len,
                          out):  # fmt: skip
    # one order scanned line by line: a segment per line, cfg.line_vectors lines per program (lines.py)
    lv = cfg.line_vectors
    nlines = p.L // line_len
    z_arg = z if z is not None else u
    pre = save and z is not None and cfg.save_pre_gate
    strides = (
        u.stride(0), u.stride(2), delta.stride(0), delta.stride(2), B.stride(0), B.stride(2), B.stride(3),
        C.stride(0), C.stride(2), C.stride(3), z_arg.stride(0), z_arg.stride(1),
        *((p.channels * p.L, p.L) if out is None else (out.stride(0), out.stride(2))), p.channels * p.L, p.L,
    )  # fmt: skip
    flags = {
        "SUB": 32, "LV": lv, "HAS_D": D is not None, "HAS_BIAS": delta_bias is not None, "SOFTPLUS": delta_softplus,
        "num_warps": 1,
    }  # fmt: skip
    if cfg.strided_maxnreg:
        flags["maxnreg"] = cfg.strided_maxnreg
    ngroups = nlines // lv
    return _Launch(
        plan=p,
        cps=line_len // p.block_t,
        nsplit=nlines,
        n_state=p.nchunks if save else ngroups,
        grid=(p.channels // 32, ngroups, p.batch),
        carry_grid=carry_grid(p.channels, p.N, p.batch, ngroups, p.block_n),
        carry_blocks=carry_blocks(ngroups, p.block_n),
        merge_grid=(0, 0),
        merge_block=0,
        fused_merge=False,
        pre_per_order=pre,
        table=layout.order_table(orders, p.spatial, u.device),
        strides=strides,
        flags=flags,
        y_shape=(p.batch, p.channels, *p.spatial) if merge == "sum" else (p.batch, 1, p.channels, *p.spatial),
        line_vectors=lv,
        save_mids=save and cfg.mid_states,
    )


def _line_vector_passes(launch, u, delta, A, B, C, Dv, bias, z, save, out) -> ForwardResult:
    # the segment pass (per-line maps and per-group maps), the carry over groups, the main pass (lines.py)
    p, dev, f32 = launch.plan, u.device, torch.float32
    nlines, cps, lv = launch.nsplit, launch.cps, launch.line_vectors
    ngroups = nlines // lv
    y = torch.empty(launch.y_shape, device=dev, dtype=u.dtype) if out is None else out
    pre = torch.empty(launch.y_shape, device=dev, dtype=u.dtype) if launch.pre_per_order else None
    line_state = torch.empty(p.batch, nlines, p.N, p.channels, device=dev, dtype=f32)
    line_dt = torch.empty(p.batch, nlines, p.channels, device=dev, dtype=f32)
    seg_state = torch.empty(p.batch, 1, p.channels, ngroups, p.N, device=dev, dtype=f32)
    seg_dt = torch.empty(p.batch, 1, p.channels, ngroups, device=dev, dtype=f32)
    last = torch.empty(p.batch, 1, p.channels, p.N, device=dev, dtype=f32)
    states = torch.empty(p.batch, 1, launch.n_state, p.N, p.channels, device=dev, dtype=f32)
    z_arg = z if z is not None else u
    pre_arg = pre if pre is not None else y
    # the chunks' middle states too, for the line-vector backward (PassConfig.mid_states)
    mids = torch.empty_like(states) if save and launch.save_mids else None
    tensors = (u, delta, A, B, C, Dv, bias, z_arg, y, pre_arg, states, last, seg_state, seg_dt, line_state, line_dt,
               launch.table, mids if mids is not None else last, p.channels, p.cpg, cps, launch.n_state, nlines,
               ngroups, *launch.strides)  # fmt: skip
    _lines_launch.at(launch.sites, "segments", launch.grid)(
        *tensors, GATE=False, STORE_PRE=False, SAVE_STATES=False, END_ONLY=True, **launch.flags
    )
    if ngroups > 1:
        block_s, block_n = launch.carry_blocks
        _fwd_carry_launch.at(launch.sites, "carry", launch.carry_grid)(
            A, seg_state, seg_dt, states, p.channels, p.N, 1, ngroups, lv * cps, launch.n_state,
            SAVE_STATES=save, BLOCK_N=block_n, BLOCK_C=CARRY_CHANNELS, BLOCK_S=block_s, num_warps=CARRY_WARPS,
        )  # fmt: skip
    _lines_launch.at(launch.sites, "main", launch.grid)(
        *tensors, GATE=z is not None, STORE_PRE=pre is not None, SAVE_STATES=save, END_ONLY=False,
        SAVE_MID=mids is not None, **launch.flags,
    )  # fmt: skip
    return ForwardResult(y, last, states if save else None, pre, p, mids=mids)
