"""Triton helpers shared by the forward and backward kernels: scan operators, softplus, token addressing."""

from __future__ import annotations

import triton
import triton.language as tl

from .ptx import _ld16


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
def _load_tile(rows, lin, tok, base, T: tl.constexpr, VEC: tl.constexpr, neighbours=True, rev=0,
               MIXED: tl.constexpr = False, BOTH_WAYS: tl.constexpr = False):  # fmt: skip
    # The (T, SUB) fp32 tile rows[s] + lin[t] (0 where not tok). VEC: the T tokens are neighbours in memory from
    # `base` on (a multiple of T) and all in range, and each thread's row comes by 16-byte loads, in token order
    # (a reversed order's rows flipped). MIXED: whether they are is decided at run time (neighbours, rev).
    # BOTH_WAYS: they are, and only the direction (rev) is decided at run time.
    if VEC:
        if MIXED:
            if neighbours:
                if rev != 0:
                    x = _vload_tile(rows + base, T, True)
                else:
                    x = _vload_tile(rows + base, T, False)
            else:
                x = tl.load(rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)
        elif BOTH_WAYS:
            if rev != 0:
                x = _vload_tile(rows + base, T, True)
            else:
                x = _vload_tile(rows + base, T, False)
        else:
            x = _vload_tile(rows + base, T, False)
    else:
        x = tl.load(rows[None, :] + lin[:, None], mask=tok, other=0.0).to(tl.float32)
    return x


@triton.jit
def _store_tile(rows, lin, tok, x):
    # The inverse of _load_tile (x cast to the pointee type; plain stores: Triton coalesces them when lin is
    # provably contiguous).
    tl.store(rows[None, :] + lin[:, None], x, mask=tok)


@triton.jit
def _load_row(base, lin, valid, q0, like, T: tl.constexpr, VEC: tl.constexpr, MASKED: tl.constexpr = True):
    # B_n or C_n of a chunk for every lane: the (T,) values base[lin], shaped to broadcast against (T, SUB) tiles
    # ((T, 1), or (T, SUB) under VEC, where every lane loads the same 16-byte words: one transaction). like: any
    # (SUB,) tensor. MASKED: zero where not valid (else the offsets must be in range).
    if VEC:
        x = _vload_tile(base + q0 + tl.zeros_like(like), T)
    elif MASKED:
        x = tl.load(base + lin, mask=valid, other=0.0).to(tl.float32)[:, None]
    else:
        x = tl.load(base + lin).to(tl.float32)[:, None]
    return x


@triton.jit
def _halves(w, ELT: tl.constexpr):
    # The two 16-bit elements of each 32-bit word (the lower address in the low half) as fp32.
    if ELT.is_bf16():
        lo = (w << 16).to(tl.float32, bitcast=True)
        hi = (w & -65536).to(tl.float32, bitcast=True)
    else:
        lo = w.to(tl.int16).to(ELT, bitcast=True).to(tl.float32)
        hi = (w >> 16).to(tl.int16).to(ELT, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _word(lo, hi, ELT: tl.constexpr):
    # Two fp32 values as one 32-bit word of 16-bit ELT elements (lo at the lower address).
    a = lo.to(ELT).to(tl.int16, bitcast=True).to(tl.int32) & 65535
    b = hi.to(ELT).to(tl.int16, bitcast=True).to(tl.int32)
    return a | (b << 16)


@triton.jit
def _vload8(p):
    # 8 consecutive elements at each pointer of p (16-byte aligned), as eight fp32 vectors shaped like p.
    ELT: tl.constexpr = p.dtype.element_ty
    if ELT.primitive_bitwidth == 32:
        a0, a1, a2, a3 = _ld16(p)
        a4, a5, a6, a7 = _ld16(p + 4)
        x0 = a0.to(tl.float32, bitcast=True)
        x1 = a1.to(tl.float32, bitcast=True)
        x2 = a2.to(tl.float32, bitcast=True)
        x3 = a3.to(tl.float32, bitcast=True)
        x4 = a4.to(tl.float32, bitcast=True)
        x5 = a5.to(tl.float32, bitcast=True)
        x6 = a6.to(tl.float32, bitcast=True)
        x7 = a7.to(tl.float32, bitcast=True)
    else:
        w0, w1, w2, w3 = _ld16(p)
        x0, x1 = _halves(w0, ELT)
        x2, x3 = _halves(w1, ELT)
        x4, x5 = _halves(w2, ELT)
        x6, x7 = _halves(w3, ELT)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _vload_tile(p, T: tl.constexpr, REV: tl.constexpr = False):
    # The (T, S) fp32 tile p[s] + t for T = 8 or 16 neighbours per pointer of p (S,), by 16-byte loads (REV, T = 8:
    # row t is p[s] + 7 - t).
    S: tl.constexpr = p.shape[0]
    x0, x1, x2, x3, x4, x5, x6, x7 = _vload8(p)
    if REV:
        lo = _join8(x7, x6, x5, x4, x3, x2, x1, x0, S)
    else:
        lo = _join8(x0, x1, x2, x3, x4, x5, x6, x7, S)
    if T == 8:
        x = lo
    else:
        tl.static_assert(T == 16 and not REV, "tiles of 8 or 16 tokens, 16 only ascending")
        y0, y1, y2, y3, y4, y5, y6, y7 = _vload8(p + 8)
        hi = _join8(y0, y1, y2, y3, y4, y5, y6, y7, S)
        x = tl.reshape(tl.permute(tl.join(lo, hi), (2, 0, 1)), (16, S))  # row 8·j + i
    return x


@triton.jit
def _chunk_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev, VEC: tl.constexpr):
    # Offsets of tokens q of an order; VEC (raster order, full chunks): token q is at offset q.
    if VEC:
        lin = q
    else:
        lin = _token_offsets(q, L, fast, mid, st_fast, st_mid, st_slow, rev)
    return lin


@triton.jit
def _load_delta(
    d_rows, lin, tok, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, q0=0, T: tl.constexpr = 16,
    VEC: tl.constexpr = False, neighbours=True, rev=0, MIXED: tl.constexpr = False, BOTH_WAYS: tl.constexpr = False,
):  # fmt: skip
    # (delta + bias, Δ) of a (T, SUB) tile: Δ = softplus(delta + bias) if asked, 0 on padding tokens (exp(0·A) = 1
    # and Δ·u·B = 0: the scan's identity)
    pre = _load_tile(d_rows, lin, tok, q0, T, VEC, neighbours, rev, MIXED, BOTH_WAYS)
    if HAS_BIAS:
        pre += bias[None, :]
    dt = pre
    if SOFTPLUS:
        dt = _softplus(pre)
    if not VEC:  # padding tokens (VEC has none)
        dt = tl.where(tok, dt, 0.0)
    return pre, dt


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
def _token_of_offset(p, L, fast, mid, st_fast, st_mid, st_slow, rev):
    # Inverse of _token_offsets: the token index of raster offset p in an order. Each axis' coordinate is
    # (p // its natural stride) % its size.
    slow = L // (fast * mid)
    t = (((p // st_slow) % slow) * mid + (p // st_mid) % mid) * fast + (p // st_fast) % fast
    return tl.where(rev != 0, L - 1 - t, t)


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


# fmt: off
@triton.jit
def _forward8(h, a0, a1, a2, a3, a4, a5, a6, a7, x0, x1, x2, x3, x4, x5, x6, x7):
    # The state through a half-chunk's 8 tokens from its start state h, h_t = a_t·h_{t-1} + x_t: one FMA a step
    # (the backward's halves, on per-token values of any shape).
    h0 = a0 * h + x0
    h1 = a1 * h0 + x1
    h2 = a2 * h1 + x2
    h3 = a3 * h2 + x3
    h4 = a4 * h3 + x4
    h5 = a5 * h4 + x5
    h6 = a6 * h5 + x6
    h7 = a7 * h6 + x7
    return h0, h1, h2, h3, h4, h5, h6, h7


@triton.jit
def _adjoint8(rho, a1, a2, a3, a4, a5, a6, a7, v0, v1, v2, v3, v4, v5, v6, v7):
    # The adjoint back through a half, λ_t = v_t + a_{t+1}·λ_{t+1} with v_t = g_t·C_t, from ρ = a·λ of the token
    # after the half.
    l7 = v7 + rho
    l6 = v6 + a7 * l7
    l5 = v5 + a6 * l6
    l4 = v4 + a5 * l5
    l3 = v3 + a4 * l4
    l2 = v2 + a3 * l3
    l1 = v1 + a2 * l2
    l0 = v0 + a1 * l1
    return l0, l1, l2, l3, l4, l5, l6, l7


@triton.jit
def _state_sums8(
    l0, l1, l2, l3, l4, l5, l6, l7, h0, h1, h2, h3, h4, h5, h6, h7, x0, x1, x2, x3, x4, x5, x6, x7,
    b0, b1, b2, b3, b4, b5, b6, b7, t0, t1, t2, t3, t4, t5, t6, t7, A,
    lb0, lb1, lb2, lb3, lb4, lb5, lb6, lb7, la0, la1, la2, la3, la4, la5, la6, la7,
):
    # One state's share of a half's gradients: Σ_n λ·B and Σ_n λ·a·h_{t-1}·A added per token (a_t·h_{t-1} =
    # h_t − x_t), and dA's Σ_t λ·a·h_{t-1}·Δ (t_ = Δ).
    lb0 += l0 * b0
    lb1 += l1 * b1
    lb2 += l2 * b2
    lb3 += l3 * b3
    lb4 += l4 * b4
    lb5 += l5 * b5
    lb6 += l6 * b6
    lb7 += l7 * b7
    e0 = l0 * (h0 - x0)
    e1 = l1 * (h1 - x1)
    e2 = l2 * (h2 - x2)
    e3 = l3 * (h3 - x3)
    e4 = l4 * (h4 - x4)
    e5 = l5 * (h5 - x5)
    e6 = l6 * (h6 - x6)
    e7 = l7 * (h7 - x7)
    la0 += e0 * A
    la1 += e1 * A
    la2 += e2 * A
    la3 += e3 * A
    la4 += e4 * A
    la5 += e5 * A
    la6 += e6 * A
    la7 += e7 * A
    dA = e0 * t0 + e1 * t1 + e2 * t2 + e3 * t3 + e4 * t4 + e5 * t5 + e6 * t6 + e7 * t7
    return lb0, lb1, lb2, lb3, lb4, lb5, lb6, lb7, la0, la1, la2, la3, la4, la5, la6, la7, dA
# fmt: on
