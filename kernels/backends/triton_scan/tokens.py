"""The forward's per-token path for raster calls (PassConfig.ptx on a CUDA device; see forward._fwd_kernel).

A chunk's 16 tokens are held as 16 per-channel vectors (one element per thread) straight from 16-byte loads
(ptx._ld16), so no tile is formed and Triton never has to pick a layout for one: every value is elementwise over
the channels. The recurrence then runs token by token, one exp and three FMAs per token and state. Written out
for 16 tokens (Triton has no per-token arrays); the plain-Triton tile path in forward.py is its twin.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import _halves, _softplus, _word
from .ptx import _ld16, _st16


@triton.jit
def _f32x4(p):
    # 4 fp32 at each pointer of p (16-byte aligned)
    w0, w1, w2, w3 = _ld16(p)
    return (
        w0.to(tl.float32, bitcast=True), w1.to(tl.float32, bitcast=True),
        w2.to(tl.float32, bitcast=True), w3.to(tl.float32, bitcast=True),
    )  # fmt: skip


@triton.jit
def _load16(p):
    # The 16 elements at each pointer of p (16-byte aligned), as 16 fp32 vectors shaped like p.
    ELT: tl.constexpr = p.dtype.element_ty
    if ELT.primitive_bitwidth == 32:
        x0, x1, x2, x3 = _f32x4(p)
        x4, x5, x6, x7 = _f32x4(p + 4)
        x8, x9, x10, x11 = _f32x4(p + 8)
        x12, x13, x14, x15 = _f32x4(p + 12)
    else:
        w0, w1, w2, w3 = _ld16(p)
        w4, w5, w6, w7 = _ld16(p + 8)
        x0, x1 = _halves(w0, ELT)
        x2, x3 = _halves(w1, ELT)
        x4, x5 = _halves(w2, ELT)
        x6, x7 = _halves(w3, ELT)
        x8, x9 = _halves(w4, ELT)
        x10, x11 = _halves(w5, ELT)
        x12, x13 = _halves(w6, ELT)
        x14, x15 = _halves(w7, ELT)
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
):
    # One state through the chunk: h_t = exp2(Δ_t·A)·h_(t-1) + x_t·B_t, y_t += C_t·h_t (A pre-scaled by log2 e).
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
