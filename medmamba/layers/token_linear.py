"""Linears applied to every token of a channels-first map, with the weight gradient summed in pieces.

``MambaLayer``'s four linears run on ``(B, C, L)`` maps (in_proj, out_proj: one weight for the batch) or on
``(B, K, C, L)`` stacks of scan orders (x_proj, dt_proj: a weight per order). Forward and input gradient are
batched GEMMs on the maps as they lie (no transposed copy). The weight gradient is a product whose inner dimension is
every token of every batch element: ``(C_out, B·L) × (B·L, C_in)`` with C of 8-192 and L up to 262,144, on which
cuBLAS picks skinny kernels that walk all of L per output tile (H200: 0.35 ms for 125 MB that take 0.03 ms to read).
Here L is cut into pieces of :data:`PIECE` tokens, one batched GEMM with an fp32 result per batch element over strided
views of the pieces, and the pieces' products are summed in a fixed order (deterministic). With this module the
SegMamba mixer pair's training step went 38.5 → 35.2 ms on one H200 (``benchmarks/RESULTS.md``, twenty-third pass).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["channel_linear", "order_projections"]

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


def order_projections(
    u: torch.Tensor, x_proj_weight: torch.Tensor, dt_proj_weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mamba's x_proj then dt_proj per order, as one autograd node: ``(u, delta, B, C)``.

    u ``(B, K, I, L)`` (the conv's output), ``x_proj_weight`` ``(K, R + 2N, I)``, ``dt_proj_weight`` ``(K, I, R)``
    → u itself (an alias, for the scan), Δ before its bias ``(B, K, I, L)``, and B, C ``(B, K, N, L)`` (views of
    x_proj's output). Apart, autograd would materialise x_proj's output gradient twice (the dt rows' and B/C's, each
    zero-padded to all rows) and add them, then add x_proj's input gradient to the scan's: about 2.3 GB of traffic
    per SegMamba 64³ layer. Here the rows' gradients are written once into one buffer, and x_proj's input gradient
    is accumulated into the scan's in its GEMM (``baddbmm_``, on the gradient buffer autograd hands over, which
    nothing else holds: u's alias goes only to the scan).

    dt_proj's inner dimension R is 3 at d_model 48: its weight is zero-padded to the next multiple of 8 columns
    (as many rows of x_proj's output, the extra rows B's times zero) so cuBLAS takes aligned kernels; an unaligned
    weight gradient took 5.7 ms per 64³ layer on an H100.
    """
    u, _ = _autocast(u, x_proj_weight)
    x_proj_weight, dt_proj_weight = x_proj_weight.to(u.dtype), dt_proj_weight.to(u.dtype)
    with torch.autocast(u.device.type, enabled=False):
        return _OrderProjections.apply(u, x_proj_weight, dt_proj_weight)


class _OrderProjections(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, x_weight, dt_weight):  # type: ignore[override]
        R, O = dt_weight.shape[-1], x_weight.shape[-2]
        N = (O - R) // 2
        padded = min(-(-R // 8) * 8, O)
        dt_padded = torch.nn.functional.pad(dt_weight, (0, padded - R)) if padded != R else dt_weight
        x_dbl = torch.matmul(x_weight, u)  # (B, K, R + 2N, L)
        delta = torch.matmul(dt_padded, x_dbl[:, :, :padded])
        ctx.save_for_backward(u, x_dbl, x_weight, dt_padded)
        ctx.rank = R
        ctx.set_materialize_grads(False)
        return u, delta, x_dbl[:, :, R : R + N], x_dbl[:, :, R + N :]

    @staticmethod
    def backward(ctx, g_u, g_delta, g_B, g_C):  # type: ignore[override]
        u, x_dbl, x_weight, dt_padded = ctx.saved_tensors
        R, (Bn, K, I, L), O, P = ctx.rank, u.shape, x_dbl.shape[2], dt_padded.shape[-1]
        N = (O - R) // 2
        g_x = _rows_buffer(g_B, g_C, x_dbl, R)
        if g_x is None:
            g_x = torch.empty_like(x_dbl)
            for rows, g in ((slice(R, R + N), g_B), (slice(R + N, O), g_C)):
                if g is None:
                    g_x[:, :, rows].zero_()
                else:
                    g_x[:, :, rows].copy_(g)
        dt_grad = None
        if g_delta is None:
            g_x[:, :, :R].zero_()
        else:
            g_delta = g_delta.contiguous()
            # Δ's input gradient; the padded columns' rows are exact zeros, so only the first R rows are kept
            d_in = torch.bmm(_transposed_rows(dt_padded, Bn), g_delta.view(Bn * K, I, L)).view(Bn, K, P, L)
            g_x[:, :, :R].copy_(d_in[:, :, :R])
            if ctx.needs_input_grad[2]:
                dt_grad = _weight_grads([(g_delta[:, k], x_dbl[:, k, :P]) for k in range(K)])
                dt_grad = dt_grad[..., :R].to(dt_padded.dtype)
        du = None
        if ctx.needs_input_grad[0]:
            rows = _transposed_rows(x_weight, Bn)
            if g_u is not None and g_u.is_contiguous():
                du = g_u.view(-1, I, L).baddbmm_(rows, g_x.view(-1, O, L)).view(u.shape)
            else:
                du = torch.bmm(rows, g_x.view(-1, O, L)).view(u.shape)
                du = du if g_u is None else du + g_u
        x_grad = None
        if ctx.needs_input_grad[1]:
            x_grad = _weight_grads([(g_x[:, k], u[:, k]) for k in range(K)]).to(x_weight.dtype)
        return du, x_grad, dt_grad


def _rows_buffer(g_B, g_C, x_dbl: torch.Tensor, R: int) -> torch.Tensor | None:
    """x_proj's output gradient as the buffer that B's and C's gradients already sit in, or ``None``.

    The Triton scan hands back dB and dC as views of one new buffer laid out as x_dbl (its ``_sibling_rows``): when
    they are exactly x_dbl's B and C rows of one such buffer, that buffer is x_dbl's gradient once its first R rows
    (Δ's) are written, and B's and C's rows need no copy (0.2 ms per SegMamba mixer-pair step on an H200).
    """
    if g_B is None or g_C is None or g_B.dtype != x_dbl.dtype or g_C.dtype != x_dbl.dtype:
        return None
    L = x_dbl.shape[-1]
    N = g_B.shape[2]
    start = g_B.storage_offset() - R * L
    storage = g_B.untyped_storage()
    if (
        start != 0
        or storage.data_ptr() != g_C.untyped_storage().data_ptr()
        or storage.nbytes() != x_dbl.numel() * x_dbl.element_size()
        or g_C.storage_offset() != (R + N) * L
        or g_B.stride() != x_dbl.stride()
        or g_C.stride() != x_dbl.stride()
    ):
        return None
    return g_B.as_strided(x_dbl.shape, x_dbl.stride(), 0)


def _transposed_rows(weight: torch.Tensor, batch: int) -> torch.Tensor:
    """``weightᵀ`` per (batch, order) row, for weight ``(O, I)`` or ``(K, O, I)`` → ``(batch·K, I, O)``.

    A transposed view of a contiguous ``(batch·K, O, I)`` copy: cuBLAS takes it as a transposed operand with leading
    dimension I. The view of the transposed weight itself (leading dimension O, unaligned for x_proj's 35 rows) sent
    it to an align-1 kernel 2.8× slower.
    """
    return weight.expand(batch, *weight.shape).reshape(-1, *weight.shape[-2:]).transpose(1, 2)


def _autocast(x: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float64:  # autocast leaves float64 alone
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    return x, weight


class _TokenLinear(torch.autograd.Function):
    """``weight @ x`` per batch element, its weight gradient from :func:`_weight_grad`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        # one batched GEMM against the weight broadcast over the batch (stride 0): torch.matmul would fold the batch
        # into one GEMM through transposed copies of x and of the output
        return torch.bmm(weight.expand(x.shape[0], -1, -1), x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        dx = torch.bmm(_transposed_rows(weight, x.shape[0]), g) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(g, x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw


def _weight_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Σ over batch rows and tokens of ``g xᵀ`` for g ``(B, O, L)``, x ``(B, I, L)`` → ``(O, I)``.

    Summed in fp32 (float64 stays float64), over pieces of :data:`PIECE` tokens from two pieces on.
    """
    return _weight_grads([(g, x)])[0]


def _weight_grads(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """:func:`_weight_grad` of each ``(g, x)`` pair (all of one shape), stacked: ``(len(pairs), O, I)``.

    Every product (per pair, batch row and piece, and each row's tail after its whole pieces) is written into one
    buffer by a GEMM of its own, and one reduction sums them in a fixed order. Summed per row and added up, the
    launches were several times as many: a SegMamba 64³ layer's eight weight gradients took ~60 small launches, and
    in the backward the GPU waited for the host launching them (torch.profiler on an H200).
    """
    g0, x0 = pairs[0]
    (B, O, L), I = g0.shape, x0.shape[1]
    acc = torch.promote_types(x0.dtype, torch.float32)
    if L < 2 * PIECE:
        return torch.stack([_product(g, x.transpose(1, 2), acc).sum(0) for g, x in pairs])
    pieces = L // PIECE
    tail = L - pieces * PIECE
    slots = pieces + (1 if tail else 0)
    prods = torch.empty(len(pairs), B, slots, O, I, device=x0.device, dtype=acc)
    for j, (g, x) in enumerate(pairs):
        for r in range(B):
            gs = g[r].unfold(1, PIECE, PIECE).transpose(0, 1)  # (pieces, O, PIECE), strided view
            xs = x[r].unfold(1, PIECE, PIECE).permute(1, 2, 0)  # (pieces, PIECE, I)
            _product(gs, xs, acc, out=prods[j, r, :pieces])
            if tail:  # the tokens after the last whole piece
                _product(g[r, None, :, pieces * PIECE :], x[r, None, :, pieces * PIECE :].transpose(1, 2), acc,
                         out=prods[j, r, pieces:])  # fmt: skip
    return prods.sum((1, 2))


def _product(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    # a @ b batched, result in acc (into out when given)
    if a.dtype == acc:
        return torch.bmm(a, b, out=out)
    if a.is_cuda:  # half inputs, fp32 accumulation and result in the GEMM itself
        return torch.bmm(a, b, out_dtype=acc, out=out)
    return torch.bmm(a.to(acc), b.to(acc), out=out)
