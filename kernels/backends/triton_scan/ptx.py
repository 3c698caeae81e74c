"""Warp-level PTX the Triton language does not expose, as inline assembly, with an emulation for the interpreter.

Each helper is elementwise over tensors that hold one element per thread, and every lane of the warp runs it on the
same element, so warp-wide instructions (shuffles) are safe and the result does not depend on the layout Triton
picks. The kernels take these paths behind a constexpr switch (``PassConfig.ptx``) and keep a plain-Triton twin.
Under ``TRITON_INTERPRET=1`` (``INTERPRETING``) the helpers become plain loads, stores and ``tl.gather`` with the
same meaning — one lane per channel of a 32-channel block — so the CPU tests check the GPU path's logic
(``PassConfig.emulate_ptx``); its speed and its machine code are the GPU's and scan_sass.py's business.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRETING = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def _lane_id(like):
    # The hardware lane of the thread holding each element of `like` (one element per thread).
    if INTERPRETING:
        lane = tl.arange(0, like.shape[0]) % 32
    else:
        lane = tl.inline_asm_elementwise(
            "mov.u32 $0, %laneid;", "=r,r", [like.to(tl.int32)], dtype=tl.int32, is_pure=True, pack=1
        )
    return lane


@triton.jit
def _bfly(x, m):
    # The value x has in lane (this lane xor m): one SHFL.BFLY (Triton has no shuffle; a warp-wide asm is safe
    # because every lane runs it on the same element). x fp32, one element per thread.
    if INTERPRETING:
        got = tl.gather(x, tl.arange(0, x.shape[0]) ^ m, 0)
    else:
        bits = tl.inline_asm_elementwise(
            "shfl.sync.bfly.b32 $0, $1, $2, 0x1f, 0xffffffff;",
            "=r,r,r",
            [x.to(tl.int32, bitcast=True), m],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
        got = bits.to(tl.float32, bitcast=True)
    return got


@triton.jit
def _lane_sum8(x0, x1, x2, x3, x4, x5, x6, x7, lane):
    # Reduce-scatter over the warp: 8 per-lane vectors (one element per thread) in, and lane l gets the sum over
    # all 32 lanes of x_{(l >> 2) & 7}. Recursive halving: 4 + 2 + 1 exchanges, then 2 to finish the sum — 9
    # shuffles where eight tl.sum butterflies take 40.
    z = lane * 0
    hi = (lane & 16) != 0  # keep tokens 4-7, send 0-3
    y0 = tl.where(hi, x4, x0) + _bfly(tl.where(hi, x0, x4), z + 16)
    y1 = tl.where(hi, x5, x1) + _bfly(tl.where(hi, x1, x5), z + 16)
    y2 = tl.where(hi, x6, x2) + _bfly(tl.where(hi, x2, x6), z + 16)
    y3 = tl.where(hi, x7, x3) + _bfly(tl.where(hi, x3, x7), z + 16)
    hi = (lane & 8) != 0  # y_i: token i + 4·b4
    w0 = tl.where(hi, y2, y0) + _bfly(tl.where(hi, y0, y2), z + 8)
    w1 = tl.where(hi, y3, y1) + _bfly(tl.where(hi, y1, y3), z + 8)
    hi = (lane & 4) != 0  # w_i: token i + 2·b3 + 4·b4
    v = tl.where(hi, w1, w0) + _bfly(tl.where(hi, w0, w1), z + 4)
    v += _bfly(v, z + 2)
    return v + _bfly(v, z + 1)


@triton.jit
def _word_at(p, i):
    # (interpreter) the i-th 32-bit word at p, from the pointee elements
    ELT: tl.constexpr = p.dtype.element_ty
    if ELT.primitive_bitwidth == 32:
        w = tl.load(p + i).to(tl.int32, bitcast=True)
    else:
        lo = tl.load(p + 2 * i).to(tl.int16, bitcast=True).to(tl.int32) & 65535
        hi = tl.load(p + 2 * i + 1).to(tl.int16, bitcast=True).to(tl.int32)
        w = lo | (hi << 16)
    return w


@triton.jit
def _put_word(p, i, w):
    # (interpreter) stores the 32-bit word w as the i-th word at p
    ELT: tl.constexpr = p.dtype.element_ty
    if ELT.primitive_bitwidth == 32:
        tl.store(p + i, w.to(ELT, bitcast=True))
    else:
        tl.store(p + 2 * i, w.to(tl.int16).to(ELT, bitcast=True))
        tl.store(p + 2 * i + 1, (w >> 16).to(tl.int16).to(ELT, bitcast=True))


@triton.jit
def _ld16(ptrs):
    # The four 32-bit words at each pointer (16-byte aligned) by one 16-byte load, as four int32 tensors shaped like
    # ptrs. Elementwise with one pointer per instance, so it is right whatever layout Triton gives ptrs.
    if INTERPRETING:
        w0 = _word_at(ptrs, 0)
        w1 = _word_at(ptrs, 1)
        w2 = _word_at(ptrs, 2)
        w3 = _word_at(ptrs, 3)
    else:
        w0, w1, w2, w3 = tl.inline_asm_elementwise(
            "ld.global.v4.b32 {$0, $1, $2, $3}, [$4];",
            "=r,=r,=r,=r,l",
            [ptrs],
            dtype=(tl.int32, tl.int32, tl.int32, tl.int32),
            is_pure=True,
            pack=1,
        )
    return w0, w1, w2, w3


@triton.jit
def _st16(ptrs, w0, w1, w2, w3):
    # Stores the words w0..w3 at each pointer (16-byte aligned) by one 16-byte store.
    if INTERPRETING:
        _put_word(ptrs, 0, w0)
        _put_word(ptrs, 1, w1)
        _put_word(ptrs, 2, w2)
        _put_word(ptrs, 3, w3)
    else:
        tl.inline_asm_elementwise(
            "st.global.v4.b32 [$1], {$2, $3, $4, $5};\n\tmov.u32 $0, 0;",
            "=r,l,r,r,r,r",
            [ptrs, w0, w1, w2, w3],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )


@triton.jit
def _ld1(ptrs):
    # One element at each pointer, as fp32, by an asm load: Triton's coalescing pass (whose cost grows with the
    # number of loads and stores in a kernel) skips it — a token-by-token gather of 16 tokens × 16 states made
    # that pass take ~100 s.
    ELT: tl.constexpr = ptrs.dtype.element_ty
    if INTERPRETING:
        x = tl.load(ptrs).to(tl.float32)
    elif ELT.primitive_bitwidth == 32:
        x = tl.inline_asm_elementwise(
            "ld.global.b32 $0, [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=True, pack=1
        ).to(ELT, bitcast=True)
    else:
        x = tl.inline_asm_elementwise(
            "ld.global.b16 $0, [$1];", "=h,l", [ptrs], dtype=tl.int16, is_pure=True, pack=1
        ).to(ELT, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _st1(ptrs, x):
    # tl.store(ptrs, x) (x cast to the pointee type) by an asm store, for the reason of _ld1.
    ELT: tl.constexpr = ptrs.dtype.element_ty
    if INTERPRETING:
        tl.store(ptrs, x)
    elif ELT.primitive_bitwidth == 32:
        tl.inline_asm_elementwise(
            "st.global.b32 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,r", [ptrs, x.to(ELT).to(tl.int32, bitcast=True)],
            dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip
    else:
        tl.inline_asm_elementwise(
            "st.global.b16 [$1], $2;\n\tmov.u32 $0, 0;", "=r,l,h", [ptrs, x.to(ELT).to(tl.int16, bitcast=True)],
            dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


@triton.jit
def _ld1_if(ptrs, ok, WRITTEN: tl.constexpr = False):
    # fp32 elements at ptrs where ok, else 0, by asm loads (see _ld1). A state tile moved by tl.load takes the
    # coalescing pass's layout (four channels per thread, the states over four lane groups), and Triton then keeps
    # the scan's carried state in it: every state's pick became shuffles and a shared-memory round trip.
    # WRITTEN: memory that this kernel also writes. A pure asm load reads, to the compiler, no memory at all: it may
    # merge two loads of one address or hoist a load out of a loop across the stores in between (the backward's
    # slots, loaded a state ahead, read stale values so on the H200).
    if INTERPRETING:
        x = tl.load(ptrs, mask=ok, other=0.0)
    else:
        x = tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b32 $0, 0; @p ld.global.b32 $0, [$1]; }",
            "=r,l,r", [ptrs, ok.to(tl.int32)], dtype=tl.int32, is_pure=not WRITTEN, pack=1,
        ).to(tl.float32, bitcast=True)  # fmt: skip
    return x


@triton.jit
def _st1_if(ptrs, x, ok):
    # fp32 x stored at ptrs where ok, by asm stores (see _ld1_if).
    if INTERPRETING:
        tl.store(ptrs, x, mask=ok)
    else:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $3, 0; @p st.global.b32 [$1], $2; }\n\tmov.u32 $0, 0;",
            "=r,l,r,r", [ptrs, x.to(tl.int32, bitcast=True), ok.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


@triton.jit
def _prefetch(ptrs):
    # Asks for the line at each pointer to be brought into L1 ahead of its load; nothing under the interpreter. One
    # instruction serves a whole warp: each lane names its own line.
    if not INTERPRETING:
        tl.inline_asm_elementwise(
            "prefetch.global.L1 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _slot_ld(ptrs, ok, ASM: tl.constexpr):
    # fp32 slots at ptrs where ok (broadcast), else 0: by _ld1_if when ASM (the GPU path), else tl.load. The slots
    # are the kernel's own scratch, written between its loads of them.
    if ASM:
        x = _ld1_if(ptrs, tl.full(ptrs.shape, 1, tl.int1) & ok, WRITTEN=True)
    else:
        x = tl.load(ptrs, mask=ok, other=0.0)
    return x


@triton.jit
def _slot_st(ptrs, x, ASM: tl.constexpr):
    # fp32 x into the slots at ptrs: by an asm store when ASM (the GPU path; see _ld1_if), else tl.store.
    if ASM:
        _st1(ptrs, x)
    else:
        tl.store(ptrs, x)


@triton.jit
def _fence(like):
    # A gpu-scope acquire-release fence by every thread holding an element of `like` (one element per thread):
    # orders that thread's loads and stores around a grid-wide handshake (forward.py's fused carry); nothing under
    # the interpreter, which runs programs one after another. Returns zeros shaped like `like`.
    if INTERPRETING:
        z = like.to(tl.int32) * 0
    else:
        z = tl.inline_asm_elementwise(
            "fence.acq_rel.gpu;\n\tmov.u32 $0, 0;", "=r,r", [like.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1
        )
    return z


@triton.jit
def _nap(like):
    # Sleeps the thread about 100 ns (a polling loop's back-off, so that waiting warps leave the L2 slice of the
    # word they poll to the others); nothing under the interpreter.
    if not INTERPRETING:
        tl.inline_asm_elementwise(
            "nanosleep.u32 100;\n\tmov.u32 $0, 0;", "=r,r", [like.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1
        )
