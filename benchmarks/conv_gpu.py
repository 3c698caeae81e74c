"""The causal conv along scan orders (triton backend) on the GPU: checks it against the torch backend and times its
forward and backward per tile.

    python benchmarks/conv_gpu.py [--out DIR] [--tiles SUB,BLOCK_P,WARPS[,STEPS];...] [--spatial 64,64,64]
        [--channels 96] [--batch 2] [--dtype bf16] [--orders raster,reversed,slice] [--dry-run]

The shape is SegMamba's stage-0 mixer (``networks.md`` §10: d_inner 96, batch 2, 64³ tokens, its three orders, width
4, SiLU, bf16). Per tile (configs.ConvTile, the same for both passes): forward and backward ms (CUDA events, median
after warm-up; the backward as ``torch.autograd.grad`` of a saved graph), their effective bandwidth against the
bytes each pass must move at least (forward: x once, y K times; backward: x and dx once, dy K times), and the largest
error against the torch backend's result in fp32. ``--dry-run`` runs every path on tiny shapes on the CPU
(``TRITON_INTERPRET=1``). Results: ``conv_gpu.json`` and ``conv_gpu.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--dry-run" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import scan_gpu  # this folder's: its CUDA-event timer
import torch

from medmamba.kernels import RASTER, REVERSED, SLICE, causal_conv
from medmamba.kernels.backends.triton_scan import configs

ORDERS = {"raster": RASTER, "reversed": REVERSED, "slice": SLICE}
DEFAULT_TILES = "4,128,4,8;2,128,4,8;8,128,4,8;2,256,4,8;4,128,8,8;4,128,4,16;4,128,4,4"


def bench_tile(tile: configs.ConvTile, orders, x, w, b, dy, want, reps: int) -> dict:
    """One tile: its error against ``want`` (the torch backend's y, dx, dw, db in fp32) and its times."""
    leaves = (x, w, b)
    with configs.override(conv_forward=tile, conv_backward=tile):

        def forward():
            return causal_conv(x, w, b, orders=orders, backend="triton")

        y = forward()
        grads = torch.autograd.grad(y, leaves, dy, retain_graph=True)
        err = max(
            ((got.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-6)).item()
            for got, ref in zip((y, *grads), want, strict=True)
        )
        with torch.no_grad():
            fwd_ms, _ = scan_gpu.cuda_time(forward, reps)
        bwd_ms, _ = scan_gpu.cuda_time(lambda: torch.autograd.grad(y, leaves, dy, retain_graph=True), reps)
    n = x.numel() * x.element_size()
    K = len(orders)
    fwd_bytes, bwd_bytes = (1 + K) * n, (2 + K) * n
    return {"tile": [tile.sub, tile.block_p, tile.num_warps, tile.steps], "fwd_ms": fwd_ms, "bwd_ms": bwd_ms,
            "fwd_GBps": fwd_bytes / fwd_ms / 1e6, "bwd_GBps": bwd_bytes / bwd_ms / 1e6, "max_rel_err": err}  # fmt: skip


def run(spatial, channels: int, batch: int, dtype: torch.dtype, orders, tiles, device: str, reps: int) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(0)
    K = len(orders)
    x = torch.randn(batch, channels, *spatial, generator=g, device=device).to(dtype).requires_grad_()
    w = (torch.randn(K, channels, 4, generator=g, device=device) * 0.5).requires_grad_()
    b = torch.randn(K, channels, generator=g, device=device).requires_grad_()
    dy = torch.randn(batch, K, channels, *spatial, generator=g, device=device).to(dtype)
    ref_leaves = [t.detach().float().requires_grad_() for t in (x, w, b)]
    y_ref = causal_conv(*ref_leaves, orders=orders, backend="torch")
    want = (y_ref.detach(), *torch.autograd.grad(y_ref, ref_leaves, dy.float()))
    del y_ref
    rows = []
    for tile in tiles:
        row = bench_tile(tile, orders, x, w, b, dy, want, reps)
        rows.append(row)
        print(f"tile {tuple(row['tile'])}: fwd {row['fwd_ms']:.3f} ms ({row['fwd_GBps']:.0f} GB/s), bwd "
              f"{row['bwd_ms']:.3f} ms ({row['bwd_GBps']:.0f} GB/s), err {row['max_rel_err']:.1e}",
              flush=True)  # fmt: skip
    return rows


def markdown(info: dict, rows: list[dict]) -> str:
    lines = [f"Card: {info['card']}, torch {info['torch']}; shape {info['shape']}. Command: `{info['command']}`.", "",
             "| tile (SUB, BLOCK_P, warps, steps) | fwd ms | fwd GB/s | bwd ms | bwd GB/s | max rel err vs torch |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {tuple(r['tile'])} | {r['fwd_ms']:.3f} | {r['fwd_GBps']:.0f} | {r['bwd_ms']:.3f} | "
              f"{r['bwd_GBps']:.0f} | {r['max_rel_err']:.1e} |" for r in rows]  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_tiles(text: str) -> list[configs.ConvTile]:
    """``SUB,BLOCK_P,WARPS[,STEPS]`` tiles separated by ``;``."""
    return [configs.ConvTile(*(int(v) for v in part.split(","))) for part in text.split(";") if part]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for conv_gpu.json and conv_gpu.md")
    ap.add_argument("--tiles", default=DEFAULT_TILES, help="tiles to time, SUB,BLOCK_P,WARPS[,STEPS] separated by ';'")
    ap.add_argument("--spatial", default="64,64,64", help="the feature map's spatial shape")
    ap.add_argument("--channels", type=int, default=96, help="channels (the mixer's d_inner)")
    ap.add_argument("--batch", type=int, default=2, help="batch size")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16", help="dtype of x and dy")
    ap.add_argument("--orders", default="raster,reversed,slice", help=f"the scan orders, of {', '.join(ORDERS)}")
    ap.add_argument("--reps", type=int, default=20, help="timed calls per pass and tile")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    spatial = tuple(int(s) for s in args.spatial.split(","))
    tiles = parse_tiles(args.tiles)
    try:
        orders = tuple(ORDERS[name] for name in args.orders.split(","))
    except KeyError as e:
        sys.exit(f"--orders: unknown order {e.args[0]!r}; known: {', '.join(ORDERS)}")
    if args.dry_run:
        device, spatial, channels, batch, reps, dtype = "cpu", (3, 4, 5), 3, 1, 1, torch.float32
        tiles = tiles[:2]
    elif not torch.cuda.is_available():
        sys.exit("conv_gpu.py needs a CUDA device (or --dry-run)")
    else:
        device, channels, batch, reps = "cuda", args.channels, args.batch, args.reps
    scan_gpu.DEVICE = device
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)"
    command = "python benchmarks/conv_gpu.py " + " ".join(sys.argv[1:])
    info = {"card": card, "torch": torch.__version__, "command": command,
            "shape": f"batch {batch}, {channels} channels, {spatial}, {args.dtype if device == 'cuda' else 'fp32'}, "
                     f"orders {args.orders}"}  # fmt: skip
    print(json.dumps(info), flush=True)
    rows = run(spatial, channels, batch, dtype, orders, tiles, device, reps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "conv_gpu.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    text = markdown(info, rows)
    (out / "conv_gpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
