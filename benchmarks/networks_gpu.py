"""GPU training-step and inference time and peak memory of each network at its paper input size.

Measured as networks.md §10 measured the official SegMamba and U-Mamba_Bot on an H100, so the rows compare
directly: training step = forward + loss + backward + grad-norm clip 12 + SGD (Nesterov, momentum 0.99), random
input already on the GPU, median of 12 CUDA-event-timed steps after 3 warm-ups; memory = max_memory_allocated
(reserved in brackets); inference = one batch-1 forward under torch.no_grad, no sliding window, no TTA.
Scans run on the best backend available (triton on CUDA).

Run on the device: ``python benchmarks/networks_gpu.py --out $OUT`` (one call; prints a Markdown table last and
writes networks_gpu.json / networks_gpu.md under --out). ``--quick`` shrinks every input for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from medmamba import networks
from medmamba.kernels import available_backends

UMAMBA_3D = {  # networks.md §3.5: 3D, 6 stages 32…320, first kernel 1×3×3 (1 → 14)
    "features_per_stage": (32, 64, 128, 256, 320, 320),
    "strides": (1, (1, 2, 2), 2, 2, 2, (1, 2, 2)),
    "kernel_sizes": ((1, 3, 3), 3, 3, 3, 3, 3),
}

# name, registry name, constructor kwargs, batch, input shape per sample, task, dtypes (None = fp32)
ROWS = [
    ("SegMamba (4→4)", "segmamba", {"in_channels": 4, "out_channels": 4}, 2, (4, 128, 128, 128), "seg",
     ("float16", None)),
    ("U-Mamba_Bot-3D, §3.5 config (1→14)", "umamba_bot",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 14, **UMAMBA_3D}, 2, (1, 128, 128, 128), "seg",
     (None, "float16", "bfloat16")),
    ("U-Mamba_Enc-3D, §3.5 config (1→14)", "umamba_enc",
     {"spatial_dims": 3, "in_channels": 1, "out_channels": 14, **UMAMBA_3D, "input_size": (128, 128, 128)}, 2,
     (1, 128, 128, 128), "seg", ("bfloat16", "float16")),
    ("Vivim (3→1), clip 5×256²", "vivim", {"in_channels": 3, "out_channels": 1}, 2, (5, 3, 256, 256), "video",
     (None, "bfloat16")),
    ("MambaMorph", "mambamorph", {}, 1, (1, 160, 192, 224), "reg", ("float16", None)),
    ("MambaMorph + feature extractor", "mambamorph_feat", {}, 1, (1, 160, 192, 224), "reg", ("float16",)),
]  # fmt: skip


def loss_of(task: str, out, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "reg":
        warped, ddf = out
        return F.mse_loss(warped.float(), target) + 0.01 * ddf.float().square().mean()
    logits = out[0] if isinstance(out, (list, tuple)) else out
    if task == "video":
        return F.binary_cross_entropy_with_logits(logits.float(), target)
    return F.cross_entropy(logits.float(), target)


def inputs(task: str, batch: int, shape: tuple[int, ...], out_channels: int, device: torch.device):
    x = torch.randn(batch, *shape, device=device)
    if task == "reg":
        return (x, torch.randn_like(x)), torch.rand_like(x)
    if task == "video":
        t, _, h, w = shape
        return (x,), (torch.rand(batch * t, 1, h, w, device=device) > 0.5).float()
    return (x,), torch.randint(0, out_channels, (batch, *shape[1:]), device=device)


def cuda_ms(fn, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def measure(row, dtype_name, device, quick: bool) -> dict:
    label, name, kwargs, batch, shape, task, _ = row
    if quick:
        shape = (*shape[:-3], *(max(16, s // 4) for s in shape[-3:])) if task != "video" else (2, 3, 64, 64)
        if "input_size" in kwargs:
            kwargs = {**kwargs, "input_size": shape[1:]}
    torch.manual_seed(0)
    net = networks.build(name, **kwargs).to(device)
    params = sum(p.numel() for p in net.parameters())
    out_channels = kwargs.get("out_channels", 1)
    args, target = inputs(task, batch, shape, out_channels, device)
    opt = torch.optim.SGD(net.parameters(), lr=1e-4, momentum=0.99, nesterov=True)
    dtype = getattr(torch, dtype_name) if dtype_name else None
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = loss_of(task, net(*args), args[0], target)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        scaler.step(opt)
        scaler.update()
        return loss

    net.train()
    torch.cuda.reset_peak_memory_stats()
    train = cuda_ms(step, 1 if quick else 3, 2 if quick else 12)
    loss = float(step().detach())
    train_mem, train_reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    net.eval()
    one = tuple(a[:1] for a in args)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        infer = cuda_ms(lambda: net(*one), 1 if quick else 3, 2 if quick else 12)
    infer_mem = torch.cuda.max_memory_allocated()
    return {
        "network": label,
        "registry": name,
        "params": params,
        "dtype": f"AMP {dtype_name}" if dtype_name else "fp32",
        "batch": batch,
        "input": list(shape),
        "train_ms": statistics.median(train),
        "train_spread_ms": [min(train), max(train)],
        "train_peak_mib": train_mem / 2**20,
        "train_reserved_mib": train_reserved / 2**20,
        "infer_ms": statistics.median(infer),
        "infer_peak_mib": infer_mem / 2**20,
        "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
    }


def markdown(results: list[dict], device_name: str) -> str:
    lines = [
        (
            f"Card: {device_name}; torch {torch.__version__}; scan backend: triton. "
            "Command: `python benchmarks/networks_gpu.py --out $OUT`."
        ),
        "",
        (
            "| network | params | dtype | batch × input | train step (ms) | train peak MiB (reserved) | "
            "infer b1 (ms) | infer MiB |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['network']} | | {r['dtype']} | | failed: {r['error']} | | | |")
            continue
        shape = "×".join(map(str, r["input"]))
        lines.append(
            f"| {r['network']} | {r['params'] / 1e6:.2f} M | {r['dtype']} | {r['batch']} × {shape} | "
            f"{r['train_ms']:.1f} | {r['train_peak_mib']:,.0f} ({r['train_reserved_mib']:,.0f}) | "
            f"{r['infer_ms']:.1f} | {r['infer_peak_mib']:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(), help="folder for networks_gpu.json/.md")
    parser.add_argument("--quick", action="store_true", help="small inputs, 2 steps: a smoke test")
    parser.add_argument("--only", nargs="*", default=None, help="registry names to run (default: all)")
    args = parser.parse_args()
    device = torch.device("cuda")
    if available_backends(device)["triton"] is not None:
        raise SystemExit(f"triton backend unavailable: {available_backends(device)['triton']}")
    results = []
    for row in ROWS:
        if args.only and row[1] not in args.only:
            continue
        for dtype_name in row[6]:
            start = time.perf_counter()
            try:
                result = measure(row, dtype_name, device, args.quick)
            except Exception as err:  # one failing row must not lose the others
                traceback.print_exc()
                result = {
                    "network": row[0],
                    "dtype": dtype_name or "fp32",
                    "error": f"{type(err).__name__}: {err}"[:200],
                }
            result["wall_s"] = time.perf_counter() - start
            print(json.dumps(result), flush=True)
            results.append(result)
            torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "networks_gpu.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, torch.cuda.get_device_name())
    (args.out / "networks_gpu.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
