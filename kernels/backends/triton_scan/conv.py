"""Causal depthwise convolution along scan orders, in the natural layout (Triton).

For order k with kernel width W: ``y_k[t] = act(bias_k + Σ_{j<W} w_k[j]·x[t − W + 1 + j])`` along the order's
sequence t (zero before the first token), read and written at the tokens' raster positions through the order's
stride table (layout.py) — the conv1d that precedes every Mamba scan, without permuted copies of x.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from medmamba.kernels.orders import ScanOrder

from . import layout
from .common import _order_row, _token_of_offset, _token_offsets
from .launch import Launcher

__all__ = ["causal_conv"]

# A program covers SUB channels × BLOCK_P neighbouring raster offsets, offsets fastest across its threads, so that
# every load and store of a warp is a run of consecutive addresses whatever the order (the earlier tokens of
# offsets p, p + 1, ... of the slice order sit at p − H·W, p + 1 − H·W, ...). Integer divisions by the runtime
# sizes of an order are the costly part, so a token's neighbours are found by the cheapest of three MODEs:
# 0, raster or reversed orders: at p ± d; 1, lines at least W − 1 long: p's coordinates along the order's three
# axes once, then each neighbour by at most one carry into the next axis; 2, any order: the order arithmetic per
# neighbour (common._token_offsets). On an H100, SegMamba's three orders at 64³ (bf16, 96 channels, batch 2):
# forward / forward+backward 2.6 / 16.8 ms with mode 2 for every order, 1.1 / 8.8 with modes 0 and 2.
_SUB = 16
_BLOCK_P = 128


@triton.jit
def _mode(L, fast, mid, st_fast, st_mid, st_slow, W: tl.constexpr):
    slow = L // (fast * mid)
    natural = ((fast == 1) | (st_fast == 1)) & ((mid == 1) | (st_mid == fast)) & ((slow == 1) | (st_slow == fast * mid))
    return tl.where(natural, 0, tl.where(fast >= W - 1, 1, 2))


@triton.jit
def _coordinates(p, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE: tl.constexpr):
    # (token index of offset p, its index along the fast axis, along the mid axis); the last two for MODE 1 only
    if MODE == 0:
        return tl.where(rev != 0, L - 1 - p, p), p, p
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
        off = tl.where(rev != 0, p - d, p + d)
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
def _conv_program(
    x_ptr, w_ptr, bias_ptr, order_ptr, b, k, L, CH, K, sx_b, sx_c,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # What a program of either pass works on for batch b and order k: its rows' start in the (B, K, C, *S) outputs,
    # the channel mask, its raster offsets and their mask, the rows of x (B, C, *S), the weights, the bias and the
    # order's table row
    ch = tl.program_id(0) * SUB + tl.arange(0, SUB)
    c_ok = ch < CH
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    x_rows = x_ptr + b.to(tl.int64) * sx_b + ch.to(tl.int64) * sx_c
    bias = tl.load(bias_ptr + k * CH + ch, mask=c_ok, other=0.0) if HAS_BIAS else tl.zeros([SUB], dtype=tl.float32)
    fast, mid, st_fast, st_mid, st_slow, rev = _order_row(order_ptr, k)
    row = ((b * K + k).to(tl.int64) * CH + ch.to(tl.int64)) * L
    return row, c_ok, p, p < L, x_rows, w_ptr + (k * CH + ch) * W, bias, fast, mid, st_fast, st_mid, st_slow, rev


@triton.jit
def _conv_fwd_tile(
    x_rows, w_row, bias, y_rows, p, valid, c_ok, L, fast, mid, st_fast, st_mid, st_slow, rev,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
    MODE: tl.constexpr,
):  # fmt: skip
    t, f, m = _coordinates(p, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
    acc = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
    if HAS_BIAS:
        acc += bias[:, None]
    for j in tl.static_range(W):
        off, ok = _neighbour(p, t, f, m, j - (W - 1), L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
        xv = tl.load(x_rows[:, None] + off[None, :], mask=c_ok[:, None] & (valid & ok)[None, :], other=0.0)
        acc += tl.load(w_row + j, mask=c_ok, other=0.0)[:, None] * xv.to(tl.float32)
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(y_rows[:, None] + p[None, :], acc, mask=c_ok[:, None] & valid[None, :])


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, order_ptr, L, CH, K, sx_b, sx_c,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    bk = tl.program_id(2)
    row, c_ok, p, valid, x_rows, w_row, bias, fast, mid, st_fast, st_mid, st_slow, rev = _conv_program(
        x_ptr, w_ptr, bias_ptr, order_ptr, bk // K, bk % K, L, CH, K, sx_b, sx_c, W, HAS_BIAS, SUB, BLOCK_P
    )
    args = (x_rows, w_row, bias, y_ptr + row, p, valid, c_ok, L, fast, mid, st_fast, st_mid, st_slow, rev)
    mode = _mode(L, fast, mid, st_fast, st_mid, st_slow, W)
    if mode == 0:
        _conv_fwd_tile(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, 0)
    elif mode == 1:
        _conv_fwd_tile(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, 1)
    else:
        _conv_fwd_tile(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, 2)


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
    x_rows, w_row, bias, dy_rows, dw_part, db_part, p, t, f, m, valid, c_ok, L, fast, mid, st_fast, st_mid,
    st_slow, rev, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
    MODE: tl.constexpr,
):  # fmt: skip
    # _conv_bwd_tile for W = 4, written out: the pre-activations at t..t+3 from a sliding window of x
    w0 = tl.load(w_row, mask=c_ok, other=0.0)[:, None]
    w1 = tl.load(w_row + 1, mask=c_ok, other=0.0)[:, None]
    w2 = tl.load(w_row + 2, mask=c_ok, other=0.0)[:, None]
    w3 = tl.load(w_row + 3, mask=c_ok, other=0.0)[:, None]
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
    tl.store(dw_part, tl.sum(g * x0, axis=1), mask=c_ok)
    tl.store(dw_part + 1, tl.sum(g * x1, axis=1), mask=c_ok)
    tl.store(dw_part + 2, tl.sum(g * x2, axis=1), mask=c_ok)
    tl.store(dw_part + 3, tl.sum(g * x3, axis=1), mask=c_ok)
    if HAS_BIAS:
        tl.store(db_part, tl.sum(g, axis=1), mask=c_ok)
    dx = w3 * g
    x4 = _conv_x(*a, 1, *o)
    dx += w2 * _conv_g(dy_rows, b + w0 * x1 + w1 * x2 + w2 * x3 + w3 * x4, p, t, f, m, 1, *o[:-1], SILU, MODE)
    x5 = _conv_x(*a, 2, *o)
    dx += w1 * _conv_g(dy_rows, b + w0 * x2 + w1 * x3 + w2 * x4 + w3 * x5, p, t, f, m, 2, *o[:-1], SILU, MODE)
    x6 = _conv_x(*a, 3, *o)
    dx += w0 * _conv_g(dy_rows, b + w0 * x3 + w1 * x4 + w2 * x5 + w3 * x6, p, t, f, m, 3, *o[:-1], SILU, MODE)
    return dx


@triton.jit
def _conv_bwd_tile(
    x_rows, w_row, bias, dy_rows, dw_part, db_part, p, valid, c_ok, L, fast, mid, st_fast, st_mid,
    st_slow, rev, W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr,
    BLOCK_P: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    # This order's share of dx at the tile's offsets, dx[t] = Σ_i w[W−1−i]·g[t+i] with g = dy·act'(pre) recomputed
    # at t..t+W−1 (fp32, returned); stores the tile's dw and dbias partials
    t, f, m = _coordinates(p, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
    if W == 4:  # every Mamba: each of the 2W − 1 neighbours loaded once (the loop below loads W² + 2W)
        return _conv_bwd_tile4(x_rows, w_row, bias, dy_rows, dw_part, db_part, p, t, f, m, valid, c_ok, L, fast, mid,
                               st_fast, st_mid, st_slow, rev, HAS_BIAS, SILU, SUB, BLOCK_P, MODE)  # fmt: skip
    dx = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
    for i in tl.static_range(W):
        off_i, ok_i = _neighbour(p, t, f, m, i, L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
        ok_i = ok_i & valid
        pre = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
        if HAS_BIAS:
            pre += bias[:, None]
        for j in tl.static_range(W):
            off, ok = _neighbour(p, t, f, m, i + j - (W - 1), L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
            xv = tl.load(x_rows[:, None] + off[None, :], mask=c_ok[:, None] & (ok_i & ok)[None, :], other=0.0)
            pre += tl.load(w_row + j, mask=c_ok, other=0.0)[:, None] * xv.to(tl.float32)
        g = tl.load(dy_rows[:, None] + off_i[None, :], mask=c_ok[:, None] & ok_i[None, :], other=0.0)
        g = g.to(tl.float32)
        if SILU:
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        g = tl.where(ok_i[None, :], g, 0.0)
        dx += tl.load(w_row + (W - 1 - i), mask=c_ok, other=0.0)[:, None] * g
        if i == 0:  # this tile's own tokens: weight and bias gradients
            for j in tl.static_range(W):
                off, ok = _neighbour(p, t, f, m, j - (W - 1), L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
                xv = tl.load(x_rows[:, None] + off[None, :], mask=c_ok[:, None] & (valid & ok)[None, :], other=0.0)
                tl.store(dw_part + j, tl.sum(g * xv.to(tl.float32), axis=1), mask=c_ok)
            if HAS_BIAS:
                tl.store(db_part, tl.sum(g, axis=1), mask=c_ok)
    return dx


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, order_ptr, L, CH, K, ntiles, sx_b, sx_c,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    # One program: SUB channels × BLOCK_P offsets of batch b, every order in turn. x is shared by the orders, so
    # its gradient is their sum: kept in fp32 here and stored once (B, C, *S), where a (B, K, C, *S) gradient
    # per order would be summed by autograd's expand backward in another pass over K times the bytes.
    b = tl.program_id(2)
    dx = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
    for k in range(K):
        row, c_ok, p, valid, x_rows, w_row, bias, fast, mid, st_fast, st_mid, st_slow, rev = _conv_program(
            x_ptr, w_ptr, bias_ptr, order_ptr, b, k, L, CH, K, sx_b, sx_c, W, HAS_BIAS, SUB, BLOCK_P
        )
        part = (row // L) * ntiles + tl.program_id(1)  # (B, K, C, ntiles) partial sums
        args = (x_rows, w_row, bias, dy_ptr + row, dw_ptr + part * W, db_ptr + part, p, valid, c_ok, L,
                fast, mid, st_fast, st_mid, st_slow, rev)  # fmt: skip
        mode = _mode(L, fast, mid, st_fast, st_mid, st_slow, W)
        if mode == 0:
            dx_k = _conv_bwd_tile(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, 0)
        elif mode == 1:
            dx_k = _conv_bwd_tile(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, 1)
        else:
            dx_k = _conv_bwd_tile(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, 2)
        dx += dx_k
    ch = tl.program_id(0) * SUB + tl.arange(0, SUB)
    p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    rows = (b.to(tl.int64) * CH + ch.to(tl.int64)) * L
    tl.store(dx_ptr + rows[:, None] + p[None, :], dx, mask=(ch < CH)[:, None] & (p < L)[None, :])


_conv_fwd_launch = Launcher(_conv_fwd_kernel)
_conv_bwd_launch = Launcher(_conv_bwd_kernel)


def _launch_shape(x: torch.Tensor, K: int) -> tuple[int, int, int, int, int]:
    batch, channels = x.shape[:2]
    L = x[0, 0].numel()
    sub = min(_SUB, layout.next_power_of_2(channels))
    return batch, K, channels, L, sub


class _CausalConv(torch.autograd.Function):
    """``y = causal_conv(x, weight, bias)``: x ``(B, C, *S)`` shared by the K orders, y ``(B, K, C, *S)``.

    Saved for backward: x, weight, bias (the pre-activation is recomputed).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, orders, silu):  # type: ignore[override]
        """Launch the forward kernel."""
        batch, K, channels, L, sub = _launch_shape(x, len(orders))
        spatial = tuple(x.shape[2:])
        table = layout.order_table(orders, spatial, x.device)
        w = weight.float().contiguous()
        b = bias.float().contiguous() if bias is not None else w
        y = torch.empty(batch, K, channels, *spatial, device=x.device, dtype=x.dtype)
        grid = (layout.cdiv(channels, sub), layout.cdiv(L, _BLOCK_P), batch * K)
        _conv_fwd_launch[grid](
            x, w, b, y, table, L, channels, K, x.stride(0), x.stride(1),
            W=weight.shape[-1], HAS_BIAS=bias is not None, SILU=silu, SUB=sub, BLOCK_P=_BLOCK_P, num_warps=4,
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
        batch, K, channels, L, sub = _launch_shape(x, len(ctx.orders))
        spatial = tuple(x.shape[2:])
        table = layout.order_table(ctx.orders, spatial, x.device)
        w = weight.float().contiguous()
        b = bias.float().contiguous() if bias is not None else w
        dy = dy.contiguous()
        ntiles = layout.cdiv(L, _BLOCK_P)
        dx = torch.empty(batch, channels, *spatial, device=x.device, dtype=x.dtype)
        dw = torch.empty(batch, K, channels, ntiles, weight.shape[-1], device=x.device, dtype=torch.float32)
        db = torch.empty(batch, K, channels, ntiles, device=x.device, dtype=torch.float32)
        grid = (layout.cdiv(channels, sub), ntiles, batch)
        _conv_bwd_launch[grid](
            x, w, b, dy, dx, dw, db, table, L, channels, K, ntiles, x.stride(0), x.stride(1),
            W=weight.shape[-1], HAS_BIAS=bias is not None, SILU=ctx.silu, SUB=sub, BLOCK_P=_BLOCK_P, num_warps=4,
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
