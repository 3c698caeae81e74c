"""GPU check of the planner's memory model: does the planned patch/batch fit the budget it was planned for?

One call. Builds the MNI demo dataset at 1 mm (brain-sized images, so the planner has to shrink patches to the
budget), runs ``plan_and_preprocess(..., preprocess=False)`` on the CPU, then for every configuration of the plans
(nnU-Net's conv U-Net and ours) and for the paper presets builds the network through nnunetv2's
``get_network_from_plans`` (as nnU-Net's trainer does), and runs training steps on the GPU: bf16 autocast,
nnU-Net's Dice + CE loss with its deep-supervision weights, SGD (momentum 0.99, Nesterov), grad-norm clip 12.
Reports ``torch.cuda.max_memory_allocated`` (and reserved) against the model's estimate and the budget, one JSON
line per configuration; the last line is a summary.

    python benchmarks/plan_memory_gpu.py                        # 8 GB budget, every network, presets too
    python benchmarks/plan_memory_gpu.py --gpu-memory-gb 24 --networks segmamba --no-presets
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

GiB = 2**30
PRESETS = ("segmamba_brats", "umamba_bot_3d", "umamba_enc_3d")


def nnunet_loss(outputs: list[torch.Tensor], batch_dice: bool):
    """nnU-Net's training loss: Dice + CE per output, weights 1/2^i with the lowest resolution at 0, normalised."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False},
        {},
        weight_ce=1,
        weight_dice=1,
        ignore_label=None,
        dice_class=MemoryEfficientSoftDiceLoss,
    )
    if len(outputs) == 1:
        return loss
    weights = [1 / 2**i for i in range(len(outputs))]
    weights[-1] = 0
    total = sum(weights)
    return DeepSupervisionWrapper(loss, [w / total for w in weights])


def measure(factory, patch, batch, in_channels, classes, steps: int, batch_dice: bool = False) -> dict:
    """Peak GPU memory and time per step of ``steps`` training steps (after one warm-up step)."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    device = torch.device("cuda")
    net = factory().to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    x = torch.randn(batch, in_channels, *patch, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        shapes = [o.shape[2:] for o in _as_list(net(x[:1]))]
    targets = [torch.randint(0, classes, (batch, 1, *s), device=device).float() for s in shapes]
    loss_fn = nnunet_loss([None] * len(shapes), batch_dice)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            outputs = _as_list(net(x))
            loss = loss_fn(outputs if len(outputs) > 1 else outputs[0], targets if len(outputs) > 1 else targets[0])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        optimizer.step()
        torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - start)
    return {
        "measured_allocated_gib": torch.cuda.max_memory_allocated() / GiB,
        "measured_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
        "step_ms": 1000 * sorted(times)[len(times) // 2],
        "loss": float(loss),
    }


def _as_list(out):
    return list(out) if isinstance(out, (list, tuple)) else [out]


def check(name: str, network: str, factory, patch, batch, in_channels, classes, budget_gib, steps, dry_run) -> dict:
    from medmamba.plans.memory import CONTEXT_BYTES, estimate

    est = estimate(factory, patch, batch, in_channels=in_channels)
    row = {
        "configuration": name,
        "network": network,
        "patch_size": list(patch),
        "batch_size": batch,
        "budget_gib": budget_gib,
        "estimate_allocated_gib": est.allocated_bytes / GiB,
        "estimate_device_gib": est.device_bytes / GiB,
    }
    if dry_run:
        return row
    try:
        row.update(measure(factory, patch, batch, in_channels, classes, steps))
    except torch.cuda.OutOfMemoryError as err:
        row.update({"oom": True, "error": str(err).splitlines()[0]})
    else:
        row["estimate_over_measured"] = row["estimate_allocated_gib"] / row["measured_allocated_gib"]
        # what the card needs: the allocator's reservation plus the CUDA context (outside the allocator's books)
        row["fits_budget"] = row["measured_reserved_gib"] + CONTEXT_BYTES / GiB <= budget_gib if budget_gib else None
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu-memory-gb", type=float, default=8.0, help="the planning budget (GiB)")
    parser.add_argument("--networks", nargs="+", default=None, help="networks to plan (default: all available)")
    parser.add_argument("--cases", type=int, default=4, help="demo dataset cases")
    parser.add_argument("--spacing", type=float, default=1.0, help="demo dataset spacing (mm, isotropic)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per configuration")
    parser.add_argument("--no-presets", action="store_true", help="skip the paper presets")
    parser.add_argument("--workdir", default=None, help="where the dataset and plans go (default: a temp folder)")
    parser.add_argument("--dry-run", action="store_true", help="plan and estimate only (no GPU needed)")
    parser.add_argument(
        "--export-rows",
        type=Path,
        default=None,
        help="also write every configuration (network class, arch kwargs, patch, batch, estimate, budget) to this "
        "JSON file, for `benchmarks/networks_gpu.py --plan-rows` on a GPU machine without nnunetv2",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available() and not args.dry_run:
        sys.exit("needs a CUDA device (or --dry-run)")

    from functools import partial

    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medmamba.io.datasets.demo import build_demo_segmentation
    from medmamba.networks import build
    from medmamba.plans import load_preset, plan_and_preprocess

    work = Path(args.workdir or tempfile.mkdtemp(prefix="plan_memory_gpu-"))
    spacing = (args.spacing,) * 3
    raw = build_demo_segmentation(work / "raw", num_cases=args.cases, num_test=0, spacing=spacing, overwrite=True)
    start = time.perf_counter()
    result = plan_and_preprocess(
        raw, work / "preprocessed", networks=args.networks, gpu_memory_gb=args.gpu_memory_gb, preprocess=False,
        foreground_samples=1e6,
    )  # fmt: skip
    print(json.dumps({"planned_in_s": time.perf_counter() - start, "plans_file": str(result.plans_file)}), flush=True)

    manager = PlansManager(str(result.plans_file))
    dataset_json = json.loads((raw / "dataset.json").read_text())
    channels = len(dataset_json["channel_names"])
    classes = manager.get_label_manager(dataset_json).num_segmentation_heads
    rows = []
    for name in manager.available_configurations:
        config = manager.get_configuration(name)
        factory = partial(
            get_network_from_plans,
            config.network_arch_class_name,
            config.network_arch_init_kwargs,
            config.network_arch_init_kwargs_req_import,
            channels,
            classes,
            allow_init=True,
            deep_supervision=True,
        )
        network = config.network_arch_class_name.rsplit(".", 1)[-1]
        row = check(name, network, factory, config.patch_size, config.batch_size, channels, classes,
                    args.gpu_memory_gb, args.steps, args.dry_run)  # fmt: skip
        row.update(
            network_class=config.network_arch_class_name,
            arch_kwargs=config.network_arch_init_kwargs,
            arch_kwargs_requires_import=list(config.network_arch_init_kwargs_req_import),
            in_channels=channels,
            num_classes=classes,
        )
        rows.append(row)
        print(json.dumps(row), flush=True)
    if not args.no_presets:
        for name in PRESETS:
            preset = load_preset(name)
            kwargs = {**preset.build_kwargs(), "deep_supervision": True}
            row = check(f"preset:{name}", preset.network, partial(build, preset.network, **kwargs), preset.patch_size,
                        preset.batch_size, preset.in_channels, preset.out_channels, None, args.steps,
                        args.dry_run)  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.export_rows:
        args.export_rows.write_text(json.dumps([r for r in rows if "network_class" in r], indent=1))
    ratios = [r["estimate_over_measured"] for r in rows if "estimate_over_measured" in r]
    ours = [r for r in rows if r["budget_gib"] and r["network"] in ("UMambaBot", "UMambaEnc", "SegMamba")]
    summary = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (dry run)",
        "torch": torch.__version__,
        "budget_gib": args.gpu_memory_gb,
        "configurations": len(rows),
        "oom": [r["configuration"] for r in rows if r.get("oom")],
        "over_budget": [r["configuration"] for r in rows if r.get("fits_budget") is False],
        "estimate_over_measured_min": min(ratios) if ratios else math.nan,
        "estimate_over_measured_max": max(ratios) if ratios else math.nan,
        "our_configurations_fit": all(r.get("fits_budget") for r in ours) if ours and not args.dry_run else None,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
