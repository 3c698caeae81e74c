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
from .common import _order_row, _token_offsets

__all__ = ["causal_conv"]

_BLOCK_T = 64


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, order_ptr, L, CH, K, sx_b, sx_k, sx_c,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    bk = tl.program_id(2)
    b = (bk // K).to(tl.int64)
    k = bk % K
    fast, mid, st_fast, st_mid, st_slow, rev = _order_row(order_ptr, k)
    ch = tl.program_id(0) * SUB + tl.arange(0, SUB)
    c_ok = ch < CH
    q = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = q < L
    x_rows = x_ptr + b * sx_b + k * sx_k + ch.to(tl.int64) * sx_c
    acc = tl.zeros([BLOCK_T, SUB], dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + k * CH + ch, mask=c_ok, other=0.0)[None, :]
    for j in tl.static_range(W):
        qj = q - (W - 1) + j
        ok = valid & (qj >= 0)
        lin_j = _token_offsets(tl.maximum(qj, 0), L, fast, mid, st_fast, st_mid, st_slow, rev)
        xv = tl.load(x_rows[None, :] + lin_j[:, None], mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + (k * CH + ch) * W + j, mask=c_ok, other=0.0)[None, :] * xv
    if SILU:
        acc = acc * tl.sigmoid(acc)
    lin = _token_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev)
    rows = (bk * CH + ch.to(tl.int64)) * L
    tl.store(y_ptr + rows[None, :] + lin[:, None], acc, mask=valid[:, None] & c_ok[None, :])


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, dy_ptr, dx_ptr, dw_ptr, db_ptr, order_ptr, L, CH, K, ntiles, sx_b, sx_k, sx_c,
    W: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, SUB: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    # dx[t] = Σ_m w[W−1−m]·g[t+m] with g = dy·act'(pre) recomputed at t..t+W−1; dw and dbias per tile
    bk = tl.program_id(2)
    b = (bk // K).to(tl.int64)
    k = bk % K
    fast, mid, st_fast, st_mid, st_slow, rev = _order_row(order_ptr, k)
    tile = tl.program_id(1)
    ch = tl.program_id(0) * SUB + tl.arange(0, SUB)
    c_ok = ch < CH
    q = tile * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = q < L
    x_rows = x_ptr + b * sx_b + k * sx_k + ch.to(tl.int64) * sx_c
    rows = (bk * CH + ch.to(tl.int64)) * L  # dy, dx: (B, K, C, L) contiguous
    part = (bk * CH + ch.to(tl.int64)) * ntiles + tile
    if HAS_BIAS:
        bias = tl.load(bias_ptr + k * CH + ch, mask=c_ok, other=0.0)
    dx = tl.zeros([BLOCK_T, SUB], dtype=tl.float32)
    for m in tl.static_range(W):
        qm = q + m
        okm = valid & (qm < L)
        pre = tl.zeros([BLOCK_T, SUB], dtype=tl.float32)
        if HAS_BIAS:
            pre += bias[None, :]
        for j in tl.static_range(W):
            qmj = qm - (W - 1) + j
            ok = okm & (qmj >= 0)
            lin_j = _token_offsets(tl.maximum(qmj, 0), L, fast, mid, st_fast, st_mid, st_slow, rev)
            xv = tl.load(x_rows[None, :] + lin_j[:, None], mask=ok[:, None] & c_ok[None, :], other=0.0)
            pre += tl.load(w_ptr + (k * CH + ch) * W + j, mask=c_ok, other=0.0)[None, :] * xv.to(tl.float32)
        lin_m = _token_offsets(qm, L, fast, mid, st_fast, st_mid, st_slow, rev)
        g = tl.load(dy_ptr + rows[None, :] + lin_m[:, None], mask=okm[:, None] & c_ok[None, :], other=0.0)
        g = g.to(tl.float32)
        if SILU:
            sig = tl.sigmoid(pre)
            g = g * sig * (1.0 + pre * (1.0 - sig))
        g = tl.where(okm[:, None], g, 0.0)
        dx += tl.load(w_ptr + (k * CH + ch) * W + (W - 1 - m), mask=c_ok, other=0.0)[None, :] * g
        if m == 0:  # this tile's own tokens: weight and bias gradients
            for j in tl.static_range(W):
                qj = q - (W - 1) + j
                ok = valid & (qj >= 0)
                lin_j = _token_offsets(tl.maximum(qj, 0), L, fast, mid, st_fast, st_mid, st_slow, rev)
                xv = tl.load(x_rows[None, :] + lin_j[:, None], mask=ok[:, None] & c_ok[None, :], other=0.0)
                tl.store(dw_ptr + part * W + j, tl.sum(g * xv.to(tl.float32), axis=0), mask=c_ok)
            if HAS_BIAS:
                tl.store(db_ptr + part, tl.sum(g, axis=0), mask=c_ok)
    lin = _token_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev)
    tl.store(dx_ptr + rows[None, :] + lin[:, None], dx, mask=valid[:, None] & c_ok[None, :])


def _launch_shape(x4: torch.Tensor) -> tuple[int, int, int, int, int]:
    batch, K, channels = x4.shape[:3]
    L = x4[0, 0, 0].numel()
    sub = min(32, layout.next_power_of_2(channels))
    return batch, K, channels, L, sub


class _CausalConv(torch.autograd.Function):
    """``y = causal_conv(x4, weight, bias)``; x4 ``(B, K, C, *S)`` (a stride-0 expand over K when shared).

    Saved for backward: x4, weight, bias (the pre-activation is recomputed).
    """

    @staticmethod
    def forward(ctx, x4, weight, bias, orders, silu):  # type: ignore[override]
        """Launch the forward kernel."""
        batch, K, channels, L, sub = _launch_shape(x4)
        spatial = tuple(x4.shape[3:])
        table = layout.order_table(orders, spatial, x4.device)
        w = weight.float().contiguous()
        b = bias.float().contiguous() if bias is not None else w
        y = torch.empty(batch, K, channels, *spatial, device=x4.device, dtype=x4.dtype)
        grid = (layout.cdiv(channels, sub), layout.cdiv(L, _BLOCK_T), batch * K)
        _conv_fwd_kernel[grid](
            x4, w, b, y, table, L, channels, K, x4.stride(0), x4.stride(1), x4.stride(2),
            W=weight.shape[-1], HAS_BIAS=bias is not None, SILU=silu, SUB=sub, BLOCK_T=_BLOCK_T, num_warps=4,
        )  # fmt: skip
        ctx.save_for_backward(x4, weight, bias)
        ctx.orders, ctx.silu = orders, silu
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        """Launch the backward kernel; weight/bias gradients are summed on the host (deterministic)."""
        x4, weight, bias = ctx.saved_tensors
        batch, K, channels, L, sub = _launch_shape(x4)
        spatial = tuple(x4.shape[3:])
        table = layout.order_table(ctx.orders, spatial, x4.device)
        w = weight.float().contiguous()
        b = bias.float().contiguous() if bias is not None else w
        dy = dy.contiguous()
        ntiles = layout.cdiv(L, _BLOCK_T)
        dx = torch.empty(batch, K, channels, *spatial, device=x4.device, dtype=x4.dtype)
        dw = torch.empty(batch, K, channels, ntiles, weight.shape[-1], device=x4.device, dtype=torch.float32)
        db = torch.empty(batch, K, channels, ntiles, device=x4.device, dtype=torch.float32)
        grid = (layout.cdiv(channels, sub), ntiles, batch * K)
        _conv_bwd_kernel[grid](
            x4, w, b, dy, dx, dw, db, table, L, channels, K, ntiles, x4.stride(0), x4.stride(1), x4.stride(2),
            W=weight.shape[-1], HAS_BIAS=bias is not None, SILU=ctx.silu, SUB=sub, BLOCK_T=_BLOCK_T, num_warps=4,
        )  # fmt: skip
        d_bias = db.sum(dim=(0, 3)).to(bias.dtype) if bias is not None else None
        return dx, dw.sum(dim=(0, 3)).to(weight.dtype), d_bias, None, None


def causal_conv(
    x4: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    orders: Sequence[ScanOrder],
    silu: bool,
) -> torch.Tensor:
    """Order-aware causal depthwise convolution over canonical shapes (see medmamba.kernels.causal_conv).

    ``x4`` ``(B, K, C, *S)`` (possibly a stride-0 expand over K), ``weight`` ``(K, C, W)``, ``bias`` ``(K, C)``;
    returns ``(B, K, C, *S)`` in the dtype of ``x4`` (sums in fp32).
    """
    x4 = layout.natural_spatial(x4, x4.ndim - 3)
    layout.spatial3(x4.shape[3:])
    return _CausalConv.apply(x4, weight, bias, tuple(orders), silu)
