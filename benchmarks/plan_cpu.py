"""plan-and-preprocess on the demo dataset: ``medmamba plan-and-preprocess`` vs ``nnUNetv2_plan_and_preprocess``.

Both run as fresh processes on the same freshly built MNI demo dataset (``medmamba.io.datasets.demo``), each into
its own preprocessed folder, with dataset verification on, for the configurations ``2d`` and ``3d_fullres``;
nnU-Net gets ``-npfp``/``-np`` set to the cores of this machine (its defaults assume 8). Measured: wall time
and peak RAM of the whole process tree (the sum of the proportional set sizes of the process and all its
workers, sampled every 20 ms from /proc). Then ours once more on the finished folder (every case skipped: the resume
cost). Checked: nnU-Net's ``2d``/``3d_fullres`` configurations in our plans equal nnU-Net's own plans, and the
preprocessed arrays are identical. The section of benchmarks/RESULTS.md between the ``plan_cpu`` markers is
replaced (atomically); the planned patch/batch table is written there too.

    python benchmarks/plan_cpu.py                 # 10 cases (default demo dataset), both tools, RESULTS.md
    python benchmarks/plan_cpu.py --cases 4 --no-write
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- plan_cpu:begin -->", "<!-- plan_cpu:end -->"
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def tree_pss_bytes(pid: int) -> int:
    """Memory of ``pid`` and all its descendants: the sum of their proportional set sizes (/proc smaps_rollup).

    PSS, not RSS: a forked child shares its parent's pages copy-on-write, and summing resident sets would count
    them once per child (short-lived ``fork`` + ``exec`` helpers of imported libraries inflated a sum of RSS 5x).
    """
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def run(command: list[str], env: dict[str, str]) -> dict:
    """Run ``command``; its wall time, the peak RAM of its process tree, exit code and output tail."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss_bytes(proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    seconds = time.perf_counter() - start
    sampler.join()
    return {"seconds": seconds, "peak_pss_bytes": peak[0], "returncode": proc.returncode, "tail": output[-2000:]}


def same_arrays(ours: Path, theirs: Path) -> bool:
    """Every preprocessed case of two data folders holds identical data and segmentation arrays."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    a, b = infer_dataset_class(str(ours))(str(ours)), infer_dataset_class(str(theirs))(str(theirs))
    if sorted(a.identifiers) != sorted(b.identifiers):
        return False
    for case in a.identifiers:
        (da, sa, *_), (db, sb, *_) = a.load_case(case), b.load_case(case)
        if not (np.array_equal(np.asarray(da), np.asarray(db)) and np.array_equal(np.asarray(sa), np.asarray(sb))):
            return False
    return True


def comparable(config: dict) -> dict:
    """A configuration without the names that differ by plans file (data folder name)."""
    return {k: v for k, v in config.items() if k != "data_identifier"}


def machine() -> str:
    cores = len(os.sched_getaffinity(0))
    memory = next(
        (
            int(line.split()[1]) // 2**20
            for line in Path("/proc/meminfo").read_text().splitlines()
            if "MemTotal" in line
        ),
        0,
    )
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {cores} cores, {memory} GiB RAM, Python {platform.python_version()}"


def table(plans: dict, estimates: dict) -> str:
    lines = [
        "| configuration | network | patch | batch | est. GPU memory (GiB) |",
        "|---|---|---|---|---|",
    ]
    for name, config in plans["configurations"].items():
        parent = plans["configurations"].get(config.get("inherits_from", ""), {})
        merged = {**parent, **config}
        if "patch_size" not in merged:
            continue
        network = merged["architecture"]["network_class_name"].rsplit(".", 1)[-1]
        memory = f"{estimates[name]:.2f}" if name in estimates else ""
        patch = "×".join(str(p) for p in merged["patch_size"])
        lines.append(f"| {name} | {network} | {patch} | {merged['batch_size']} | {memory} |")
    return "\n".join(lines)


def estimates_of(plans_file: Path, raw: Path, gpu_memory_gb: float) -> dict[str, float]:
    """Our memory model's GPU GiB for every configuration of a plans file (nnU-Net's conv U-Net included)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from medmamba.plans.memory import estimate

    manager = PlansManager(str(plans_file))
    dataset_json = json.loads((raw / "dataset.json").read_text())
    channels = len(dataset_json["channel_names"])
    heads = manager.get_label_manager(dataset_json).num_segmentation_heads
    out = {}
    for name in manager.available_configurations:
        config = manager.get_configuration(name)

        def factory(config=config):
            return get_network_from_plans(
                config.network_arch_class_name,
                config.network_arch_init_kwargs,
                config.network_arch_init_kwargs_req_import,
                channels,
                heads,
                allow_init=False,
                deep_supervision=True,
            )

        result = estimate(factory, config.patch_size, config.batch_size, in_channels=channels)
        out[name] = result.device_bytes / 2**30
    return out


def write_section(body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    tmp = RESULTS.with_name(f".{RESULTS.name}.plan_cpu.tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10, help="training cases of the demo dataset")
    parser.add_argument("--gpu-memory-gb", type=float, default=8.0, help="the budget both planners get")
    parser.add_argument("--workdir", default=None, help="where datasets and outputs go (default: a temp folder)")
    parser.add_argument("--no-write", action="store_true", help="print, do not update RESULTS.md")
    args = parser.parse_args()

    from medmamba.io.datasets.demo import build_demo_segmentation

    work = Path(args.workdir or tempfile.mkdtemp(prefix="plan_cpu-"))
    raw_root = work / "raw"
    shutil.rmtree(work / "ours", ignore_errors=True)
    shutil.rmtree(work / "nnunet", ignore_errors=True)
    raw = build_demo_segmentation(raw_root, num_cases=args.cases, num_test=0, overwrite=True)
    dataset_id = int(raw.name[7:10])
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "CI": "1"}
    for key in ("MEDMAMBA_RAW", "MEDMAMBA_PREPROCESSED", "nnUNet_raw", "nnUNet_preprocessed"):
        env.pop(key, None)

    ours_cmd = [sys.executable, "-m", "medmamba", "plan-and-preprocess", "-d", str(raw),
                "--preprocessed-root", str(work / "ours"), "--gpu-memory-gb", str(args.gpu_memory_gb),
                "-c", "2d", "3d_fullres", "--json"]  # fmt: skip
    nnunet_cmd = [str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "--verify_dataset_integrity",
                  "-c", "2d", "3d_fullres", "-npfp", str(cores), "-np", str(cores),
                  "-gpu_memory_target", str(args.gpu_memory_gb)]  # fmt: skip
    nnunet_env = {**env, "nnUNet_raw": str(raw_root), "nnUNet_preprocessed": str(work / "nnunet"),
                  "nnUNet_results": str(work / "results")}  # fmt: skip

    results = {
        "nnunet": run(nnunet_cmd, nnunet_env),
        "ours": run(ours_cmd, env),
        "ours_again": run(ours_cmd, env),
    }
    for name, row in results.items():
        if row["returncode"] != 0:
            sys.exit(f"{name} failed ({row['returncode']}):\n{row['tail']}")
        print(json.dumps({"run": name, **{k: v for k, v in row.items() if k != "tail"}}), flush=True)

    ours_plans_file = work / "ours" / raw.name / "medmambaPlans.json"
    ours_plans = json.loads(ours_plans_file.read_text())
    theirs_plans = json.loads((work / "nnunet" / raw.name / "nnUNetPlans.json").read_text())
    same_plans = all(
        comparable(ours_plans["configurations"][c]) == comparable(theirs_plans["configurations"][c])
        for c in theirs_plans["configurations"]
    )
    same_data = all(
        same_arrays(work / "ours" / raw.name / f"medmambaPlans_{c}", work / "nnunet" / raw.name / f"nnUNetPlans_{c}")
        for c in ("2d", "3d_fullres")
    )
    estimates = estimates_of(ours_plans_file, raw, args.gpu_memory_gb)
    print(json.dumps({"same_plans_for_nnunet_configurations": same_plans, "same_preprocessed_arrays": same_data}))

    shapes = json.loads((work / "ours" / raw.name / "dataset_fingerprint.json").read_text())["shapes_after_crop"]
    spacings = json.loads((work / "ours" / raw.name / "dataset_fingerprint.json").read_text())["spacings"]
    gib = 2**30
    n, o, again = results["nnunet"], results["ours"], results["ours_again"]
    extra = len(ours_plans["configurations"]) - len(theirs_plans["configurations"])
    rows = [
        (f"`nnUNetv2_plan_and_preprocess -d {dataset_id} --verify_dataset_integrity -npfp {cores} -np {cores}`", n),
        (f"`medmamba plan-and-preprocess` (also plans {extra} Mamba configurations)", o),
        ("`medmamba plan-and-preprocess` again (every case already done)", again),
    ]
    timing = "\n".join(f"| {label} | {r['seconds']:.1f} | {r['peak_pss_bytes'] / gib:.2f} |" for label, r in rows)
    body = f"""## plan-and-preprocess on the demo dataset (`benchmarks/plan_cpu.py`)

Machine: {machine()}. Dataset: `build_demo_segmentation` (MNI152 T1 → grey/white matter), {args.cases} training
cases, shapes after crop {min(map(tuple, shapes))} … {max(map(tuple, shapes))} voxels, spacings
{min(map(tuple, spacings))} … {max(map(tuple, spacings))} mm (z, y, x). Both tools from a fresh process, verification
on, configurations `2d` and `3d_fullres`, budget {args.gpu_memory_gb:g} GB; nnU-Net with `-npfp {cores} -np {cores}`.
Peak RAM = the process tree's summed proportional set size (PSS), sampled every 20 ms.
Command: `python benchmarks/plan_cpu.py`.

| run | wall time (s) | peak RAM (GiB) |
|---|---|---|
{timing}

nnU-Net's own configurations in `medmambaPlans.json` equal `nnUNetPlans.json`: **{"yes" if same_plans else "NO"}**;
preprocessed arrays identical: **{"yes" if same_data else "NO"}**.

Planned configurations (ours beside nnU-Net's conv U-Net; GPU memory = our model's estimate of one bf16 training
step at that patch and batch, allocator slack and CUDA context included):

{table(ours_plans, estimates)}
"""
    print(body)
    if not args.no_write:
        write_section(body.rstrip())


if __name__ == "__main__":
    main()
