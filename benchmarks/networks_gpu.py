"""GPU training-step and inference time and peak memory of each network at its paper input size.

Measured as networks.md §10 measured the official SegMamba and U-Mamba_Bot on an H100, so the rows compare
directly: training step = forward + loss + backward + grad-norm clip 12 + SGD (Nesterov, momentum 0.99), random
input already on the GPU, median of 12 CUDA-event-timed steps after 3 warm-ups; memory = max_memory_allocated
(reserved in brackets); inference = one batch-1 forward under torch.no_grad, no sliding window, no TTA.
Scans run on the best backend available (triton on CUDA).

Run on the device: ``python benchmarks/networks_gpu.py --out $OUT`` (one call; prints a Markdown table last and
writes networks_gpu.json / networks_gpu.md under --out). ``--quick`` shrinks every input for a smoke test.

``--plan-rows FILE`` (written on a CPU machine by ``benchmarks/plan_memory_gpu.py --dry-run --export-rows FILE``)
also trains every planned configuration at its planned patch and batch, as nnU-Net's trainer would (network built
from the plans' class and kwargs with deep supervision, bf16 autocast, Dice + CE on every deep-supervision output
with nnU-Net's weights, SGD momentum 0.99 Nesterov, weight decay 3e-5, grad clip 12) and reports seconds per
iteration and peak memory against the planner's estimate and budget. The GPU image has no nnunetv2, so the loss is
written here; it holds no tensors that matter for the peak.
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


def deep_supervision_loss(outputs: list[torch.Tensor], labels: torch.Tensor, classes: int) -> torch.Tensor:
    """nnU-Net's training loss: CE + soft Dice (foreground classes) per output, weights 1/2^i, the coarsest 0."""
    weights = [1 / 2**i for i in range(len(outputs))]
    weights[-1] = 0 if len(outputs) > 1 else 1
    total = 0.0
    for weight, logits in zip(weights, outputs, strict=True):
        target = F.interpolate(labels[:, None].float(), size=logits.shape[2:], mode="nearest")[:, 0].long()
        ce = F.cross_entropy(logits.float(), target)
        probs = logits.float().softmax(1)[:, 1:]
        onehot = F.one_hot(target, classes).movedim(-1, 1)[:, 1:].float()
        dims = tuple(range(2, probs.ndim))
        dice = (2 * (probs * onehot).sum(dims) + 1e-5) / (probs.sum(dims) + onehot.sum(dims) + 1e-5)
        total = total + weight * (ce - dice.mean())
    return total / sum(weights)


def measure_plan_row(row: dict, device: torch.device, steps: int = 5) -> dict:
    """Train one planned configuration at its planned patch and batch; peak memory vs estimate and budget."""
    import pydoc

    kwargs = dict(row["arch_kwargs"])
    for key in row["arch_kwargs_requires_import"]:
        if kwargs.get(key) is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    cls = pydoc.locate(row["network_class"])
    net = cls(input_channels=row["in_channels"], num_classes=row["num_classes"], deep_supervision=True, **kwargs)
    net = net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    x = torch.randn(row["batch_size"], row["in_channels"], *row["patch_size"], device=device)
    labels = torch.randint(0, row["num_classes"], (row["batch_size"], *row["patch_size"]), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = net(x)
        loss = deep_supervision_loss(list(out) if isinstance(out, (list, tuple)) else [out], labels, row["num_classes"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        opt.step()

    torch.cuda.reset_peak_memory_stats()
    times = cuda_ms(step, 2, steps)
    allocated, reserved = torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30
    context_gib = 0.75  # CUDA context outside the allocator's books (plans.memory.CONTEXT_BYTES)
    return {
        "configuration": row["configuration"],
        "network": row["network"],
        "patch_size": row["patch_size"],
        "batch_size": row["batch_size"],
        "train_ms": statistics.median(times),
        "measured_allocated_gib": allocated,
        "measured_reserved_gib": reserved,
        "estimate_allocated_gib": row["estimate_allocated_gib"],
        "estimate_over_measured": row["estimate_allocated_gib"] / allocated,
        "budget_gib": row["budget_gib"],
        "fits_budget": reserved + context_gib <= row["budget_gib"],
    }


def plan_markdown(results: list[dict]) -> str:
    lines = [
        (
            "| configuration | patch × batch | s / iteration | peak allocated (reserved) GiB | estimate GiB | "
            "est./meas. | fits budget |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['configuration']} | | failed: {r['error']} | | | | |")
            continue
        patch = "×".join(map(str, r["patch_size"]))
        lines.append(
            f"| {r['configuration']} ({r['network']}) | {patch} × {r['batch_size']} | {r['train_ms'] / 1e3:.3f} | "
            f"{r['measured_allocated_gib']:.2f} ({r['measured_reserved_gib']:.2f}) | "
            f"{r['estimate_allocated_gib']:.2f} | "
            f"{r['estimate_over_measured']:.2f} | {'yes' if r['fits_budget'] else 'NO'} ({r['budget_gib']:g} GiB) |"
        )
    return "\n".join(lines)


def markdown(results: list[dict], device_name: str) -> str:
    lines = [
        (
            f"Card: {device_name}; torch {torch.__version__}; scan backend: triton; "
            f"cudnn.benchmark={torch.backends.cudnn.benchmark}. "
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
    parser.add_argument("--plan-rows", type=Path, default=None, help="planned configurations to train (see above)")
    parser.add_argument(
        "--no-cudnn-benchmark",
        action="store_true",
        help="leave cuDNN's algorithm search off (nnU-Net's trainer turns it on; off, fp16/bf16 3D convolutions "
        "can fall back to slow algorithms)",
    )
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = not args.no_cudnn_benchmark
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
    plan_results = []
    for row in json.loads(args.plan_rows.read_text()) if args.plan_rows else []:
        try:
            result = measure_plan_row(row, device)
        except Exception as err:
            traceback.print_exc()
            result = {"configuration": row["configuration"], "error": f"{type(err).__name__}: {err}"[:200]}
        print(json.dumps(result), flush=True)
        plan_results.append(result)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "networks_gpu.json").write_text(json.dumps({"networks": results, "plans": plan_results}, indent=1))
    table = markdown(results, torch.cuda.get_device_name())
    if plan_results:
        table += "\n\nPlanned configurations (bf16, deep supervision, Dice + CE):\n\n" + plan_markdown(plan_results)
    (args.out / "networks_gpu.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
