"""Training-iteration time and peak memory of the registration and video engines (issue 7, point 5).

One call measures what ``medmamba train`` runs per iteration, with each paper's recipe:

* **MambaMorph** (``networks.md`` §6) at 160×192×224 (the issue's size) and 176×208×192 (SR-Reg's, the spec's):
  one pair per step, ``RegistrationObjective`` with the paper's loss (soft Dice of the warped one-hot labels, 19
  label classes as SR-Reg's, + 0.1 × gradient-L2 of the velocity), Adam 1e-4, bf16 autocast (the recipe's AMP);
  and MambaMorphFeat with the contrastive term (0.001);
* **Vivim** (``networks.md`` §5) on clips of 5 × 256 × 256 RGB frames, batch 8 (the paper's) and batch 1: the
  structure loss on the centre frames, Adam 1e-4, fp32 (the recipe's);

plus one batch-1 inference (``torch.no_grad``). Each configuration runs in a fresh process (clean peak-memory
statistics): median of ``--steps`` timed iterations after ``--warmup`` (CUDA events on the GPU, wall clock on the
CPU); memory = ``max_memory_allocated`` (reserved in brackets) on the GPU, the process's peak RSS on the CPU
(there for training only: the RSS peak never comes down).
Inputs are random, already on the device. Scans run on the best backend available (triton on CUDA, torch on CPU).

Run on the device: ``python benchmarks/regvideo_gpu.py --out $OUT`` (prints JSON, then a Markdown table; writes
``regvideo_gpu.json`` / ``regvideo_gpu.md`` under ``--out``). ``--device cpu --cpu-sizes`` measures the reduced
CPU configurations recorded in RESULTS.md; ``--quick`` shrinks everything for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# name, network, constructor kwargs, batch, input shape per sample, loss weights / recipe
GPU_ROWS = [
    ("MambaMorph 160×192×224", "mambamorph", {}, 1, (160, 192, 224), {"dice": 1.0, "smoothness": 0.1}),
    ("MambaMorph 176×208×192 (SR-Reg)", "mambamorph", {}, 1, (176, 208, 192), {"dice": 1.0, "smoothness": 0.1}),
    ("MambaMorphFeat 160×192×224", "mambamorph_feat", {}, 1, (160, 192, 224),
     {"dice": 1.0, "smoothness": 0.1, "contrastive": 0.001}),
    ("Vivim 5×256×256, batch 8", "vivim", {}, 8, (5, 256, 256), None),
    ("Vivim 5×256×256, batch 1", "vivim", {}, 1, (5, 256, 256), None),
]  # fmt: skip
CPU_ROWS = [
    ("MambaMorph 64×64×64 (CPU)", "mambamorph", {}, 1, (64, 64, 64), {"dice": 1.0, "smoothness": 0.1}),
    ("MambaMorph 96×112×96 (CPU)", "mambamorph", {}, 1, (96, 112, 96), {"dice": 1.0, "smoothness": 0.1}),
    ("Vivim 5×128×128, batch 1 (CPU)", "vivim", {}, 1, (5, 128, 128), None),
    ("Vivim 5×256×256, batch 1 (CPU)", "vivim", {}, 1, (5, 256, 256), None),
]  # fmt: skip
NUM_LABELS = 19  # SR-Reg's label values incl. background (networks.md §6.7)


def measure(row: tuple, device: torch.device, *, warmup: int, steps: int, quick: bool) -> dict:
    """One configuration's training iteration and inference: times (ms) and peak memory (MiB)."""
    from medmamba import networks
    from medmamba.engines.recipes import recipe_for
    from medmamba.engines.training import amp_policy, make_optimizer

    label, name, kwargs, batch, shape, weights = row
    if quick:
        shape = (2, 64, 64) if name == "vivim" else (32, 32, 32)
        kwargs = {"embed_dim": 12, "reg_head_channels": 4} if name != "vivim" else kwargs
    recipe = recipe_for(name)
    amp = amp_policy(device, recipe.amp_dtype)
    torch.manual_seed(0)
    if name == "vivim":
        net = networks.build(name, spatial_dims=2, in_channels=3, out_channels=1, **kwargs).to(device)
        step_module, batch_args = _video_step(net, batch, shape, device)
    else:
        net = networks.build(name, spatial_dims=3, in_channels=1, out_channels=3, **kwargs).to(device)
        step_module, batch_args = _registration_step(net, weights, batch, shape, device)
    optimizer = make_optimizer("adam", net.parameters(), lr=recipe.initial_lr)
    scaler = torch.GradScaler("cuda") if amp.grad_scaler else None

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
            loss = step_module(batch_args)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    net.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    train_ms = _times(step, device, warmup, steps)
    loss = step()
    memory = _peak(device)
    net.eval()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    one = _first(batch_args)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp.dtype, enabled=amp.enabled):
        infer_ms = _times(lambda: net(*one), device, 1, max(3, steps // 2))
    # the CPU's peak RSS only grows: after the training steps it says nothing about inference
    infer_memory = _peak(device) if device.type == "cuda" else (None, None)
    return {
        "row": label,
        "network": name,
        "parameters": sum(p.numel() for p in net.parameters()),
        "batch": batch,
        "input": list(shape),
        "precision": amp.name,
        "train_ms_median": statistics.median(train_ms),
        "train_ms_all": train_ms,
        "train_memory_mib": memory[0],
        "train_reserved_mib": memory[1],
        "infer_ms_median": statistics.median(infer_ms),
        "infer_memory_mib": infer_memory[0],
        "loss": loss,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
    }


def _registration_step(net, weights, batch, shape, device):
    from medmamba.engines.registration.train import RegistrationObjective

    objective = RegistrationObjective(net, weights, num_classes=NUM_LABELS).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    moving, fixed = (torch.rand(batch, 1, *shape, generator=g, device=device) for _ in range(2))
    labels = [torch.randint(0, NUM_LABELS, (batch, 1, *shape), generator=g, device=device) for _ in range(2)]
    return (lambda b: objective(b)[0]), (moving, fixed, labels[0], labels[1])


def _video_step(net, batch, shape, device):
    from medmamba.engines.video.train import normalize_clip, structure_loss

    frames, h, w = shape
    g = torch.Generator(device=device).manual_seed(0)
    clips = normalize_clip(torch.rand(batch, frames, 3, h, w, generator=g, device=device), "imagenet")
    masks = (torch.rand(batch, 1, h, w, generator=g, device=device) > 0.5).float()

    def loss(b):
        x, y = b
        logits = net(x).unflatten(0, (x.shape[0], x.shape[1]))[:, x.shape[1] // 2]
        return structure_loss(logits, y)

    return loss, (clips, masks)


def _first(batch_args):
    if len(batch_args) == 2:  # video: (clips, masks)
        return (batch_args[0][:1],)
    return (batch_args[0][:1], batch_args[1][:1])


def _times(fn, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return times


def _peak(device: torch.device) -> tuple[float, float | None]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, torch.cuda.max_memory_reserved(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None  # Linux: KiB


def table(results: list[dict]) -> str:
    lines = [
        (
            "| configuration | params | precision | train iteration (median) | train peak memory | inference b1 | "
            "inference memory |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['row']} | | | failed: {r['error'][:80]} | | | |")
            continue
        reserved = f" ({r['train_reserved_mib']:,.0f})" if r["train_reserved_mib"] is not None else ""
        lines.append(
            f"| {r['row']} | {r['parameters'] / 1e6:.2f} M | {r['precision']} | {_ms(r['train_ms_median'])} | "
            f"{r['train_memory_mib']:,.0f} MiB{reserved} | {_ms(r['infer_ms_median'])} | "
            f"{_mib(r['infer_memory_mib'])} |"
        )
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f} MiB"


def _ms(value: float) -> str:
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for regvideo_gpu.json / .md")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    parser.add_argument("--cpu-sizes", action="store_true", help="the reduced CPU configurations")
    parser.add_argument("--quick", action="store_true", help="tiny inputs and networks: a smoke test")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--row", type=int, default=None, help=argparse.SUPPRESS)  # one row, in a child process
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
    if args.device == "auto" and not torch.cuda.is_available():
        device = torch.device("cpu")
    rows = CPU_ROWS if args.cpu_sizes else GPU_ROWS
    if args.row is not None:
        print(json.dumps(measure(rows[args.row], device, warmup=args.warmup, steps=args.steps, quick=args.quick)))
        return
    results = []
    for index, row in enumerate(rows):
        command = [sys.executable, __file__, "--row", str(index), "--device", device.type,
                   "--warmup", str(args.warmup), "--steps", str(args.steps)]  # fmt: skip
        command += ["--cpu-sizes"] * args.cpu_sizes + ["--quick"] * args.quick
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode == 0 and lines:
            results.append(json.loads(lines[-1]))
        else:
            error = (done.stderr.strip().splitlines() or ["no output"])[-1]
            results.append({"row": row[0], "error": error})
        print(f"{row[0]}: {results[-1].get('error', 'done')}", file=sys.stderr)
    text = table(results)
    print(json.dumps(results, indent=1))
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "regvideo_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / "regvideo_gpu.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
