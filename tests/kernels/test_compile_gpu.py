"""The conv, norm, backward-finish, fused-forward and line-vector kernels (forward, backward, its segment pass) compile
for sm_90 here.

The interpreter runs Python where the compiler needs Triton (e.g. ``None`` inside a tuple of kernel arguments
compiles under ``TRITON_INTERPRET=1`` but not for a GPU), so each launch variant is also compiled here.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = r"""
import itertools
from triton import compile as compile_kernel
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from medmamba.kernels.backends.triton_scan import backward, conv, forward, lines, lines_backward, norm

def build(fn, const, types, warps=4):
    names = fn.arg_names
    sig = {n: "constexpr" if n in const else types.get(n, "*fp32" if n.endswith("_ptr") else "i32") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    compile_kernel(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})

half = {"x_ptr": "*bf16", "y_ptr": "*bf16", "dy_ptr": "*bf16", "dx_ptr": "*bf16", "order_ptr": "*i32", "eps": "fp32"}
# (orders' modes, modes present): SegMamba's raster, reversed and slice orders; any order (the general mode)
for width, has_bias, silu, (modes, present) in [(4, True, True, (28, 11)), (4, False, False, (2, 4)),
                                               (3, False, True, (28, 11))]:
    const = {"W": width, "HAS_BIAS": has_bias, "SILU": silu, "SUB": 4, "BLOCK_P": 128, "MODES": modes,
             "PRESENT": present}
    for grad in (False, True):
        build(conv._conv_fwd_kernel, const | {"GRAD": grad}, half)
    dx_const = {"K": 3 if present == 11 else 1, "W": width, "SUB": 4, "BLOCK_P": 128, "MODES": modes}
    build(conv._conv_dx_kernel, dx_const, half | {"g_ptr": "*bf16"})
for affine in (True, False):
    build(norm._norm_fwd_kernel, {"HAS_W": affine, "HAS_B": affine, "BLOCK_C": 64, "BLOCK": 64}, half)
    build(norm._norm_bwd_kernel, {"HAS_W": affine, "BLOCK_C": 64, "BLOCK": 64}, half)
grads = {"dB_ptr": "*bf16", "dC_ptr": "*bf16", "dD_ptr": "*bf16"}
for has_bc, has_d, has_bias, tiles in [(True, True, True, backward.FINISH_TILES),
                                       (False, False, True, backward.FINISH_TILES),
                                       (True, True, False, backward.FINISH_TALL_TILES)]:
    const = {"HAS_BC": has_bc, "HAS_D": has_d, "HAS_BIAS": has_bias, "BLOCK": backward.FINISH_BLOCK,
             "ROWS": tiles[0], "COLS": tiles[1]}
    build(backward._bwd_finish_kernel, const, grads)
seq = {n: "*bf16" for n in ("u_ptr", "dl_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "pre_ptr")} | {"order_ptr": "*i32"}
for end, save, mid in [(True, False, False), (False, True, False), (False, True, True), (False, False, False)]:
    const = {"SUB": 32, "LV": 4, "HAS_D": save, "HAS_BIAS": save, "SOFTPLUS": True, "GATE": save, "STORE_PRE": save,
             "SAVE_STATES": save, "END_ONLY": end, "SAVE_MID": mid}
    build(lines._fwd_lines_kernel, const, seq)
for options in ({"LOAD_AHEAD": False, "HAS_MIDS": False}, {"LOAD_AHEAD": True, "HAS_MIDS": True}):  # defaults; opt-ins
    const = {"SUB": 32, "LV": 2, "HAS_D": True, "HAS_BIAS": True, "SOFTPLUS": True, "LANE_SUMS": True, **options}
    build(lines_backward._bwd_lines_kernel, const, seq | {"du_ptr": "*bf16", "ddl_ptr": "*bf16"})
build(lines_backward._bwd_lines_segment_kernel, {"SUB": 32, "LV": 2, "HAS_BIAS": True, "SOFTPLUS": True}, seq)
# the opt-in fused forward (PassConfig.fused_carry) as launched: one warp, the per-token path, its handshake's PTX
const = {"SUB": 32, "BLOCK_T": 16, "BLOCK_N": 16, "HAS_D": True, "HAS_BIAS": True, "SOFTPLUS": True, "GATE": True,
         "STORE_PRE": False, "SAVE_STATES": True, "VEC_MODE": 1, "LINES": 1, "PREFETCH": False, "SAVE_MID": True,
         "PHASE": 0, "HELPERS": 16, "CARRY_STEP": forward.CARRY_STEP, "SYNC_STRIDE": forward.SYNC_STRIDE}
build(forward._fwd_fused_kernel, const, seq | {"sync_ptr": "*i32"}, warps=1)
print("compiled")
"""


def test_conv_norm_finish_fused_and_line_vector_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    run = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
