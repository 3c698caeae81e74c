"""CPU inference time of `medmamba predict` for one demo case, per network (issue 6, point 5).

Builds the MNI demo dataset, plans it with ``medmamba.plans.plan_and_preprocess`` (U-Mamba_Bot, U-Mamba_Enc,
SegMamba), writes for each planned configuration a model folder with freshly initialised weights (inference
time does not depend on the weights' values) and times ``medmamba.engines.segmentation.predict.predict`` on one
demo case: reading the NIfTI, nnU-Net's preprocessing, the sliding window (Gaussian weighting, step 0.5), export
to the input geometry, the atomic write. Median of ``--repeats`` runs after one warm-up, torch backend, this
process's threads. Writes the section between ``<!-- seg_cpu:begin -->`` and ``<!-- seg_cpu:end -->`` of
``benchmarks/RESULTS.md`` (atomically; other sections untouched).

Run: ``python benchmarks/seg_cpu.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from medmamba.engines.checkpoint import save_checkpoint
from medmamba.engines.segmentation.predict import predict
from medmamba.engines.segmentation.trainer import MedmambaTrainer, network_name_of
from medmamba.io.atomic import atomic_write
from medmamba.io.datasets.demo import build_demo_segmentation
from medmamba.kernels import use_backend
from medmamba.plans import plan_and_preprocess

BEGIN, END = "<!-- seg_cpu:begin -->", "<!-- seg_cpu:end -->"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
CONFIGURATIONS = ("3d_fullres_umamba_bot", "3d_fullres_umamba_enc", "3d_fullres_segmamba", "2d_umamba_bot")


def untrained_model(preprocessed: Path, configuration: str, out: Path) -> tuple[Path, int]:
    """A `medmamba train`-shaped model folder (plans, dataset.json, fold_0/checkpoint_final.pth) with initial
    weights, and the network's parameter count."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = json.loads((preprocessed / "medmambaPlans.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    manager = PlansManager(plans)
    config = manager.get_configuration(configuration)
    in_channels = determine_num_input_channels(manager, config, dataset_json)
    out_channels = manager.get_label_manager(dataset_json).num_segmentation_heads
    network = MedmambaTrainer.build_network_architecture(manager, config, in_channels, out_channels, False)
    (out / "fold_0").mkdir(parents=True)
    (out / "plans.json").write_text(json.dumps(plans))
    (out / "dataset.json").write_text(json.dumps(dataset_json))
    save_checkpoint(
        out / "fold_0" / "checkpoint_final.pth",
        {
            "network": network_name_of(config.network_arch_class_name, configuration),
            "in_channels": in_channels,
            "out_channels": out_channels,
            "network_weights": network.state_dict(),
            "init_args": {"configuration": configuration},
            "trainer_name": "MedmambaTrainer",
            "inference_allowed_mirroring_axes": list(range(len(config.patch_size))),
        },
    )
    return out, sum(p.numel() for p in network.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mirror", action="store_true", help="also time mirroring (8 passes per tile in 3D)")
    parser.add_argument("--no-write", action="store_true", help="print the section, leave RESULTS.md alone")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, use_backend("torch"):
        root = Path(tmp)
        raw = build_demo_segmentation(root / "raw")
        plan_and_preprocess(
            raw, root / "preprocessed", networks=["umamba_bot", "umamba_enc", "segmamba"], num_workers=1
        )
        preprocessed = root / "preprocessed" / raw.name
        plans = json.loads((preprocessed / "medmambaPlans.json").read_text())
        case = raw / "imagesTr" / "mni_000_0000.nii.gz"
        for configuration in CONFIGURATIONS:
            model, params = untrained_model(preprocessed, configuration, root / "models" / configuration)
            for mirror in (False, True) if args.mirror else (False,):
                times = []
                for i in range(args.repeats + 1):
                    out = root / "out" / f"{configuration}_{mirror}_{i}.nii.gz"
                    started = time.perf_counter()
                    predict(case, out, model, device="cpu", mirror=mirror)
                    if i:  # the first run is a warm-up (imports, allocator)
                        times.append(time.perf_counter() - started)
                config = plans["configurations"][configuration]
                rows.append(
                    {
                        "configuration": configuration,
                        "patch": config["patch_size"],
                        "parameters_m": round(params / 1e6, 2),
                        "mirror": mirror,
                        "seconds": round(statistics.median(times), 2),
                        "best": round(min(times), 2),
                        "runs": [round(t, 2) for t in times],
                        "load_average": os.getloadavg()[0],
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(root / "out", ignore_errors=True)
        shape = json.loads((preprocessed / "dataset_fingerprint.json").read_text())["shapes_after_crop"][0]
    body = section(rows, shape)
    print(body)
    if not args.no_write:
        text = RESULTS.read_text() if RESULTS.is_file() else "# Benchmark results\n"
        block = f"{BEGIN}\n{body}{END}"
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        with atomic_write(RESULTS) as tmp_file:
            tmp_file.write_text(text)


def section(rows: list[dict], shape: list[int]) -> str:
    cpu = platform.processor() or platform.machine()
    lines = [
        "## CPU inference, one demo case (`benchmarks/seg_cpu.py`)",
        "",
        (
            f"Machine: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), torch scan backend. Case `mni_000` of the MNI demo dataset "
            f"({'×'.join(map(str, shape))} voxels after crop, z y x). `predict()` end to end (read, preprocess, "
            "sliding window step 0.5 with Gaussian weighting, export to the input grid, atomic NIfTI write), median "
            "of the runs after one warm-up; configurations as planned by `medmamba plan-and-preprocess` (8 GB "
            "budget), untrained weights (time does not depend on them). The box is shared with other jobs: the "
            "1-minute load average at the end of each row is given; an idle machine is faster. Mirroring: 8 "
            "forward passes per tile in 3D, 4 in 2D."
        ),
        "",
        "| configuration | patch | params (M) | mirroring | seconds (median) | best | runs | load avg |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {r['configuration']} | {'×'.join(map(str, r['patch']))} | {r['parameters_m']} | "
        f"{'on' if r['mirror'] else 'off'} | {r['seconds']:.2f} | {r['best']:.2f} | "
        f"{', '.join(f'{t:.2f}' for t in r['runs'])} "
        f"| {r['load_average']:.1f} |"
        for r in rows
    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
