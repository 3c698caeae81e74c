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
from .common import _token_of_offset, _token_offsets
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
# coordinates along the order's three axes once (divisions by multiplication, layout.divisor), then each neighbour
# by at most one carry into the next axis;
# 2, any order: the order arithmetic per neighbour (common._token_offsets).
#
# The backward runs in two passes: the forward's kernel with GRAD stores g = dy·act'(pre) per order and token and
# sums the weight and bias terms; _conv_dx_kernel then sums x's gradient, Σ_k Σ_i w_k[W−1−i]·g_k[t + i], over the
# orders in registers. One pass that recomputed each pre-activation at the W tokens whose gradient it feeds ran
# slower although it moved fewer bytes: these kernels are bound by instructions, not bytes (Nsight Compute on the
# H200: 84 % / 70 % of the SMs' issue slots, 15 % / 5 % of DRAM's bandwidth in the forward / one-pass backward).
# On an H200, SegMamba's three orders at 64³ (bf16, 96 channels, batch 2; benchmarks/conv_gpu.py), forward /
# backward: 0.96 / 4.13 ms with one 16 × 128 tile per program, every mode compiled in and one backward pass at 255
# registers; 0.67 / 2.13 ms at 4 × 128 × 8 steps, still one pass; 0.67-0.77 / 1.65 ms in two passes; 0.60 / 1.42 ms
# with the lines mode's divisions by multiplication (configs.py); 0.53-0.55 / 1.31-1.57 ms (later machines) with
# the approximate sigmoid and loads without a channel test, as now. The lines mode's carries as one test per tap
# took 50 instructions off its loop but ran slower: the g pass then took 113 registers instead of 96.
MODE_RASTER, MODE_LINES, MODE_GENERAL, MODE_REVERSED = 0, 1, 2, 3


@functools.lru_cache(maxsize=256)
def _modes(orders: tuple[ScanOrder, ...], spatial: tuple[int, ...], width: int) -> tuple[int, int]:
    """(each order's mode in two bits, order k at bits 2k; the modes present, bit m for mode m)."""
    digits = present = 0
    rows = layout.order_rows(orders, spatial)
    for k, ((fast, *_), direction) in enumerate(zip(rows, layout.directions(orders, spatial), strict=True)):
        if direction:
            mode = MODE_RASTER if direction == 1 else MODE_REVERSED
        else:
            mode = MODE_LINES if fast >= width - 1 else MODE_GENERAL
        digits |= mode << (2 * k)
        present |= 1 << mode
    return digits, present


@triton.jit
def _conv_row(table_ptr, k):
    # order k's row of layout.division_table: (fast, mid, st_fast, st_mid, st_slow, rev) and the (magic, shift) of
    # its strides' and sizes' divisions, 12 values
    row = table_ptr + k * 18
    divisions = ()
    for i in tl.static_range(12):
        divisions = divisions + (tl.load(row + 6 + i),)  # noqa: RUF005 (Triton builds tuples so)
    return (tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), tl.load(row + 4), tl.load(row + 5),
            divisions)  # fmt: skip


@triton.jit
def _div(n, magic, shift):
    # n // d for 0 ≤ n < 2³¹, from d's (magic, shift) (layout.divisor; d = 1 has magic 0)
    q = (tl.umulhi(n.to(tl.uint32), magic.to(tl.uint32)) >> shift.to(tl.uint32)).to(tl.int32)
    return tl.where(magic == 0, n, q)


@triton.jit
def _coordinates(p, L, fast, mid, st_fast, st_mid, st_slow, rev, dv, MODE: tl.constexpr):
    # (token index of offset p, its index along the fast axis, along the mid axis); the last two for MODE 1 only.
    # dv: the order's divisions (_conv_row)
    if MODE == 0:
        return p, p, p
    elif MODE == 3:
        return L - 1 - p, p, p
    elif MODE == 1:
        a = _div(p, dv[0], dv[1])
        f = a - _div(a, dv[6], dv[7]) * fast
        c = _div(p, dv[2], dv[3])
        m = c - _div(c, dv[8], dv[9]) * mid
        e = _div(p, dv[4], dv[5])
        t = ((e - _div(e, dv[10], dv[11]) * (L // (fast * mid))) * mid + m) * fast + f
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
def _channels_ok(ch, CH, EVEN_C: tl.constexpr, SUB: tl.constexpr):
    # the program's channels that exist; a constant when SUB divides CH, so the masks drop their channel test
    if EVEN_C:
        return tl.full([SUB], 1, tl.int1)
    else:
        return ch < CH


@triton.jit
def _sigmoid(x, FAST: tl.constexpr):
    # FAST: exp2 and reciprocal by the GPU's approximate instructions, flushing denormals (5 instructions where
    # tl.sigmoid's guards against denormal and huge arguments take 12; the conv is bound by its instructions).
    # Saturates to 0 and 1 at ±inf as tl.sigmoid does
    if FAST:
        e = tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x * -1.4426950408889634], dtype=tl.float32, is_pure=True, pack=1
        )
        return tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [1.0 + e], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.sigmoid(x)


@triton.jit
def _tap(at_p, rows, off, d, MODE: tl.constexpr):
    # the pointers of the neighbours at offsets `off` (d tokens along the order from the tile's offsets p): for the
    # raster and reversed orders the tile's own pointers `at_p` moved by a constant, which the compiler folds into
    # the loads' immediate offsets (a 64-bit multiply-add per element and tap otherwise)
    if MODE == 0:
        return at_p + d
    elif MODE == 3:
        return at_p - d
    else:
        return rows[:, None] + off[None, :]


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
    x_rows, ws, bias, y_rows, dy_rows, dw_part, db_part, p0, steps, c_ok, L, fast, mid, st_fast, st_mid, st_slow,
    rev, dv, W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
    MODE: tl.constexpr, GRAD: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    # The forward over the program's tiles; with GRAD, the backward's first pass instead: the pre-activation's
    # gradient g = dy·act'(pre) into y_rows, and the program's partial sums of the weight (g·x at each tap) and bias
    # (g) gradients
    dw_acc = ()
    for _ in tl.static_range(W):
        dw_acc = dw_acc + (tl.zeros([SUB, BLOCK_P], dtype=tl.float32),)  # noqa: RUF005 (Triton builds tuples so)
    db_acc = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
    for i in range(steps):
        p = p0 + i * BLOCK_P + tl.arange(0, BLOCK_P)
        valid = p < L
        mask = c_ok[:, None] & valid[None, :]
        t, f, m = _coordinates(p, L, fast, mid, st_fast, st_mid, st_slow, rev, dv, MODE)
        acc = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
        if HAS_BIAS:
            acc += bias[:, None]
        xs = ()
        at_p = x_rows[:, None] + p[None, :]
        for j in tl.static_range(W):
            off, ok = _neighbour(p, t, f, m, j - (W - 1), L, fast, mid, st_fast, st_mid, st_slow, rev, MODE)
            xv = tl.load(_tap(at_p, x_rows, off, j - (W - 1), MODE), mask=c_ok[:, None] & (valid & ok)[None, :],
                         other=0.0)  # fmt: skip
            xs = xs + (xv.to(tl.float32),)  # noqa: RUF005 (Triton builds tuples so)
            acc += ws[j][:, None] * xs[j]
        if GRAD:
            g = tl.load(dy_rows[:, None] + p[None, :], mask=mask, other=0.0).to(tl.float32)
            if SILU:
                sig = _sigmoid(acc, FAST)
                g = g * sig * (1.0 + acc * (1.0 - sig))
            tl.store(y_rows[:, None] + p[None, :], g, mask=mask)
            summed = dw_acc
            dw_acc = ()
            for j in tl.static_range(W):
                dw_acc = dw_acc + (summed[j] + g * xs[j],)  # noqa: RUF005 (Triton builds tuples so)
            db_acc += g
        else:
            if SILU:
                acc = acc * _sigmoid(acc, FAST)
            tl.store(y_rows[:, None] + p[None, :], acc, mask=mask)
    if GRAD:
        for j in tl.static_range(W):
            tl.store(dw_part + j, tl.sum(dw_acc[j], axis=1), mask=c_ok)
        if HAS_BIAS:
            tl.store(db_part, tl.sum(db_acc, axis=1), mask=c_ok)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, dy_ptr, dw_ptr, db_ptr, order_ptr, L, CH, K, steps, sx_b, sx_c,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr,
    MODES: tl.constexpr, PRESENT: tl.constexpr, GRAD: tl.constexpr, EVEN_C: tl.constexpr, FAST: tl.constexpr,
):  # fmt: skip
    # One program: SUB channels of batch b, order k, steps × BLOCK_P raster offsets. y, dy: (B, K, C, *S); with
    # GRAD, y receives g and dw, db the (B, K, C, programs along L) partial sums. EVEN_C: SUB divides the channels
    # (no channel mask in the loads and stores); FAST: the GPU's approximate exp and reciprocal for the sigmoid
    bk = tl.program_id(2)
    b = bk // K
    k = bk % K
    ch = tl.program_id(0) * SUB + tl.arange(0, SUB)
    c_ok = _channels_ok(ch, CH, EVEN_C, SUB)
    x_rows = x_ptr + b.to(tl.int64) * sx_b + ch.to(tl.int64) * sx_c
    row = bk.to(tl.int64) * CH + ch.to(tl.int64)
    part = row * tl.num_programs(1) + tl.program_id(1)
    ws, bias = _conv_weights(w_ptr, bias_ptr, k, ch, c_ok, CH, W, HAS_BIAS, SUB)
    fast, mid, st_fast, st_mid, st_slow, rev, dv = _conv_row(order_ptr, k)
    p0 = tl.program_id(1) * steps * BLOCK_P
    args = (x_rows, ws, bias, y_ptr + row * L, dy_ptr + row * L, dw_ptr + part * W, db_ptr + part, p0, steps,
            c_ok, L, fast, mid, st_fast, st_mid, st_slow, rev, dv)  # fmt: skip
    mode = (MODES >> (2 * k)) & 3
    for m in tl.static_range(4):  # only the modes of the call's orders are compiled
        if (PRESENT >> m) & 1:  # noqa: SIM102 (a compile-time switch around a run-time test)
            if mode == m:
                _conv_fwd_tiles(*args, W, HAS_BIAS, SILU, SUB, BLOCK_P, m, GRAD, FAST)


@triton.jit
def _conv_dx_kernel(
    g_ptr, w_ptr, dx_ptr, order_ptr, L, CH, steps,
    K: tl.constexpr, W: tl.constexpr, SUB: tl.constexpr, BLOCK_P: tl.constexpr, MODES: tl.constexpr,
    EVEN_C: tl.constexpr,
):  # fmt: skip
    # The backward's second pass, one program per SUB channels × steps × BLOCK_P offsets of batch b:
    # dx[p] = Σ_k Σ_i w_k[W−1−i]·g_k[t_k(p) + i], the orders summed in registers in turn (deterministic). g (B, K, C,
    # *S) from the first pass; each order's weights, table row and mode are the program's from the start.
    b = tl.program_id(2)
    ch = tl.program_id(0) * SUB + tl.arange(0, SUB)
    c_ok = _channels_ok(ch, CH, EVEN_C, SUB)
    order_rows = ()
    weights = ()
    for k in tl.static_range(K):
        order_rows = order_rows + (_conv_row(order_ptr, k),)  # noqa: RUF005 (Triton builds tuples so)
        ws, _ = _conv_weights(w_ptr, w_ptr, k, ch, c_ok, CH, W, False, SUB)
        weights = weights + (ws,)  # noqa: RUF005 (Triton builds tuples so)
    g_rows = g_ptr + (b.to(tl.int64) * K * CH + ch.to(tl.int64)) * L
    dx_rows = dx_ptr + (b.to(tl.int64) * CH + ch.to(tl.int64)) * L
    p0 = tl.program_id(1) * steps * BLOCK_P
    for i in range(steps):
        p = p0 + i * BLOCK_P + tl.arange(0, BLOCK_P)
        valid = p < L
        dx = tl.zeros([SUB, BLOCK_P], dtype=tl.float32)
        for k in tl.static_range(K):
            fast, mid, st_fast, st_mid, st_slow, rev, dv = order_rows[k]
            t, f, m = _coordinates(p, L, fast, mid, st_fast, st_mid, st_slow, rev, dv, (MODES >> (2 * k)) & 3)
            rows = g_rows + k * CH * L
            at_p = rows[:, None] + p[None, :]
            for j in tl.static_range(W):
                off, ok = _neighbour(p, t, f, m, j, L, fast, mid, st_fast, st_mid, st_slow, rev, (MODES >> (2 * k)) & 3)
                ptrs = _tap(at_p, rows, off, j, (MODES >> (2 * k)) & 3)
                gv = tl.load(ptrs, mask=c_ok[:, None] & (valid & ok)[None, :], other=0.0)
                dx += weights[k][W - 1 - j][:, None] * gv.to(tl.float32)
        tl.store(dx_rows[:, None] + p[None, :], dx, mask=c_ok[:, None] & valid[None, :])


_conv_fwd_launch = Launcher(_conv_fwd_kernel)
_conv_dx_launch = Launcher(_conv_dx_kernel)


def _launch_shape(x: torch.Tensor, K: int, tile) -> tuple[int, int, int, int, int, int, int]:
    # (batch, K, channels, L, channels per program, tiles per program, programs along L)
    batch, channels = x.shape[:2]
    L = x[0, 0].numel()
    sub = min(tile.sub, layout.next_power_of_2(channels))
    steps = max(1, min(tile.steps, layout.cdiv(L, tile.block_p)))
    return batch, K, channels, L, sub, steps, layout.cdiv(L, steps * tile.block_p)


def _fast_math(x: torch.Tensor) -> bool:
    # inline PTX runs on the GPU only; the interpreter (the CPU tests) takes tl.sigmoid
    return x.is_cuda and not layout.interpreted()


def _dx_channels(sub: int, K: int, width: int) -> int:
    """Channels per program of _conv_dx_kernel: at most ``sub``, and K·W·SUB ≤ 48 (a power of two).

    The kernel holds every order's weights and table row from its start: on sm_90a (bf16, the default tile) 154
    registers for SegMamba's three orders at 4 channels, 234 for four orders (106 at 2), 255 and 112 bytes of
    spills for six (235, none, at 2).
    """
    cap = max(1, 48 // (K * width))
    return min(sub, 1 << (cap.bit_length() - 1))


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
        table = layout.division_table(orders, spatial, x.device)
        modes, present = _modes(orders, spatial, weight.shape[-1])
        w = weight.float().contiguous()
        b = bias.float().contiguous() if bias is not None else w
        y = torch.empty(batch, K, channels, *spatial, device=x.device, dtype=x.dtype)
        grid = (layout.cdiv(channels, sub), programs, batch * K)
        _conv_fwd_launch[grid](
            x, w, b, y, y, w, w, table, L, channels, K, steps, x.stride(0), x.stride(1),
            W=weight.shape[-1], HAS_BIAS=bias is not None, SILU=silu, SUB=sub, BLOCK_P=tile.block_p, MODES=modes,
            PRESENT=present, GRAD=False, EVEN_C=channels % sub == 0, FAST=_fast_math(x), num_warps=tile.num_warps,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, bias)
        ctx.orders, ctx.silu = orders, silu
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        """Launch the backward's two passes (g = dy·act'(pre), then x's gradient from g).

        The first pass also sums the weight and bias terms per program; the host sums those partials
        (deterministic).
        """
        x, weight, bias = ctx.saved_tensors
        tile = conv_backward_tile()
        batch, K, channels, L, sub, steps, programs = _launch_shape(x, len(ctx.orders), tile)
        spatial = tuple(x.shape[2:])
        table = layout.division_table(ctx.orders, spatial, x.device)
        modes, present = _modes(ctx.orders, spatial, weight.shape[-1])
        w = weight.float().contiguous()
        b = bias.float().contiguous() if bias is not None else w
        dy = dy.contiguous()
        dx = torch.empty(batch, channels, *spatial, device=x.device, dtype=x.dtype)
        dw = torch.empty(batch, K, channels, programs, weight.shape[-1], device=x.device, dtype=torch.float32)
        db = torch.empty(batch, K, channels, programs, device=x.device, dtype=torch.float32)
        blocks = layout.cdiv(channels, sub)
        g = torch.empty_like(dy)
        _conv_fwd_launch[(blocks, programs, batch * K)](
            x, w, b, g, dy, dw, db, table, L, channels, K, steps, x.stride(0), x.stride(1),
            W=weight.shape[-1], HAS_BIAS=bias is not None, SILU=ctx.silu, SUB=sub, BLOCK_P=tile.block_p,
            MODES=modes, PRESENT=present, GRAD=True, EVEN_C=channels % sub == 0, FAST=_fast_math(x),
            num_warps=tile.num_warps,
        )  # fmt: skip
        sub_dx = _dx_channels(sub, K, weight.shape[-1])
        _conv_dx_launch[(layout.cdiv(channels, sub_dx), programs, batch)](
            g, w, dx, table, L, channels, steps,
            K=K, W=weight.shape[-1], SUB=sub_dx, BLOCK_P=tile.block_p, MODES=modes, EVEN_C=channels % sub_dx == 0,
            num_warps=tile.num_warps,
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
