"""Triton helpers shared by the forward and backward kernels: scan operators, softplus, token addressing."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _linear_combine(a1, x1, a2, x2):
    # (a1, x1) then (a2, x2): h -> a2·(a1·h + x1) + x2. A forward associative_scan along rows held in-thread
    # lowers to a sequential loop without exchanges (unlike a reverse one: see _split8).
    return a1 * a2, a2 * x1 + x2


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


@triton.jit
def _split_cube(y):
    # (S, 2, 2, 2) -> its eight (S,) vectors in the order 4i + 2j + k of y[:, i, j, k]
    k0, k1 = tl.split(y)
    k0j0, k0j1 = tl.split(k0)
    k1j0, k1j1 = tl.split(k1)
    x0, x4 = tl.split(k0j0)
    x2, x6 = tl.split(k0j1)
    x1, x5 = tl.split(k1j0)
    x3, x7 = tl.split(k1j1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _join_cube(x0, x1, x2, x3, x4, x5, x6, x7):
    # The inverse of _split_cube.
    k0 = tl.join(tl.join(x0, x4), tl.join(x2, x6))  # [s, i, j] at k = 0
    k1 = tl.join(tl.join(x1, x5), tl.join(x3, x7))
    return tl.join(k0, k1)


@triton.jit
def _split8(x, S: tl.constexpr):
    # The 8 rows of an (8, S) tile whose rows sit in each thread's registers, as (S,) vectors (register renames,
    # no data movement): lets a recurrence along the rows run one FMA per step. Triton's associative_scan costs
    # more (a reverse one exchanges every step across the warp even though no lane holds another's rows).
    return _split_cube(tl.reshape(tl.permute(x, (1, 0)), (S, 2, 2, 2)))  # [s, i, j, k] = x[4i + 2j + k, s]


@triton.jit
def _join8(x0, x1, x2, x3, x4, x5, x6, x7, S: tl.constexpr):
    # The inverse of _split8: eight (S,) vectors back into an (8, S) tile.
    return tl.permute(tl.reshape(_join_cube(x0, x1, x2, x3, x4, x5, x6, x7), (S, 8)), (1, 0))
