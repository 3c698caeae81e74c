"""LayerNorm over the channel axis of a channels-first map (Triton): one pass forward, one backward.

A program holds every channel of BLOCK neighbouring voxels, voxels fastest across its threads (coalesced rows),
and reduces over the channels in registers. The backward saves nothing but the per-voxel mean and 1/std; the
weight and bias gradients are summed per program and then on the host (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import layout
from .launch import Launcher

__all__ = ["channel_layer_norm"]


@triton.jit
def _norm_fwd_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, L, CH, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < CH
    v = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    v_ok = v < L
    rows = (b * CH + c.to(tl.int64)) * L
    mask = c_ok[:, None] & v_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] + v[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / CH
    xc = tl.where(mask, x - mean[None, :], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / CH + eps)
    y = xc * rstd[None, :]
    if HAS_W:
        y = y * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_B:
        y = y + tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    tl.store(y_ptr + rows[:, None] + v[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + b * L + v, mean, mask=v_ok)
    tl.store(rstd_ptr + b * L + v, rstd, mask=v_ok)


@triton.jit
def _norm_bwd_kernel(
    x_ptr, w_ptr, dy_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, L, CH, ntiles,
    HAS_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    # dx = rstd·(ĝ − mean_c ĝ − x̂·mean_c(ĝ·x̂)) with ĝ = dy·w; per-program partial sums of dy·x̂ and dy
    b = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    c = tl.arange(0, BLOCK_C)
    c_ok = c < CH
    v = tile * BLOCK + tl.arange(0, BLOCK)
    v_ok = v < L
    rows = (b * CH + c.to(tl.int64)) * L
    mask = c_ok[:, None] & v_ok[None, :]
    x = tl.load(x_ptr + rows[:, None] + v[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + rows[:, None] + v[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + b * L + v, mask=v_ok, other=0.0)
    rstd = tl.load(rstd_ptr + b * L + v, mask=v_ok, other=0.0)
    xhat = tl.where(mask, (x - mean[None, :]) * rstd[None, :], 0.0)
    g = dy
    if HAS_W:
        g = dy * tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    c1 = tl.sum(g * xhat, axis=0) / CH
    c2 = tl.sum(g, axis=0) / CH
    dx = (g - xhat * c1[None, :] - c2[None, :]) * rstd[None, :]
    tl.store(dx_ptr + rows[:, None] + v[None, :], dx, mask=mask)
    part = (b * ntiles + tile) * CH + c
    tl.store(dw_ptr + part, tl.sum(dy * xhat, axis=1), mask=c_ok)
    tl.store(db_ptr + part, tl.sum(dy, axis=1), mask=c_ok)


_norm_fwd_launch = Launcher(_norm_fwd_kernel)
_norm_bwd_launch = Launcher(_norm_bwd_kernel)


def _blocks(channels: int, L: int) -> tuple[int, int]:
    block_c = layout.next_power_of_2(channels)
    return block_c, max(16, min(256, 4096 // block_c, layout.next_power_of_2(L)))


class _ChannelLayerNorm(torch.autograd.Function):
    """``y = channel_layer_norm(x, weight, bias)``; saved for backward: x, weight, the per-voxel mean and 1/std."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):  # type: ignore[override]
        """Launch the forward kernel."""
        flat = x.reshape(x.shape[0], x.shape[1], -1).contiguous()
        batch, channels, L = flat.shape
        block_c, block = _blocks(channels, L)
        out_dtype = torch.promote_types(x.dtype, torch.float32) if out_dtype is None else out_dtype
        y = torch.empty(flat.shape, device=x.device, dtype=out_dtype)
        mean = torch.empty(batch, L, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _norm_fwd_launch[(batch, layout.cdiv(L, block))](
            flat, weight if weight is not None else flat, bias if bias is not None else flat, y, mean, rstd,
            L, channels, eps, HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_C=block_c, BLOCK=block,
            num_warps=4,
        )  # fmt: skip
        ctx.save_for_backward(flat, weight, mean, rstd)
        ctx.shape, ctx.bias_dtype = x.shape, bias.dtype if bias is not None else None
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        """Launch the backward kernel; weight and bias gradients are summed on the host."""
        flat, weight, mean, rstd = ctx.saved_tensors
        batch, channels, L = flat.shape
        block_c, block = _blocks(channels, L)
        ntiles = layout.cdiv(L, block)
        dy = dy.reshape(flat.shape).contiguous()
        dx = torch.empty(flat.shape, device=flat.device, dtype=flat.dtype)
        dw = torch.empty(batch, ntiles, channels, device=flat.device, dtype=torch.float32)
        db = torch.empty_like(dw)
        _norm_bwd_launch[(batch, ntiles)](
            flat, weight if weight is not None else flat, dy, mean, rstd, dx, dw, db, L, channels, ntiles,
            HAS_W=weight is not None, BLOCK_C=block_c, BLOCK=block, num_warps=4,
        )  # fmt: skip
        d_weight = dw.sum(dim=(0, 1)).to(weight.dtype) if weight is not None else None
        d_bias = db.sum(dim=(0, 1)).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        return dx.view(ctx.shape), d_weight, d_bias, None, None


def channel_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm over axis 1 of ``x`` ``(B, C, *S)``, output in ``out_dtype`` (kernels/norm.py documents it)."""
    return _ChannelLayerNorm.apply(x, weight, bias, float(eps), out_dtype)
