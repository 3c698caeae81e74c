"""Linears applied to every token of a channels-first map, with the weight gradient summed in pieces.

``MambaLayer``'s four linears run on ``(B, C, L)`` maps (in_proj, out_proj: one weight for the batch) or on
``(B, K, C, L)`` stacks of scan orders (x_proj, dt_proj: a weight per order). Forward and input gradient are
batched GEMMs on the maps as they lie (no transposed copy). The weight gradient is a product whose inner dimension is
every token of every batch element: ``(C_out, B·L) × (B·L, C_in)`` with C of 8-192 and L up to 262,144, on which
cuBLAS picks skinny kernels that walk all of L per output tile (H200: 0.35 ms for 125 MB that take 0.03 ms to read).
Here L is cut into pieces of :data:`PIECE` tokens, one batched GEMM with an fp32 result per batch element over strided
views of the pieces, and the pieces' products are summed in a fixed order (deterministic): the SegMamba mixer
pair's training step went 37.7 → 35.8 ms on an H200 (``benchmarks/RESULTS.md``, twenty-third pass).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["channel_linear", "order_linear"]

PIECE = 4096
"""Tokens per piece of the weight gradient's sum; sequences shorter than two pieces take one plain product."""


def channel_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear`` on every token of ``x`` ``(B, C_in, L)`` → ``(B, C_out, L)`` (in_proj, out_proj).

    Under autocast the product runs in the autocast dtype, as ``nn.Linear``'s does.
    """
    x, weight = _autocast(x, linear.weight)
    with torch.autocast(x.device.type, enabled=False):
        out = _TokenLinear.apply(x, weight)
    return out if linear.bias is None else out + linear.bias.to(out.dtype)[:, None]


def order_linear(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each order's ``weight`` ``(K, C_out, C_in)`` on every token of ``x`` ``(B, K, C_in, L)`` → ``(B, K, C_out, L)``.

    Used by x_proj and dt_proj; ``x`` may be a slice of rows of a contiguous stack (dt_proj's first rows of
    x_proj's output).
    """
    x, weight = _autocast(x, weight)
    with torch.autocast(x.device.type, enabled=False):
        return _TokenLinear.apply(x, weight)


def _autocast(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:  # autocast leaves float64 alone
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    return x, weight


class _TokenLinear(torch.autograd.Function):
    """``weight @ x`` per batch element (and per order when the weight is ``(K, O, I)``).

    Its weight gradient comes from :func:`_weight_grad`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        if weight.dim() == 2:  # one batched GEMM against the weight broadcast over the batch (stride 0)
            return torch.bmm(weight.expand(x.shape[0], -1, -1), x)
        # the (B, K) axes of x (or of its row slice) merge into one batch stride: no copy of x
        return torch.matmul(weight, x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        B, O, I = x.shape[0], weight.shape[-2], weight.shape[-1]
        # the weight per batch row as a transposed view of a contiguous (rows, O, I) copy: cuBLAS takes it as a
        # transposed operand with leading dimension I; the view of the transposed weight itself (leading dimension
        # O, unaligned for x_proj's 35 rows) sent it to an align-1 kernel 2.8× slower
        rows = weight.expand(B, *weight.shape).reshape(-1, O, I)
        dx = torch.bmm(rows.transpose(1, 2), g.reshape(rows.shape[0], O, -1)).view(x.shape)
        if weight.dim() == 2:
            dw = _weight_grad(g, x)
        else:
            dw = torch.stack([_weight_grad(g[:, k], x[:, k]) for k in range(weight.shape[0])])
        return dx, dw.to(weight.dtype)


def _weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ over batch rows and tokens of ``g xᵀ`` for g ``(B, O, L)``, x ``(B, I, L)`` → ``(O, I)``.

    Summed in fp32 (float64 stays float64), over pieces of :data:`PIECE` tokens from two pieces on.
    """
    L = x.shape[-1]
    acc = torch.promote_types(x.dtype, torch.float32)
    if L < 2 * PIECE:
        return _product(g, x.transpose(1, 2), acc).sum(0)
    pieces = L // PIECE
    dw = torch.zeros(g.shape[1], x.shape[1], device=x.device, dtype=acc)
    for r in range(x.shape[0]):
        gs = g[r].unfold(1, PIECE, PIECE).transpose(0, 1)  # (pieces, O, PIECE), strided view
        xs = x[r].unfold(1, PIECE, PIECE).permute(1, 2, 0)  # (pieces, PIECE, I)
        dw += _product(gs, xs, acc).sum(0)
        if pieces * PIECE < L:  # the tokens after the last whole piece
            dw += _product(g[r, None, :, pieces * PIECE :], x[r, None, :, pieces * PIECE :].transpose(1, 2), acc)[0]
    return dw


def _product(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    if a.dtype == acc:
        return torch.bmm(a, b)
    if a.is_cuda:  # half inputs, fp32 accumulation and result in the GEMM itself
        return torch.bmm(a, b, out_dtype=acc)
    return torch.bmm(a.to(acc), b.to(acc))
