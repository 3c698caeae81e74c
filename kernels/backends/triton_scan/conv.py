"""Causal depthwise convolution along scan orders, in the natural layout (Triton).

For order k with kernel width W: ``y_k[t] = act(bias_k + Σ_{j<W} w_k[j]·x[t − W + 1 + j])`` along the order's
sequence t (zero before the first token), read and written at the tokens' raster positions through the order's
stride table (layout.py) — the conv1d that precedes every Mamba scan, without permuted copies of x.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from medmamba.kernels.orders import ScanOrder

from . import layout
from .common import _order_row, _token_of_offset, _token_offsets
from .configs import conv_backward_tile, conv_forward_tile
from .launch import Launcher

__all__ = ["causal_conv"]

# A program covers SUB channels × BLOCK_P neighbouring raster offsets at a time (configs.ConvTile), offsets fastest
# across its threads, so that every load and store of a warp is a run of consecutive addresses whatever the order
# (the earlier tokens of offsets p, p + 1, ... of the slice order sit at p − H·W, p + 1 − H·W, ...), and STEPS such
# tiles one after another: a program's set-up (its rows' pointers, the weights, the order's table row) costs as
# much as a tile or two, so it is paid once for all of them. Integer divisions by the runtime sizes of an order
# are the costly part, so a token's neighbours are found by the cheapest of four modes, which the host picks per
# order (_modes) and the kernels compile only for the call's orders:
# 0, the raster order: at p + d; 3, the reversed raster order: at p − d; 1, lines at least W − 1 long: p's
# coordinates along the order's three axes once, then each neighbour by at most one carry into the next axis;
# 2, any order: the order arithmetic per neighbour (common._token_offsets). On an H200, SegMamba's three orders at
# 64³ (bf16, 96 channels, batch 2; benchmarks/conv_gpu.py): forward / backward 0.96 / 4.13 ms with one 16 × 128
# tile per program and every mode compiled in (the backward at 255 registers); 0.68 / 1.99 ms as now (configs.py).
# Both passes are bound by instructions, not bytes (Nsight Compute: 84 % / 70 % of the SM's issue slots, 15 % / 5 % of
# DRAM's bandwidth): the backward recomputes each pre-activation at the W tokens whose gradient it feeds.
MODE_RASTER, MODE_LINES, MODE_GENERAL, MODE_REVERSED = 0, 1, 2, 3


@functools.lru_cache(maxsize=256)
def _modes(orders: tuple[ScanOrder, ...], spatial: tuple[int, ...], width: int) -> tuple[int, int]:
    """(each order's mode in two bits, order k at bits 2k; the modes present, bit m for mode m)."""
    L = 1
    for s in spatial:
        L *= s
    digits = present = 0
    for k, (fast, mid, st_fast, st_mid, st_slow, rev) in enumerate(layout.order_rows(orders, spatial)):
        slow = L // (fast * mid)
        natural = (fast == 1 or st_fast == 1) and (mid == 1 or st_mid == fast) and (slow == 1 or st_slow == fast * mid)
        if natural:
            mode = MODE_REVERSED if rev else MODE_RASTER
        else:
            mode = MODE_LINES if fast >= width - 1 else MODE_GENERAL
        digits |= mode << (2 * k)
        present |= 1 << mode
    return digits, present


@triton.jit
def _coordinates(p, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE: tl.constexpr):
    # (token index of offset p, its index along the fast axis, along the mid axis); the last two for MODE 1 only
    if MODE == 0:
        return p, p, p
    elif MODE == 3:
        return L - 1 - p, p, p
    elif MODE == 1:
        f = (p // st_fast) % fast
        m = (p // st_mid) % mid
        t = (((p // st_slow) % (L // (fast * mid))) * mid + m) * fast + f
        return tl.where(rev != 0, L - 1 - t, t), f, m
    else:
        return _token_of_offset(tl.minimum(p, L - 1), L, fast, mid, st_fast, st_mid, st_slow, rev), p, p


@triton.jit
def _neighbour(p, t, f, m, d, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE: tl.constexpr):
    # (raster offset, in range) of token t + d of the order, t the token at offset p (f, m: see _coordinates)
    q = t + d
    if MODE == 0:
        off = p + d
    elif MODE == 3:
        off = p - d
    elif MODE == 1:  # |d| < W ≤ fast + 1: at most one carry from the fast axis into the mid one, and on
        e = tl.where(rev != 0, -d, d)  # the reversed order steps back along the raster axes
        f2 = f + e
        carry = tl.where(f2 < 0, -1, tl.where(f2 >= fast, 1, 0))
        m2 = m + carry
        carry2 = tl.where(m2 < 0, -1, tl.where(m2 >= mid, 1, 0))
        off = p + (e - carry * fast) * st_fast + (carry - carry2 * mid) * st_mid + carry2 * st_slow
    else:
        off = _token_offsets(tl.maximum(q, 0), L, fast, mid, st_fast, st_mid, st_slow, rev)
    return off, (q >= 0) & (q < L)


@triton.jit
def _conv_weights(w_ptr, bias_ptr, k, ch, c_ok, CH, W: tl.constexpr, HAS_BIAS: tl.constexpr, SUB: tl.constexpr):
    # order k's weights for the program's channels as a tuple of W fp32 [SUB] vectors, and its bias
    w_row = w_ptr + (k * CH + ch) * W
    ws = ()
    for j in tl.static_range(W):
        ws = ws + (tl.load(w_row + j, mask=c_ok, other=0.0),)  # noqa: RUF005 (Triton builds tuples so)
    bias = tl.load(bias_ptr + k * CH + ch, mask=c_ok, other=0.0) if HAS_BIAS else tl.zeros([SUB], dtype=tl.float32)
    return ws, bias


@triton.jit
def _conv_fwd_tiles(
    x_rows, ws, bias, y_rows, p0, steps, c_ok, L, fast, mid, st_fast, st_mid, st_slow, rev,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
    MODE: tl.constexpr,
):  # fmt: skip
    for i in range(steps):
        p = p0 + i * BLOCK_P + tl.arange(0, BLOCK_P)
        valid = p < L
        t, f, m = _coordinates(p, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
        acc = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
        if HAS_BIAS:
            acc += bias[:, None]
        for j in tl.static_range(W):
            off, ok = _neighbour(p, t, f, m, j - (W - 1), L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
            xv = tl.load(x_rows[:, None] + off[None, :], mask=c_ok[:, None] & (valid & ok)[None, :], other=0.0)
            acc += ws[j][:, None] * xv.to(tl.float32)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(y_rows[:, None] + p[None, :], acc, mask=c_ok[:, None] & valid[None, :])


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, order_ptr, L, CH, K, steps, sx_b, sx_c,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
    MODES: tl.constexpr, PRESENT: tl.constexpr,
):  # fmt: skip
    # One program: SUB channels of batch b, order k, steps × BLOCK_P raster offsets
    bk = tl.program_id(2)
    b = bk // K
    k = bk % K
    ch = tl.program_id(0) * SUB + tl.arange(0, SUB)
    c_ok = ch < CH
    x_rows = x_ptr + b.to(tl.int64) * sx_b + ch.to(tl.int64) * sx_c
    y_rows = y_ptr + (bk.to(tl.int64) * CH + ch.to(tl.int64)) * L
    ws, bias = _conv_weights(w_ptr, bias_ptr, k, ch, c_ok, CH, W, HAS_BIAS, SUB)
    fast, mid, st_fast, st_mid, st_slow, rev = _order_row(order_ptr, k)
    args = (x_rows, ws, bias, y_rows, tl.program_id(1) * steps * BLOCK_P, steps, c_ok, L,
            fast, mid, st_fast, st_mid, st_slow, rev)  # fmt: skip
    mode = (MODES >> (2 * k)) & 3
    if PRESENT & 1:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if mode == 0:
            _conv_fwd_tiles(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, 0)
    if PRESENT & 2:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if mode == 1:
            _conv_fwd_tiles(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, 1)
    if PRESENT & 4:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if mode == 2:
            _conv_fwd_tiles(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, 2)
    if PRESENT & 8:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if mode == 3:
            _conv_fwd_tiles(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, 3)


@triton.jit
def _conv_x(x_rows, p, t, f, m, d, valid, c_ok, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE: tl.constexpr):
    # x at token t + d of the order (zero outside the sequence), fp32
    off, ok = _neighbour(p, t, f, m, d, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
    return tl.load(x_rows[:, None] + off[None, :], mask=c_ok[:, None] & (valid & ok)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _conv_g(dy_rows, pre, p, t, f, m, i, valid, c_ok, L, fast, mid, st_fast, st_mid, st_slow, rev,
            SILU: tl.constexpr, MODE: tl.constexpr):  # fmt: skip
    # g = dy·act'(pre) at token t + i, zero past the end
    off, ok = _neighbour(p, t, f, m, i, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
    ok = ok & valid
    g = tl.load(dy_rows[:, None] + off[None, :], mask=c_ok[:, None] & ok[None, :], other=0.0).to(tl.float32)
    if SILU:
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return tl.where(ok[None, :], g, 0.0)


@triton.jit
def _conv_bwd_tile4(
    x_rows, ws, bias, dy_rows, p, t, f, m, valid, c_ok, L, fast, mid, st_fast, st_mid, st_slow, rev,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    # _conv_bwd_tile for W = 4, written out: the pre-activations at t..t+3 from a sliding window of x
    w0 = ws[0][:, None]
    w1 = ws[1][:, None]
    w2 = ws[2][:, None]
    w3 = ws[3][:, None]
    b = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
    if HAS_BIAS:
        b += bias[:, None]
    a = (x_rows, p, t, f, m)
    o = (valid, c_ok, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
    x0 = _conv_x(*a, -3, *o)
    x1 = _conv_x(*a, -2, *o)
    x2 = _conv_x(*a, -1, *o)
    x3 = _conv_x(*a, 0, *o)
    g = _conv_g(dy_rows, b + w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3, p, t, f, m, 0, *o[:-1], SILU, MODE)
    dws = (g * x0, g * x1, g * x2, g * x3)
    dx = w3 * g
    x4 = _conv_x(*a, 1, *o)
    dx += w2 * _conv_g(dy_rows, b + w0 * x1 + w1 * x2 + w2 * x3 + w3 * x4, p, t, f, m, 1, *o[:-1], SILU, MODE)
    x5 = _conv_x(*a, 2, *o)
    dx += w1 * _conv_g(dy_rows, b + w0 * x2 + w1 * x3 + w2 * x4 + w3 * x5, p, t, f, m, 2, *o[:-1], SILU, MODE)
    x6 = _conv_x(*a, 3, *o)
    dx += w0 * _conv_g(dy_rows, b + w0 * x3 + w1 * x4 + w2 * x5 + w3 * x6, p, t, f, m, 3, *o[:-1], SILU, MODE)
    return dx, dws, g


@triton.jit
def _conv_bwd_tile(
    x_rows, ws, bias, dy_rows, p, valid, c_ok, L, fast, mid, st_fast, st_mid, st_slow, rev,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
    MODE: tl.constexpr,
):  # fmt: skip
    # This order's share of dx at the tile's offsets, dx[t] = Σ_i w[W−1−i]·g[t+i] with g = dy·act'(pre) recomputed
    # at t..t+W−1 (fp32), with the tile's terms of the weight gradients (g·x at each tap) and of the bias's (g)
    t, f, m = _coordinates(p, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
    if W == 4:  # every Mamba: each of the 2W − 1 neighbours loaded once (the loop below loads W² + 2W)
        return _conv_bwd_tile4(x_rows, ws, bias, dy_rows, p, t, f, m, valid, c_ok, L, fast, mid, st_fast, st_mid,
                               st_slow, rev, HAS_BIAS, SILU, SUB, BLOCK_P, MODE)  # fmt: skip
    dx = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
    g0 = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
    for i in tl.static_range(W):
        off_i, ok_i = _neighbour(p, t, f, m, i, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
        ok_i = ok_i & valid
        pre = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
        if HAS_BIAS:
            pre += bias[:, None]
        for j in tl.static_range(W):
            off, ok = _neighbour(p, t, f, m, i + j - (W - 1), L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
            xv = tl.load(x_rows[:, None] + off[None, :], mask=c_ok[:, None] & (ok_i & ok)[None, :], other=0.0)
            pre += ws[j][:, None] * xv.to(tl.float32)
        g = tl.load(dy_rows[:, None] + off_i[None, :], mask=c_ok[:, None] & ok_i[None, :], other=0.0)
        g = g.to(tl.float32)
        if SILU:
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        g = tl.where(ok_i[None, :], g, 0.0)
        dx += ws[W - 1 - i][:, None] * g
        if i == 0:  # this tile's own tokens: the weight and bias terms
            g0 = g
    dws = ()
    for j in tl.static_range(W):
        off, ok = _neighbour(p, t, f, m, j - (W - 1), L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
        xv = tl.load(x_rows[:, None] + off[None, :], mask=c_ok[:, None] & (valid & ok)[None, :], other=0.0)
        dws = dws + (g0 * xv.to(tl.float32),)  # noqa: RUF005 (Triton builds tuples so)
    return dx, dws, g0


@triton.jit
def _conv_bwd_tiles(
    x_rows, ws, bias, dy_rows, dx_rows, acc_rows, dw_part, db_part, p0, steps, c_ok, L, fast, mid, st_fast,
    st_mid, st_slow, rev, FIRST: tl.constexpr, LAST: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    # One order's pass over the program's tiles. x's gradient is summed over the orders in the fp32 rows of acc_rows
    # (orders in turn: deterministic), the last order storing the sum into dx_rows; the weight and bias terms are
    # summed in registers over the tiles and stored once, as the program's partial sums
    dw_acc = ()
    for _ in tl.static_range(W):
        dw_acc = dw_acc + (tl.zeros([SUB, BLOCK_P], dtype=tl.float32),)  # noqa: RUF005 (Triton builds tuples so)
    db_acc = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
    for i in range(steps):
        p = p0 + i * BLOCK_P + tl.arange(0, BLOCK_P)
        valid = p < L
        dx, dws, g = _conv_bwd_tile(x_rows, ws, bias, dy_rows, p, valid, c_ok, L, fast, mid, st_fast, st_mid,
                                    st_slow, rev, W, HAS_BIAS, SILU, SUB, BLOCK_P, MODE)  # fmt: skip
        summed = dw_acc
        dw_acc = ()
        for j in tl.static_range(W):
            dw_acc = dw_acc + (summed[j] + dws[j],)  # noqa: RUF005 (Triton builds tuples so)
        db_acc += g
        at = p[None, :]
        mask = c_ok[:, None] & valid[None, :]
        if not FIRST:
            dx += tl.load(acc_rows[:, None] + at, mask=mask, other=0.0)
        if LAST:
            tl.store(dx_rows[:, None] + at, dx, mask=mask)
        else:
            tl.store(acc_rows[:, None] + at, dx, mask=mask)
    for j in tl.static_range(W):
        tl.store(dw_part + j, tl.sum(dw_acc[j], axis=1), mask=c_ok)
    if HAS_BIAS:
        tl.store(db_part, tl.sum(db_acc, axis=1), mask=c_ok)


@triton.jit
def _conv_bwd_order(
    x_rows, ws, bias, dy_rows, dx_rows, acc_rows, dw_part, db_part, p0, steps, c_ok, L, fast, mid, st_fast,
    st_mid, st_slow, rev, mode, FIRST: tl.constexpr, LAST: tl.constexpr, W: tl.constexpr, HAS_BIAS: tl.constexpr,
    SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, PRESENT: tl.constexpr,
):  # fmt: skip
    args = (x_rows, ws, bias, dy_rows, dx_rows, acc_rows, dw_part, db_part, p0, steps, c_ok, L,
            fast, mid, st_fast, st_mid, st_slow, rev)  # fmt: skip
    if PRESENT & 1:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if mode == 0:
            _conv_bwd_tiles(*args, FIRST, LAST, W, HAS_BIAS, SILU, SUB, BLOCK_P, 0)
    if PRESENT & 2:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if mode == 1:
            _conv_bwd_tiles(*args, FIRST, LAST, W, HAS_BIAS, SILU, SUB, BLOCK_P, 1)
    if PRESENT & 4:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if mode == 2:
            _conv_bwd_tiles(*args, FIRST, LAST, W, HAS_BIAS, SILU, SUB, BLOCK_P, 2)
    if PRESENT & 8:  # noqa: SIM102 (a compile-time switch around a run-time test)
        if mode == 3:
            _conv_bwd_tiles(*args, FIRST, LAST, W, HAS_BIAS, SILU, SUB, BLOCK_P, 3)


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, dy_ptr, dx_ptr, acc_ptr, dw_ptr, db_ptr, order_ptr, L, CH, K, steps, sx_b, sx_c,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
    MODES: tl.constexpr, PRESENT: tl.constexpr,
):  # fmt: skip
    # One program: SUB channels × steps × BLOCK_P offsets of batch b, every order in turn. x is shared by the
    # orders, so its gradient is their sum, kept in fp32 (acc_ptr, (B, C, *S), L2-resident between the orders of a
    # program) and stored once into dx (B, C, *S), where a (B, K, C, *S) gradient per order would be summed by
    # autograd's expand backward in another pass over K times the bytes
    b = tl.program_id(2)
    ch = tl.program_id(0) * SUB + tl.arange(0, SUB)
    c_ok = ch < CH
    x_rows = x_ptr + b.to(tl.int64) * sx_b + ch.to(tl.int64) * sx_c
    rows = (b.to(tl.int64) * CH + ch.to(tl.int64)) * L
    p0 = tl.program_id(1) * steps * BLOCK_P
    for k in range(K):
        ws, bias = _conv_weights(w_ptr, bias_ptr, k, ch, c_ok, CH, W, HAS_BIAS, SUB)
        fast, mid, st_fast, st_mid, st_slow, rev = _order_row(order_ptr, k)
        row = (b * K + k).to(tl.int64) * CH + ch.to(tl.int64)  # (B, K, C) rows of dy and of the partials
        part = row * tl.num_programs(1) + tl.program_id(1)  # (B, K, C, programs along L) partial sums
        args = (x_rows, ws, bias, dy_ptr + row * L, dx_ptr + rows, acc_ptr + rows, dw_ptr + part * W, db_ptr + part,
                p0, steps, c_ok, L, fast, mid, st_fast, st_mid, st_slow, rev, (MODES >> (2 * k)) & 3)  # fmt: skip
        if K == 1:
            _conv_bwd_order(*args, True, True, W, HAS_BIAS, SILU, SUB, BLOCK_P, PRESENT)
        elif k == 0:
            _conv_bwd_order(*args, True, False, W, HAS_BIAS, SILU, SUB, BLOCK_P, PRESENT)
        elif k == K - 1:
            _conv_bwd_order(*args, False, True, W, HAS_BIAS, SILU, SUB, BLOCK_P, PRESENT)
        else:
            _conv_bwd_order(*args, False, False, W, HAS_BIAS, SILU, SUB, BLOCK_P, PRESENT)


_conv_fwd_launch = Launcher(_conv_fwd_kernel)
_conv_bwd_launch = Launcher(_conv_bwd_kernel)


def _launch_shape(x: torch.Tensor, K: int, tile) -> tuple[int, int, int, int, int, int, int]:
    # (batch, K, channels, L, channels per program, tiles per program, programs along L)
    batch, channels = x.shape[:2]
    L = x[0, 0].numel()
    sub = min(tile.sub, layout.next_power_of_2(channels))
    steps = max(1, min(tile.steps, layout.cdiv(L, tile.block_p)))
    return batch, K, channels, L, sub, steps, layout.cdiv(L, steps * tile.block_p)


class _CausalConv(torch.autograd.Function):
    """``y = causal_conv(x, weight, bias)``: x ``(B, C, *S)`` shared by the K orders, y ``(B, K, C, *S)``.

    Saved for backward: x, weight, bias (the pre-activation is recomputed).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, orders, silu):  # type: ignore[override]
        """Launch the forward kernel."""
        tile = conv_forward_tile()
        batch, K, channels, L, sub, steps, programs = _launch_shape(x, len(orders), tile)
        spatial = tuple(x.shape[2:])
        table = layout.order_table(orders, spatial, x.device)
        modes, present = _modes(orders, spatial, weight.shape[-1])
        w = weight.float().contiguous()
        b = bias.float().contiguous() if bias is not None else w
        y = torch.empty(batch, K, channels, *spatial, device=x.device, dtype=x.dtype)
        grid = (layout.cdiv(channels, sub), programs, batch * K)
        _conv_fwd_launch[grid](
            x, w, b, y, table, L, channels, K, steps, x.stride(0), x.stride(1),
            W=weight.shape[-1], HAS_BIAS=bias is not None, SILU=silu, SUB=sub, BLOCK_P=tile.block_p, MODES=modes,
            PRESENT=present, num_warps=tile.num_warps,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, bias)
        ctx.orders, ctx.silu = orders, silu
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        """Launch the backward kernel, which sums x's gradient over the orders.

        The weight and bias gradients are summed over the kernel's partials on the host (deterministic).
        """
        x, weight, bias = ctx.saved_tensors
        tile = conv_backward_tile()
        batch, K, channels, L, sub, steps, programs = _launch_shape(x, len(ctx.orders), tile)
        spatial = tuple(x.shape[2:])
        table = layout.order_table(ctx.orders, spatial, x.device)
        modes, present = _modes(ctx.orders, spatial, weight.shape[-1])
        w = weight.float().contiguous()
        b = bias.float().contiguous() if bias is not None else w
        dy = dy.contiguous()
        dx = torch.empty(batch, channels, *spatial, device=x.device, dtype=x.dtype)
        acc = dx if K == 1 else torch.empty(batch, channels, *spatial, device=x.device, dtype=torch.float32)
        dw = torch.empty(batch, K, channels, programs, weight.shape[-1], device=x.device, dtype=torch.float32)
        db = torch.empty(batch, K, channels, programs, device=x.device, dtype=torch.float32)
        grid = (layout.cdiv(channels, sub), programs, batch)
        _conv_bwd_launch[grid](
            x, w, b, dy, dx, acc, dw, db, table, L, channels, K, steps, x.stride(0), x.stride(1),
            W=weight.shape[-1], HAS_BIAS=bias is not None, SILU=ctx.silu, SUB=sub, BLOCK_P=tile.block_p,
            MODES=modes, PRESENT=present, num_warps=tile.num_warps,
        )  # fmt: skip
        d_bias = db.sum(dim=(0, 3)).to(bias.dtype) if bias is not None else None
        return dx, dw.sum(dim=(0, 3)).to(weight.dtype), d_bias, None, None


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    orders: Sequence[ScanOrder],
    silu: bool,
) -> torch.Tensor:
    """Order-aware causal depthwise convolution over canonical shapes (see medmamba.kernels.causal_conv).

    ``x`` ``(B, C, *S)``, read by every order; ``weight`` ``(K, C, W)``, ``bias`` ``(K, C)``; returns
    ``(B, K, C, *S)`` in the dtype of ``x`` (sums in fp32). The gradient of x comes out summed over the orders
    from the backward kernel itself.
    """
    x = layout.natural_spatial(x, x.ndim - 2)
    layout.spatial3(x.shape[2:])
    return _CausalConv.apply(x, weight, bias, tuple(orders), silu)
