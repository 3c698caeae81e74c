"""The per-token paths for raster calls (PassConfig.ptx on a CUDA device; see forward._fwd_kernel).

A chunk's 16 tokens are held as 16 per-channel vectors (one element per thread) straight from 16-byte loads
(ptx._ld16), so no tile is formed and Triton never has to pick a layout for one: every value is elementwise over
the channels. The recurrence then runs token by token, one exp and three FMAs per token and state. Written out
for 16 tokens (Triton has no per-token arrays); the plain-Triton tile path in forward.py is its twin.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _softplus, _token_offsets, _vload8, _word
from .ptx import _ld1, _st1, _st16


@triton.jit
def _load16(p):
    # The 16 elements at each pointer of p (16-byte aligned), as 16 fp32 vectors shaped like p.
    x0, x1, x2, x3, x4, x5, x6, x7 = _vload8(p)
    x8, x9, x10, x11, x12, x13, x14, x15 = _vload8(p + 8)
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


@triton.jit
def _store16(p, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15):
    # The inverse of _load16 (values cast to the pointee type).
    ELT: tl.constexpr = p.dtype.element_ty
    if ELT.primitive_bitwidth == 32:
        _st16(p, x0.to(tl.int32, bitcast=True), x1.to(tl.int32, bitcast=True), x2.to(tl.int32, bitcast=True),
              x3.to(tl.int32, bitcast=True))  # fmt: skip
        _st16(p + 4, x4.to(tl.int32, bitcast=True), x5.to(tl.int32, bitcast=True), x6.to(tl.int32, bitcast=True),
              x7.to(tl.int32, bitcast=True))  # fmt: skip
        _st16(p + 8, x8.to(tl.int32, bitcast=True), x9.to(tl.int32, bitcast=True), x10.to(tl.int32, bitcast=True),
              x11.to(tl.int32, bitcast=True))  # fmt: skip
        _st16(p + 12, x12.to(tl.int32, bitcast=True), x13.to(tl.int32, bitcast=True),
              x14.to(tl.int32, bitcast=True), x15.to(tl.int32, bitcast=True))  # fmt: skip
    else:
        _st16(p, _word(x0, x1, ELT), _word(x2, x3, ELT), _word(x4, x5, ELT), _word(x6, x7, ELT))
        _st16(p + 8, _word(x8, x9, ELT), _word(x10, x11, ELT), _word(x12, x13, ELT), _word(x14, x15, ELT))


@triton.jit
def _delta(r, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    if HAS_BIAS:
        r = r + bias
    if SOFTPLUS:
        r = _softplus(r)
    return r


@triton.jit
def _gate(y, z):
    return y * z * tl.sigmoid(z)


@triton.jit
def _steps16(
    h,
    A,
    d0,
    d1,
    d2,
    d3,
    d4,
    d5,
    d6,
    d7,
    d8,
    d9,
    d10,
    d11,
    d12,
    d13,
    d14,
    d15,
    x0,
    x1,
    x2,
    x3,
    x4,
    x5,
    x6,
    x7,
    x8,
    x9,
    x10,
    x11,
    x12,
    x13,
    x14,
    x15,
    b0,
    b1,
    b2,
    b3,
    b4,
    b5,
    b6,
    b7,
    b8,
    b9,
    b10,
    b11,
    b12,
    b13,
    b14,
    b15,
    c0,
    c1,
    c2,
    c3,
    c4,
    c5,
    c6,
    c7,
    c8,
    c9,
    c10,
    c11,
    c12,
    c13,
    c14,
    c15,
    y0,
    y1,
    y2,
    y3,
    y4,
    y5,
    y6,
    y7,
    y8,
    y9,
    y10,
    y11,
    y12,
    y13,
    y14,
    y15,
    mid_ptrs,
    SAVE_MID: tl.constexpr,
):
    # One state through the chunk: h_t = exp2(Δ_t·A)·h_(t-1) + x_t·B_t, y_t += C_t·h_t (A pre-scaled by log2 e).
    # SAVE_MID: the state after the chunk's 8th token is stored at mid_ptrs (PassConfig.mid_states).
    h = tl.exp2(d0 * A) * h + x0 * b0
    y0 += c0 * h
    h = tl.exp2(d1 * A) * h + x1 * b1
    y1 += c1 * h
    h = tl.exp2(d2 * A) * h + x2 * b2
    y2 += c2 * h
    h = tl.exp2(d3 * A) * h + x3 * b3
    y3 += c3 * h
    h = tl.exp2(d4 * A) * h + x4 * b4
    y4 += c4 * h
    h = tl.exp2(d5 * A) * h + x5 * b5
    y5 += c5 * h
    h = tl.exp2(d6 * A) * h + x6 * b6
    y6 += c6 * h
    h = tl.exp2(d7 * A) * h + x7 * b7
    y7 += c7 * h
    if SAVE_MID:
        _st1(mid_ptrs, h)
    h = tl.exp2(d8 * A) * h + x8 * b8
    y8 += c8 * h
    h = tl.exp2(d9 * A) * h + x9 * b9
    y9 += c9 * h
    h = tl.exp2(d10 * A) * h + x10 * b10
    y10 += c10 * h
    h = tl.exp2(d11 * A) * h + x11 * b11
    y11 += c11 * h
    h = tl.exp2(d12 * A) * h + x12 * b12
    y12 += c12 * h
    h = tl.exp2(d13 * A) * h + x13 * b13
    y13 += c13 * h
    h = tl.exp2(d14 * A) * h + x14 * b14
    y14 += c14 * h
    h = tl.exp2(d15 * A) * h + x15 * b15
    y15 += c15 * h
    return h, y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15


# fmt: off
@triton.jit
def _gather16(rows, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, zero_i):
    # rows[o_t] for 16 tokens at any offsets (one load per token; rows may be one pointer for every lane)
    x0 = _ld1(rows + o0 + zero_i)
    x1 = _ld1(rows + o1 + zero_i)
    x2 = _ld1(rows + o2 + zero_i)
    x3 = _ld1(rows + o3 + zero_i)
    x4 = _ld1(rows + o4 + zero_i)
    x5 = _ld1(rows + o5 + zero_i)
    x6 = _ld1(rows + o6 + zero_i)
    x7 = _ld1(rows + o7 + zero_i)
    x8 = _ld1(rows + o8 + zero_i)
    x9 = _ld1(rows + o9 + zero_i)
    x10 = _ld1(rows + o10 + zero_i)
    x11 = _ld1(rows + o11 + zero_i)
    x12 = _ld1(rows + o12 + zero_i)
    x13 = _ld1(rows + o13 + zero_i)
    x14 = _ld1(rows + o14 + zero_i)
    x15 = _ld1(rows + o15 + zero_i)
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


@triton.jit
def _scatter16(rows, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15):
    # rows[o_t] = x_t (cast to the pointee type)
    _st1(rows + o0, x0)
    _st1(rows + o1, x1)
    _st1(rows + o2, x2)
    _st1(rows + o3, x3)
    _st1(rows + o4, x4)
    _st1(rows + o5, x5)
    _st1(rows + o6, x6)
    _st1(rows + o7, x7)
    _st1(rows + o8, x8)
    _st1(rows + o9, x9)
    _st1(rows + o10, x10)
    _st1(rows + o11, x11)
    _st1(rows + o12, x12)
    _st1(rows + o13, x13)
    _st1(rows + o14, x14)
    _st1(rows + o15, x15)


@triton.jit
def _offsets16(q0, L, fast, mid, st_fast, st_mid, st_slow, rev):
    # the offsets of tokens q0 .. q0 + 15 of an order (scalars)
    o0 = _token_offsets(q0 + 0, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o1 = _token_offsets(q0 + 1, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o2 = _token_offsets(q0 + 2, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o3 = _token_offsets(q0 + 3, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o4 = _token_offsets(q0 + 4, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o5 = _token_offsets(q0 + 5, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o6 = _token_offsets(q0 + 6, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o7 = _token_offsets(q0 + 7, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o8 = _token_offsets(q0 + 8, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o9 = _token_offsets(q0 + 9, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o10 = _token_offsets(q0 + 10, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o11 = _token_offsets(q0 + 11, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o12 = _token_offsets(q0 + 12, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o13 = _token_offsets(q0 + 13, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o14 = _token_offsets(q0 + 14, L, fast, mid, st_fast, st_mid, st_slow, rev)
    o15 = _token_offsets(q0 + 15, L, fast, mid, st_fast, st_mid, st_slow, rev)
    return o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15


@triton.jit
def _load16r(p):
    # _load16 for an order whose 16 tokens sit at descending offsets from p + 15 down to p: token order
    x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load16(p)
    return x15, x14, x13, x12, x11, x10, x9, x8, x7, x6, x5, x4, x3, x2, x1, x0


@triton.jit
def _store16r(p, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15):
    # the inverse of _load16r
    _store16(p, x15, x14, x13, x12, x11, x10, x9, x8, x7, x6, x5, x4, x3, x2, x1, x0)


@triton.jit
def _read16(rows, base, neighbours, rev, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, zero_i, ANY: tl.constexpr, STRIDED: tl.constexpr):
    # A chunk's 16 tokens of each lane's row, as 16 fp32 vectors: 16-byte words from `base` (taken in reverse for a
    # reversed order) when the chunk is 16 neighbours in memory, else one token at a time at o0..o15. ANY = False:
    # every order of the call is the raster one; STRIDED = False: every order is raster or reversed.
    if STRIDED:
        if not neighbours:
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _gather16(rows, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, zero_i)
        elif rev != 0:
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load16r(rows + base + zero_i)
        else:
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load16(rows + base + zero_i)
    elif ANY:
        if rev != 0:
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load16r(rows + base + zero_i)
        else:
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load16(rows + base + zero_i)
    else:
        x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15 = _load16(rows + base + zero_i)
    return x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15


@triton.jit
def _write16(rows, base, neighbours, rev, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15, ANY: tl.constexpr, STRIDED: tl.constexpr):
    # The inverse of _read16.
    if STRIDED:
        if not neighbours:
            _scatter16(rows, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
        elif rev != 0:
            _store16r(rows + base, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
        else:
            _store16(rows + base, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    elif ANY:
        if rev != 0:
            _store16r(rows + base, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
        else:
            _store16(rows + base, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)
    else:
        _store16(rows + base, x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15)


@triton.jit
def _chunk16(
    h0, q0, base, neighbours, L, fast, mid, st_fast, st_mid, st_slow, rev,
    u_rows, d_rows, z_rows, o_rows, p_rows, A_rows, B_base, C_base, sB_n, sC_n, bias, Dv, nn, zero_i,
    ANY: tl.constexpr, STRIDED: tl.constexpr, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    GATE: tl.constexpr, STORE_PRE: tl.constexpr, BLOCK_N: tl.constexpr, mid_rows, mid_stride,
    SAVE_MID: tl.constexpr = False,
):
    # One chunk of 16 tokens (q0 ..) from the (BLOCK_N, SUB) chunk-start state h0; writes y (and the pre-gate output)
    # and returns the state after the chunk. SAVE_MID: state n after the chunk's 8th token goes to
    # mid_rows + n·mid_stride (the backward's middle states, PassConfig.mid_states). Each quantity is 16 per-channel
    # vectors, one per token. An order whose chunk is 16 neighbours in memory from offset `base` on moves it by
    # 16-byte loads (a reversed order reads them in reverse); any other order (STRIDED: the call may have some) loads
    # one token at a time. ANY = False: every order is the raster one. Without STRIDED no token offsets are computed
    # (nor kept in registers).
    if STRIDED:
        o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = _offsets16(q0, L, fast, mid, st_fast, st_mid, st_slow, rev)
    else:  # unused: every chunk is 16 neighbours
        o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15 = zero_i, zero_i, zero_i, zero_i, zero_i, zero_i, zero_i, zero_i, zero_i, zero_i, zero_i, zero_i, zero_i, zero_i, zero_i, zero_i
    u0, u1, u2, u3, u4, u5, u6, u7, u8, u9, u10, u11, u12, u13, u14, u15 = _read16(u_rows, base, neighbours, rev, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, zero_i, ANY, STRIDED)
    r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, r10, r11, r12, r13, r14, r15 = _read16(d_rows, base, neighbours, rev, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, zero_i, ANY, STRIDED)
    d0 = _delta(r0, bias, HAS_BIAS, SOFTPLUS)
    d1 = _delta(r1, bias, HAS_BIAS, SOFTPLUS)
    d2 = _delta(r2, bias, HAS_BIAS, SOFTPLUS)
    d3 = _delta(r3, bias, HAS_BIAS, SOFTPLUS)
    d4 = _delta(r4, bias, HAS_BIAS, SOFTPLUS)
    d5 = _delta(r5, bias, HAS_BIAS, SOFTPLUS)
    d6 = _delta(r6, bias, HAS_BIAS, SOFTPLUS)
    d7 = _delta(r7, bias, HAS_BIAS, SOFTPLUS)
    d8 = _delta(r8, bias, HAS_BIAS, SOFTPLUS)
    d9 = _delta(r9, bias, HAS_BIAS, SOFTPLUS)
    d10 = _delta(r10, bias, HAS_BIAS, SOFTPLUS)
    d11 = _delta(r11, bias, HAS_BIAS, SOFTPLUS)
    d12 = _delta(r12, bias, HAS_BIAS, SOFTPLUS)
    d13 = _delta(r13, bias, HAS_BIAS, SOFTPLUS)
    d14 = _delta(r14, bias, HAS_BIAS, SOFTPLUS)
    d15 = _delta(r15, bias, HAS_BIAS, SOFTPLUS)
    x0 = d0 * u0
    x1 = d1 * u1
    x2 = d2 * u2
    x3 = d3 * u3
    x4 = d4 * u4
    x5 = d5 * u5
    x6 = d6 * u6
    x7 = d7 * u7
    x8 = d8 * u8
    x9 = d9 * u9
    x10 = d10 * u10
    x11 = d11 * u11
    x12 = d12 * u12
    x13 = d13 * u13
    x14 = d14 * u14
    x15 = d15 * u15
    zero = tl.zeros_like(bias)
    if HAS_D:
        y0 = Dv * u0
        y1 = Dv * u1
        y2 = Dv * u2
        y3 = Dv * u3
        y4 = Dv * u4
        y5 = Dv * u5
        y6 = Dv * u6
        y7 = Dv * u7
        y8 = Dv * u8
        y9 = Dv * u9
        y10 = Dv * u10
        y11 = Dv * u11
        y12 = Dv * u12
        y13 = Dv * u13
        y14 = Dv * u14
        y15 = Dv * u15
    else:
        y0 = zero
        y1 = zero
        y2 = zero
        y3 = zero
        y4 = zero
        y5 = zero
        y6 = zero
        y7 = zero
        y8 = zero
        y9 = zero
        y10 = zero
        y11 = zero
        y12 = zero
        y13 = zero
        y14 = zero
        y15 = zero
    h_next = tl.zeros_like(h0)
    for n in tl.static_range(BLOCK_N):
        A_n = tl.load(A_rows + n) * 1.4426950408889634  # exp(Δ·A) = exp2(Δ·A·log2 e)
        h0_n = tl.sum(tl.where(nn[:, None] == n, h0, 0.0), axis=0)
        b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15 = _read16(B_base + n * sB_n, base, neighbours, rev, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, zero_i, ANY, STRIDED)
        e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15 = _read16(C_base + n * sC_n, base, neighbours, rev, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, zero_i, ANY, STRIDED)
        h_end, y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15 = _steps16(
            h0_n, A_n,
            d0, d1, d2, d3, d4, d5, d6, d7, d8, d9, d10, d11, d12, d13, d14, d15,
            x0, x1, x2, x3, x4, x5, x6, x7, x8, x9, x10, x11, x12, x13, x14, x15,
            b0, b1, b2, b3, b4, b5, b6, b7, b8, b9, b10, b11, b12, b13, b14, b15,
            e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15,
            y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15, mid_rows + n * mid_stride, SAVE_MID,
        )
        h_next = tl.where(nn[:, None] == n, h_end[None, :], h_next)
    if GATE:
        z0, z1, z2, z3, z4, z5, z6, z7, z8, z9, z10, z11, z12, z13, z14, z15 = _read16(z_rows, base, neighbours, rev, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, zero_i, ANY, STRIDED)
        if STORE_PRE:
            _write16(p_rows, base, neighbours, rev, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15, ANY, STRIDED)
        y0 = _gate(y0, z0)
        y1 = _gate(y1, z1)
        y2 = _gate(y2, z2)
        y3 = _gate(y3, z3)
        y4 = _gate(y4, z4)
        y5 = _gate(y5, z5)
        y6 = _gate(y6, z6)
        y7 = _gate(y7, z7)
        y8 = _gate(y8, z8)
        y9 = _gate(y9, z9)
        y10 = _gate(y10, z10)
        y11 = _gate(y11, z11)
        y12 = _gate(y12, z12)
        y13 = _gate(y13, z13)
        y14 = _gate(y14, z14)
        y15 = _gate(y15, z15)
    _write16(o_rows, base, neighbours, rev, o0, o1, o2, o3, o4, o5, o6, o7, o8, o9, o10, o11, o12, o13, o14, o15, y0, y1, y2, y3, y4, y5, y6, y7, y8, y9, y10, y11, y12, y13, y14, y15, ANY, STRIDED)
    return h_next
# fmt: on


# fmt: off
@triton.jit
def _seg_chunk16(
    r, base, neighbours, rev, d_rows, g_rows, z_rows, A_rows, C_base, sC_n, bias, nn, zero_i,
    ANY: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_Z: tl.constexpr, SOFTPLUS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The segment pass's chunk on per-token vectors (the forward's tokens.py style) for calls whose every chunk is
    # 16 neighbours in memory: r ← exp(A·ΣΔ)·r + Σ_t exp(A·Σ_{j≤t} Δ_j)·g_t·C_t per state, and the chunk's Σ Δ.
    # The tile path spreads (16 tokens × 16 states × 32 channels) over four warps and sums across them.
    z = zero_i
    g0, g1, g2, g3, g4, g5, g6, g7, g8, g9, g10, g11, g12, g13, g14, g15 = _read16(g_rows, base, neighbours, rev, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, zero_i, ANY, False)
    if HAS_Z:
        v0, v1, v2, v3, v4, v5, v6, v7, v8, v9, v10, v11, v12, v13, v14, v15 = _read16(z_rows, base, neighbours, rev, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, zero_i, ANY, False)
        g0 = _gate(g0, v0)
        g1 = _gate(g1, v1)
        g2 = _gate(g2, v2)
        g3 = _gate(g3, v3)
        g4 = _gate(g4, v4)
        g5 = _gate(g5, v5)
        g6 = _gate(g6, v6)
        g7 = _gate(g7, v7)
        g8 = _gate(g8, v8)
        g9 = _gate(g9, v9)
        g10 = _gate(g10, v10)
        g11 = _gate(g11, v11)
        g12 = _gate(g12, v12)
        g13 = _gate(g13, v13)
        g14 = _gate(g14, v14)
        g15 = _gate(g15, v15)
    q0, q1, q2, q3, q4, q5, q6, q7, q8, q9, q10, q11, q12, q13, q14, q15 = _read16(d_rows, base, neighbours, rev, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, zero_i, ANY, False)
    p0 = _delta(q0, bias, HAS_BIAS, SOFTPLUS)  # p_t = Σ_{j≤t} Δ_j
    p1 = p0 + _delta(q1, bias, HAS_BIAS, SOFTPLUS)
    p2 = p1 + _delta(q2, bias, HAS_BIAS, SOFTPLUS)
    p3 = p2 + _delta(q3, bias, HAS_BIAS, SOFTPLUS)
    p4 = p3 + _delta(q4, bias, HAS_BIAS, SOFTPLUS)
    p5 = p4 + _delta(q5, bias, HAS_BIAS, SOFTPLUS)
    p6 = p5 + _delta(q6, bias, HAS_BIAS, SOFTPLUS)
    p7 = p6 + _delta(q7, bias, HAS_BIAS, SOFTPLUS)
    p8 = p7 + _delta(q8, bias, HAS_BIAS, SOFTPLUS)
    p9 = p8 + _delta(q9, bias, HAS_BIAS, SOFTPLUS)
    p10 = p9 + _delta(q10, bias, HAS_BIAS, SOFTPLUS)
    p11 = p10 + _delta(q11, bias, HAS_BIAS, SOFTPLUS)
    p12 = p11 + _delta(q12, bias, HAS_BIAS, SOFTPLUS)
    p13 = p12 + _delta(q13, bias, HAS_BIAS, SOFTPLUS)
    p14 = p13 + _delta(q14, bias, HAS_BIAS, SOFTPLUS)
    p15 = p14 + _delta(q15, bias, HAS_BIAS, SOFTPLUS)
    r_next = tl.zeros_like(r)
    for n in tl.static_range(BLOCK_N):
        A_n = tl.load(A_rows + n) * 1.4426950408889634  # exp(Δ·A) = exp2(Δ·A·log2 e)
        r_n = tl.sum(tl.where(nn[:, None] == n, r, 0.0), axis=0)
        c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11, c12, c13, c14, c15 = _read16(C_base + n * sC_n, base, neighbours, rev, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, z, zero_i, ANY, False)
        w = tl.exp2(p0 * A_n) * (g0 * c0) + tl.exp2(p1 * A_n) * (g1 * c1)
        w += tl.exp2(p2 * A_n) * (g2 * c2) + tl.exp2(p3 * A_n) * (g3 * c3)
        w += tl.exp2(p4 * A_n) * (g4 * c4) + tl.exp2(p5 * A_n) * (g5 * c5)
        w += tl.exp2(p6 * A_n) * (g6 * c6) + tl.exp2(p7 * A_n) * (g7 * c7)
        w += tl.exp2(p8 * A_n) * (g8 * c8) + tl.exp2(p9 * A_n) * (g9 * c9)
        w += tl.exp2(p10 * A_n) * (g10 * c10) + tl.exp2(p11 * A_n) * (g11 * c11)
        w += tl.exp2(p12 * A_n) * (g12 * c12) + tl.exp2(p13 * A_n) * (g13 * c13)
        w += tl.exp2(p14 * A_n) * (g14 * c14)
        decay = tl.exp2(p15 * A_n)
        r_n = decay * r_n + w + decay * (g15 * c15)
        r_next = tl.where(nn[:, None] == n, r_n[None, :], r_next)
    return r_next, p15
# fmt: on
