"""Triton helpers shared by the forward and backward kernels: scan operators, softplus, token addressing."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _linear_combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2·(a1·h + x1) + x2
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _adjoint_combine(q_right, f_right, v_right, q_left, f_left, v_left):
    # Suffix summaries of λ_t = g_t·C_t + a_{t+1}·λ_{t+1}: (Q = Π a over the segment after its first token,
    # F = a of its first token, V = λ at its first token from the segment alone). A reverse associative_scan
    # calls combine(later, earlier); the result is earlier ∘ later.
    glue = q_left * f_right
    return glue * q_right, f_left, v_left + glue * v_right


@triton.jit
def _softplus(x):
    # torch.nn.functional.softplus with its threshold of 20
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def _load_delta(d_rows, lin, tok, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    # (delta + bias, Δ) of a (T, SUB) tile: Δ = softplus(delta + bias) if asked, 0 on padding tokens (exp(0·A) = 1
    # and Δ·u·B = 0: the scan's identity)
    pre = tl.load(d_rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        pre += bias[None, :]
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    return pre, tl.where(tok, dt, 0.0)


@triton.jit
def _order_row(order_ptr, k):
    row = order_ptr + k * 6
    return (
        tl.load(row),
        tl.load(row + 1),
        tl.load(row + 2),
        tl.load(row + 3),
        tl.load(row + 4),
        tl.load(row + 5),
    )


@triton.jit
def _token_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev):
    # Raster offset of the q-th token of an order (layout.py explains the arithmetic); q ≥ L is clamped, the
    # caller masks it.
    q = tl.minimum(q, L - 1)
    p = tl.where(rev != 0, L - 1 - q, q)
    i_fast = p % fast
    r = p // fast
    return (r // mid) * st_slow + (r % mid) * st_mid + i_fast * st_fast
