"""What the Triton scan kernels compile to on a Hopper GPU, measured on any machine (no GPU needed).

    python benchmarks/scan_sass.py [--kernel forward|segment|backward|backward-segment|lines-backward|lines-segment|
        conv-forward|conv-grad|conv-dx] [--dtype fp32|bf16|fp16] [--lv 2] [--maxnreg N] [--divisible] [--[no-]prefetch]
        [--[no-]load-ahead] [--[no-]mid-states] [--both-ways] [--conv-tile SUB,BLOCK_P,WARPS] [--conv-modes M]
        [--json]

Compiles a kernel for sm_90a with Triton's own compiler and its bundled ``ptxas`` and ``cuobjdump`` and reports
registers per thread, spill bytes and, for every loop of the machine code (a backward branch), its length and
instruction mix. The hottest loop is the per-state loop: its SHFL count is the cross-lane traffic per state and
chunk (only the dB/dC sums should shuffle in the backward; the forward should not shuffle at all). Use it before
spending GPU time on a kernel change; ``scan_gpu.py`` then measures it.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from medmamba.kernels.backends.triton_scan import backward, configs, conv, forward, lines_backward

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
INPUTS = ("u_ptr", "dl_ptr", "B_ptr", "C_ptr", "z_ptr", "gy_ptr", "out_ptr", "pre_ptr", "du_ptr", "ddl_ptr")


def compile_sm90(
    kernel: str,
    dtype: str,
    ptx: bool = True,
    lv: int = 2,
    maxnreg: int | None = None,
    divisible: bool = False,
    prefetch: bool | None = None,
    load_ahead: bool | None = None,
    mid_states: bool | None = None,
    both_ways: bool = False,
    conv_tile: configs.ConvTile | None = None,
    conv_modes: int = 11,
) -> str:
    """PTX of one scan kernel at the default launch shape (32 channels, one warp, 16 states, every extra on).

    ``ptx``: the GPU's inline-PTX path (warp shuffles); False compiles the plain-Triton path the interpreter runs.
    ``lv``: lines per thread of the line-vector backward; ``maxnreg``: a register cap, as PassConfig's.
    ``divisible``: the integer arguments that are lengths, channel counts or strides marked multiples of 16, as the
    launch specialises them at shapes like 64³ (Triton then can prove vector loads aligned).
    ``prefetch``: PassConfig.prefetch (forward main pass, backward); ``None``: as the default settings.
    ``load_ahead``: PassConfig.load_ahead (backward; lines-backward: line_vector_load_ahead); ``None``: as the
    default settings.
    ``mid_states``: PassConfig.mid_states (forward: saves the middle states; backward: reads them); ``None``: as the
    default forward settings (the backward reads what the forward saved).
    ``both_ways``: the per-token path of calls whose orders are raster or reversed, decided per program (``VEC_MODE``
    3, SegMamba's raster and reversed group) instead of the raster order alone (1).
    ``conv_tile``: the causal conv's tile (conv-*; ``None``: the pass's default, width 4, bias, SiLU);
    ``conv_modes``: the neighbour modes compiled in (conv.py's PRESENT; 11, SegMamba's orders).
    """
    if kernel.startswith("conv-"):
        return _compile_conv(kernel, dtype, conv_tile, conv_modes, fast=ptx)
    cfg = configs.forward_config() if kernel in ("forward", "segment") else configs.backward_config()
    if prefetch is None:
        prefetch = cfg.prefetch
    if load_ahead is None:
        load_ahead = cfg.line_vector_load_ahead if kernel == "lines-backward" else cfg.load_ahead
    if mid_states is None:
        mid_states = configs.forward_config().mid_states
    vec = (3 if both_ways else 1) if ptx else 0
    if kernel == "lines-backward":
        fn = lines_backward._bwd_lines_kernel
        const = {"SUB": 32, "LV": lv, "HAS_D": True, "HAS_BIAS": True, "SOFTPLUS": True, "LANE_SUMS": ptx,
                 "LOAD_AHEAD": load_ahead, "HAS_MIDS": mid_states}  # fmt: skip
    elif kernel == "lines-segment":
        fn = lines_backward._bwd_lines_segment_kernel
        const = {"SUB": 32, "LV": lv, "HAS_BIAS": True, "SOFTPLUS": True}
    elif kernel == "backward-segment":
        fn = backward._bwd_segment_kernel
        const = {"SUB": 32, "BLOCK_T": 16, "BLOCK_N": 16, "HAS_BIAS": True, "HAS_Z": False, "SOFTPLUS": True,
                 "VEC_MODE": vec}  # fmt: skip
    elif kernel == "backward":
        fn = backward._bwd_kernel
        const = {"SUB": 32, "BLOCK_T": 16, "HAS_D": True, "HAS_BIAS": True, "HAS_Z": False, "SOFTPLUS": True,
                 "LANE_SUMS": ptx, "VEC_MODE": vec, "GATE_GRAD": False, "PREFETCH": prefetch,
                 "LOAD_AHEAD": load_ahead, "HAS_MIDS": mid_states}  # fmt: skip
    else:
        fn = forward._fwd_kernel
        end = kernel == "segment"
        const = {"SUB": 32, "BLOCK_T": 16, "BLOCK_N": 16, "HAS_D": True, "HAS_BIAS": True, "SOFTPLUS": True,
                 "GATE": not end, "STORE_PRE": False, "SAVE_STATES": not end, "END_ONLY": end,
                 "VEC_MODE": vec, "LINES": 1, "PREFETCH": prefetch,
                 "SAVE_MID": mid_states and not end, "CARRIED": False}  # fmt: skip
    names = fn.arg_names
    sig = {}
    for name in names:
        if name in const:
            sig[name] = "constexpr"
        elif name == "order_ptr":
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = f"*{dtype}" if name in INPUTS else "*fp32"
        else:
            sig[name] = "i32"
    sizes = {n for n in names if sig[n] == "i32" and (n in ("L", "CH", "CPG") or re.fullmatch(r"s[a-zA-Z]+_[a-z]+", n))}
    marked = {n for n in names if sig[n].startswith("*") or (divisible and n in sizes)}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in marked}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    warps = 4 if kernel == "backward-segment" and not ptx else 1  # as launched
    options = {"num_warps": warps, **({"maxnreg": maxnreg} if maxnreg else {})}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def _compile_conv(kernel: str, dtype: str, tile: configs.ConvTile | None, present: int, fast: bool = True) -> str:
    # SegMamba's orders when present is 11: one of each mode present, order k taking the k-th of them; 96 channels
    # (SUB divides them); fast: the GPU's approximate sigmoid (inline PTX), else tl.sigmoid as the interpreter runs
    if tile is None:
        tile = configs.conv_forward_tile() if kernel == "conv-forward" else configs.conv_backward_tile()
    modes = [m for m in range(4) if present >> m & 1]
    const = {"W": 4, "SUB": tile.sub, "BLOCK_P": tile.block_p, "MODES": sum(m << (2 * k) for k, m in enumerate(modes))}
    if kernel == "conv-dx":
        fn, const = conv._conv_dx_kernel, const | {"K": len(modes), "EVEN_C": True}
    else:
        fn = conv._conv_fwd_kernel
        const |= {"HAS_BIAS": True, "SILU": True, "PRESENT": present, "GRAD": kernel == "conv-grad", "EVEN_C": True,
                  "FAST": fast}  # fmt: skip
    names = fn.arg_names
    tensors = ("x_ptr", "y_ptr", "dy_ptr", "dx_ptr", "g_ptr")
    sig = {n: "constexpr" if n in const else (f"*{dtype}" if n in tensors else
           "*i32" if n == "order_ptr" else "*fp32" if n.endswith("_ptr") else "i32") for n in names}  # fmt: skip
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if sig[n].startswith("*")}
    src = ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in const.items()}, attrs=attrs)
    options = {"num_warps": tile.num_warps}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def sass_report(ptx: str) -> dict:
    """Registers, spills and per-loop instruction mix of a PTX module assembled for sm_90a."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        ptx_path.write_text(ptx)
        info = subprocess.run([str(BIN / "ptxas"), "-v", "-arch=sm_90a", str(ptx_path), "-o", str(cubin)],
                              capture_output=True, text=True, check=True).stderr  # fmt: skip
        sass = subprocess.run([str(BIN / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", info).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", info))
    code = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)\s*(.*)", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2).split(".")[0], m.group(3)))
    at = {addr: i for i, (addr, _, _) in enumerate(code)}
    loops = []
    for i, (addr, op, rest) in enumerate(code):
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            body = code[at[int(target.group(1), 16)] : i + 1]
            mix = collections.Counter(o for _, o, _ in body)
            loops.append({"instructions": len(body), "mix": dict(mix.most_common())})
    return {"registers": registers, "spill_bytes": spills, "instructions": len(code), "loops": loops}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kernels = ("forward", "segment", "backward", "backward-segment", "lines-backward", "lines-segment", "conv-forward",
               "conv-grad", "conv-dx")  # fmt: skip
    ap.add_argument("--kernel", choices=kernels, default="backward",
                    help="forward main pass, forward segment pass (end states only), backward, backward segment "
                         "pass, the line-vector backward's main or segment pass, or the causal conv's forward "
                         "or its backward's two passes (conv-grad, conv-dx)")  # fmt: skip
    ap.add_argument("--lv", type=int, default=2, help="lines-backward, lines-segment: lines per thread")
    ap.add_argument("--maxnreg", type=int, help="a register cap (PassConfig.maxnreg and its kin)")
    ap.add_argument(
        "--divisible", action="store_true", help="lengths, channel counts and strides specialised as multiples of 16"
    )
    ap.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="dtype of u, Δ, B, C, z")
    ap.add_argument(
        "--plain", action="store_true", help="the plain-Triton path (no inline PTX), as the interpreter runs"
    )
    ap.add_argument(
        "--prefetch",
        action=argparse.BooleanOptionalAction,
        help="with or without PassConfig.prefetch (forward, backward); default: as the default settings",
    )
    ap.add_argument(
        "--load-ahead",
        action=argparse.BooleanOptionalAction,
        help="backward (lines-backward): with or without PassConfig.load_ahead (line_vector_load_ahead); default: as "
        "the default settings",
    )
    ap.add_argument(
        "--mid-states",
        action=argparse.BooleanOptionalAction,
        help="forward, backward: with or without PassConfig.mid_states; default: as the default settings",
    )
    ap.add_argument(
        "--both-ways",
        action="store_true",
        help="forward, segment, backward(-segment): the per-token path of a group of raster and reversed orders "
        "(VEC_MODE 3) instead of the raster order alone",
    )
    ap.add_argument(
        "--conv-tile",
        help="conv-forward, conv-grad, conv-dx: the tile as SUB,BLOCK_P,WARPS[,STEPS] (default: the pass's)",
    )
    ap.add_argument("--conv-modes", type=int, default=11,
                    help="conv-forward, conv-grad, conv-dx: the neighbour modes compiled in, a bit each (conv.py's "
                         "PRESENT; default 11: raster, lines and reversed, as SegMamba's orders)")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args()
    ptx = compile_sm90(
        args.kernel,
        args.dtype,
        not args.plain,
        args.lv,
        args.maxnreg,
        args.divisible,
        args.prefetch,
        args.load_ahead,
        args.mid_states,
        args.both_ways,
        configs.ConvTile(*(int(v) for v in args.conv_tile.split(","))) if args.conv_tile else None,
        args.conv_modes,
    )
    report = sass_report(ptx)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"{args.kernel} {args.dtype}: {report['registers']} registers, {report['spill_bytes']} bytes of spills, "
          f"{report['instructions']} instructions")  # fmt: skip
    for loop in sorted(report["loops"], key=lambda x: -x["instructions"]):
        top = ", ".join(f"{k} {v}" for k, v in list(loop["mix"].items())[:10])
        print(f"  loop of {loop['instructions']:5d}: {top}")


if __name__ == "__main__":
    sys.exit(main())
