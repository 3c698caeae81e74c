"""Seconds per training iteration and peak GPU memory of `medmamba train`, per network (issue 6, point 5).

What is timed is ``MedmambaTrainer.train_step`` itself — the step `medmamba train` runs: the paper's recipe
(U-Mamba: Dice + CE over the deep-supervision outputs; SegMamba: CE), autocast in the recipe's AMP dtype with the
scans in fp32, backward, nnU-Net's grad-norm clip 12, SGD (Nesterov, momentum 0.99), the poly LR — on a random
batch already on the GPU, so data loading and augmentation (CPU workers) are not included. Median of ``--steps``
CUDA-event-timed steps after ``--warmup`` warm-ups; memory = ``torch.cuda.max_memory_allocated`` (reserved in
brackets), reset per row. Scans on the Triton backend unless ``--scan-backend`` says otherwise (on the CPU: the
PyTorch backend).

Rows, for U-Mamba_Bot, U-Mamba_Enc and SegMamba:

* **planned**: each network's plan preset (``medmamba.plans.load_preset``: U-Mamba 3D 48×192×192 batch 2 and 2D,
  SegMamba BraTS 128³ batch 2) — the patch and batch a plan gives them for the papers' data;
* **128³, batch 2**: the spec's comparison size (``networks.md`` §10), with the official implementations' numbers
  measured there (one H100 80GB HBM3) beside ours. Compare only rows measured on the same card kind.

Run on the device (one call, a few minutes): ``python benchmarks/train_gpu.py [--out DIR] [--results-md
benchmarks/RESULTS.md]``. Prints one JSON document, then a Markdown table; ``--results-md`` also replaces the
section between ``<!-- seg_gpu:begin -->`` and ``<!-- seg_gpu:end -->`` of that file (atomically).
``--quick --device cpu`` runs tiny rows on the CPU as a smoke test of the script itself.

On a GPU machine without nnunetv2 (the lent device image, no internet): carry the cp312 wheels that medmamba and
nnunetv2 need (nnunetv2, monai, dynamic-network-architectures, SimpleITK, nibabel, pydicom, blosc2, numexpr, ndindex,
acvl-utils, batchgenerators v1/v2, connected-components-3d) unpacked, trimmed of tests and debug info, as one
``tar.xz`` (34 MB; SimpleITK's 53 MB wheel alone would break a 64 MiB upload), unpack it into ``/tmp/site``, copy
``medmamba/``, ``kernels/`` → ``medmamba/kernels`` and ``plans/`` → ``medmamba/plans`` (pyproject's package-dir
mapping) into ``/tmp/mm``, and run ``PYTHONPATH=/tmp/mm:/tmp/site python3 -P benchmarks/train_gpu.py …`` (``-P``:
the checkout's own ``medmamba/``, which lacks the mapped packages, must not shadow ``/tmp/mm``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import platform
import statistics
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from medmamba.engines.recipes import merge_overrides, recipe_for
from medmamba.engines.segmentation.trainer import MedmambaTrainer, nnunet_environment
from medmamba.engines.training import stdout_to_log
from medmamba.io.atomic import atomic_write
from medmamba.kernels import use_backend
from medmamba.plans import load_preset

BEGIN, END = "<!-- seg_gpu:begin -->", "<!-- seg_gpu:end -->"

#: networks.md §10, the official code on one H100 80GB HBM3, batch 2, 128³: (step ms, peak allocated MiB)
OFFICIAL = {
    ("segmamba", "fp16"): (353.9, 14797),
    ("segmamba", "fp32"): (499.2, 28154),
    ("umamba_bot", "fp32"): (278.7, 21825),
    ("umamba_bot", "fp16"): (188.0, 11242),
}
PRESETS = ("umamba_bot_3d", "umamba_enc_3d", "segmamba_brats", "umamba_bot_2d", "umamba_enc_2d")
_CONV = {2: "torch.nn.modules.conv.Conv2d", 3: "torch.nn.modules.conv.Conv3d"}
_NORM = {2: "torch.nn.modules.instancenorm.InstanceNorm2d", 3: "torch.nn.modules.instancenorm.InstanceNorm3d"}


def architecture(network: str, kwargs: dict, patch: tuple[int, ...]) -> dict:
    """The plans ``architecture`` block (nnU-Net vocabulary) for a preset's canonical constructor arguments."""
    dims = len(patch)
    if network == "segmamba":
        n = len(kwargs["features_per_stage"])
        block = {"conv_op": _CONV[3], "n_stages": n, "strides": [[1, 1, 1]] + [[2, 2, 2]] * n, **kwargs}
        return {"network_class_name": "medmamba.networks.nnunet.SegMamba", "arch_kwargs": block,
                "_kw_requires_import": ["conv_op"]}  # fmt: skip
    n = len(kwargs["features_per_stage"])

    def per_axis(v) -> list[int]:
        return list(v) if isinstance(v, (list, tuple)) else [v] * dims

    def per_stage(v) -> list[list[int]]:  # one value for all stages, or one per stage (each an int or per axis)
        return [per_axis(s) for s in v] if isinstance(v, (list, tuple)) else [per_axis(v)] * n

    block = {
        "n_stages": n,
        "features_per_stage": list(kwargs["features_per_stage"]),
        "conv_op": _CONV[dims],
        "kernel_sizes": per_stage(kwargs["kernel_sizes"]),
        "strides": per_stage(kwargs["strides"]),
        "n_conv_per_stage": [kwargs.get("blocks_per_stage", 2)] * n,
        "n_conv_per_stage_decoder": [kwargs.get("blocks_per_stage_decoder", 2)] * (n - 1),
        "conv_bias": True,
        "norm_op": _NORM[dims],
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
        "version": kwargs.get("version", "2024.03"),
    }
    if network == "umamba_enc":
        block["input_size"] = list(patch)
    return {
        "network_class_name": f"medmamba.networks.nnunet.{'UMambaBot' if network == 'umamba_bot' else 'UMambaEnc'}",
        "arch_kwargs": block,
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def make_trainer(root: Path, network: str, kwargs: dict, patch, batch: int, channels: int, classes: int, device):
    """A ``MedmambaTrainer`` on a throw-away one-configuration plan (nothing is read from its dataset)."""
    name = f"Dataset999_Bench{int(time.time() * 1e6) % 10**9}"
    folder = root / "preprocessed" / name
    (folder / "bench_data").mkdir(parents=True)
    (folder / "bench_data" / "case.b2nd").write_bytes(b"")  # nnU-Net infers the dataset class from the endings
    dims = len(patch)
    plans = {
        "dataset_name": name,
        "plans_name": "benchPlans",
        "original_median_spacing_after_transp": [1.0] * 3,
        "original_median_shape_after_transp": [128] * 3,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "bench": {
                "data_identifier": "bench_data",
                "preprocessor_name": "DefaultPreprocessor",
                "batch_size": batch,
                "patch_size": list(patch),
                "median_image_size_in_voxels": list(patch),
                "spacing": [1.0] * dims,
                "normalization_schemes": ["ZScoreNormalization"] * channels,
                "use_mask_for_norm": [False] * channels,
                "resampling_fn_data": "resample_data_or_seg_to_shape",
                "resampling_fn_seg": "resample_data_or_seg_to_shape",
                "resampling_fn_data_kwargs": {},
                "resampling_fn_seg_kwargs": {},
                "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                "resampling_fn_probabilities_kwargs": {},
                "architecture": architecture(network, kwargs, tuple(patch)),
                "batch_dice": False,
            }
        },
        "experiment_planner_used": "benchmarks/train_gpu.py",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
        "continue_training": False,
    }
    dataset_json = {
        "channel_names": {str(i): "MR" for i in range(channels)},
        "labels": {"background": 0, **{f"class_{i}": i for i in range(1, classes)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    with (
        nnunet_environment(preprocessed=root / "preprocessed", results=root / "results", num_workers=0),
        stdout_to_log(logging.getLogger("bench")),
    ):
        return MedmambaTrainer(plans, "bench", 0, dataset_json, device)


def synthetic_batch(trainer: MedmambaTrainer, patch, batch: int, channels: int, classes: int, device) -> dict:
    generator = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randn(batch, channels, *patch, generator=generator).to(device)
    target = torch.randint(0, classes, (batch, 1, *patch), generator=generator).float().to(device)
    scales = trainer._get_deep_supervision_scales()
    if scales is None:
        return {"data": data, "target": target}
    targets = []
    for scale in scales:  # nnU-Net's DownsampleSegForDSTransform: nearest, round(size · scale)
        size = [round(s * f) for s, f in zip(patch, scale, strict=True)]
        targets.append(torch.nn.functional.interpolate(target, size=size, mode="nearest-exact"))
    return {"data": data, "target": targets}


def measure(row: dict, args: argparse.Namespace, device: torch.device) -> dict:
    network, patch, batch = row["network"], tuple(row["patch"]), row["batch"]
    result = {**row, "amp": row["amp"], "scan_backend": args.scan_backend}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainer = make_trainer(
                Path(tmp), network, row["kwargs"], patch, batch, row["in_channels"], row["classes"], device
            )
            overrides = {"batch_size": batch, "amp_dtype": row["amp"], "num_epochs": 1000, "iterations_per_epoch": 250}
            trainer.set_recipe(merge_overrides(recipe_for(network), overrides))
            with stdout_to_log(logging.getLogger("bench")):
                trainer.initialize()
            trainer.network.train()
            trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
            trainer.on_train_epoch_start()
            data = synthetic_batch(trainer, patch, batch, row["in_channels"], row["classes"], device)
            result["parameters_m"] = round(sum(p.numel() for p in trainer.network.parameters()) / 1e6, 2)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            times, losses = [], []
            for i in range(args.warmup + args.steps):
                if device.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = trainer.train_step(data)
                    end.record()
                    torch.cuda.synchronize()
                    elapsed = start.elapsed_time(end) / 1e3
                else:
                    started = time.perf_counter()
                    out = trainer.train_step(data)
                    elapsed = time.perf_counter() - started
                losses.append(float(out["loss"]))
                if i >= args.warmup:
                    times.append(elapsed)
            result["s_per_iteration"] = round(statistics.median(times), 4)
            result["loss_finite"] = bool(np.isfinite(losses).all())
            if device.type == "cuda":
                result["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
                result["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20)
        except torch.OutOfMemoryError:
            result["error"] = "out of memory"
        except Exception as err:  # keep measuring the other rows; the traceback goes to the JSON
            result["error"] = f"{type(err).__name__}: {err}"
            result["traceback"] = traceback.format_exc(limit=6)
        finally:
            with contextlib.suppress(NameError):
                del trainer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    comparable = row["setting"].endswith("128³, batch 2") and not args.quick
    official = OFFICIAL.get((network, row["amp"])) if comparable else None
    if official:
        result["official_s_per_iteration"], result["official_peak_allocated_mib"] = official[0] / 1e3, official[1]
    return result


def rows(args: argparse.Namespace) -> list[dict]:
    out = []
    for name in args.presets:
        preset = load_preset(name)
        kwargs = {**preset.network_kwargs, **args.network_kwargs}
        base = {"network": preset.network, "kwargs": kwargs, "in_channels": preset.in_channels,
                "classes": preset.out_channels}  # fmt: skip
        planned = (tuple(preset.patch_size), preset.batch_size)
        if planned == ((128, 128, 128), 2):  # SegMamba's plan is the comparison size: one row
            settings = [("planned = 128³, batch 2", *planned)]
        else:
            settings = [("planned", *planned)]
            if len(preset.patch_size) == 3:
                settings.append(("128³, batch 2", (128, 128, 128), 2))
        if args.network_kwargs:  # rows measured with changed constructor arguments say so
            changed = ", ".join(f"{k}={v}" for k, v in args.network_kwargs.items())
            settings = [(f"{label}, {changed}", *rest) for label, *rest in settings]
        if args.quick:  # smoke test: shrink everything
            kwargs.update(_quick_kwargs(preset.network, len(preset.patch_size)))
            settings = [(s, (32,) * len(preset.patch_size), 2) for s, _, _ in settings[:1]]
        out.extend(
            {**base, "preset": name, "setting": setting, "patch": list(patch), "batch": batch, "amp": amp}
            for setting, patch, batch in settings
            for amp in args.amp
        )
    return out


def _network_kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. ssm_fp32=false")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a plain string


def _quick_kwargs(network: str, dims: int) -> dict:
    if network == "segmamba":
        return {"features_per_stage": (8, 16), "depths": (1, 1), "hidden_size": 32}
    return {"features_per_stage": (8, 16, 32), "strides": (1, 2, 2), "kernel_sizes": (3, 3, 3),
            "blocks_per_stage": 1, "blocks_per_stage_decoder": 1}  # fmt: skip


def markdown(results: list[dict], header: str) -> str:
    lines = [
        header,
        "",
        "| network | setting | patch × batch | AMP | params (M) | s / iteration | peak MiB (reserved) | official §10 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        patch = "×".join(map(str, r["patch"])) + f" × {r['batch']}"
        if "error" in r:
            measured, memory = r["error"], "-"
        else:
            measured = f"{r['s_per_iteration']:.3f}"
            memory = f"{r['peak_allocated_mib']:,} ({r['peak_reserved_mib']:,})" if "peak_allocated_mib" in r else "-"
        official = (
            f"{r['official_s_per_iteration']:.3f} s, {r['official_peak_allocated_mib']:,} MiB"
            if "official_s_per_iteration" in r
            else "-"
        )
        lines.append(
            f"| {r['network']} | {r['setting']} | {patch} | {r['amp']} | {r.get('parameters_m', '-')} | {measured} | "
            f"{memory} | {official} |"
        )
    return "\n".join(lines) + "\n"


def _row_key(r: dict) -> tuple:
    return (r["preset"], r["setting"], r["amp"])


def merged(earlier: dict, results: list[dict], card: str) -> list[dict]:
    """``results`` plus the rows of an earlier run (same card only) that were not measured again, in preset order."""
    if earlier.get("device") != card:
        raise SystemExit(f"--merge: the earlier run is from {earlier.get('device')!r}, this one from {card!r}")
    fresh = {_row_key(r) for r in results}
    rows_all = [r for r in earlier["results"] if _row_key(r) not in fresh] + results
    return sorted(rows_all, key=lambda r: PRESETS.index(r["preset"]))


def write_section(path: Path, body: str) -> None:
    text = path.read_text() if path.is_file() else "# Benchmark results\n"
    section = f"{BEGIN}\n{body}{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with atomic_write(path) as tmp:
        tmp.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (with --quick: smoke test)")
    parser.add_argument("--amp", nargs="+", default=["bf16", "fp16", "fp32"], choices=("bf16", "fp16", "fp32"))
    parser.add_argument(
        "--scan-backend",
        default=None,
        choices=("triton", "torch", "auto"),
        help="default: triton on cuda, torch on cpu",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--quick", action="store_true", help="tiny inputs and networks (smoke test)")
    parser.add_argument(
        "--set",
        dest="network_kwargs",
        metavar="KEY=VALUE",
        nargs="+",
        type=_network_kwarg,
        default=[],
        help="network constructor arguments over the presets' (VALUE as JSON: --set ssm_fp32=false)",
    )
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS, help="presets to measure")
    parser.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="a train_gpu.json of an earlier run on the same card: its rows that this run does not measure are kept",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write train_gpu.json / train_gpu.md here")
    parser.add_argument("--results-md", type=Path, default=None, help="replace the seg_gpu section of this file")
    args = parser.parse_args()
    args.network_kwargs = dict(args.network_kwargs)
    logging.basicConfig(level=logging.WARNING)
    device = torch.device(args.device)
    if args.scan_backend is None:  # Triton needs CUDA tensors: the CPU smoke test scans with the PyTorch backend
        args.scan_backend = "triton" if device.type == "cuda" else "torch"
    torch.backends.cudnn.benchmark = device.type == "cuda"
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    results = []
    with use_backend(args.scan_backend):
        for row in rows(args):
            results.append(measure(row, args, device))
            shown = {k: v for k, v in results[-1].items() if k not in ("kwargs", "traceback")}
            print(json.dumps(shown), flush=True)
    versions = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    if args.merge is not None:
        results = merged(json.loads(args.merge.read_text()), results, card)
    header = (
        f"## Training iteration of `medmamba train` per network (`benchmarks/train_gpu.py`)\n\n"
        f"Device: {card} ({versions}); scans: {args.scan_backend} backend; median of {args.steps} steps after "
        f"{args.warmup} warm-ups; `MedmambaTrainer.train_step` on a random batch on the device (no data loading). "
        f"Official: networks.md §10 (the authors' code, H100 80GB HBM3) — comparable only on the same card kind."
    )
    table = markdown(results, header)
    document = {"device": card, "versions": versions, "scan_backend": args.scan_backend, "results": results}
    print(json.dumps(document, indent=1, default=str))
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_gpu.json").write_text(json.dumps(document, indent=1, default=str))
        (args.out / "train_gpu.md").write_text(table)
    if args.results_md is not None:
        write_section(args.results_md, table)


if __name__ == "__main__":
    main()
