"""The demo: the whole product on data that ships, from nothing to a report, in minutes on a laptop CPU.

Segmentation: the MNI-derived tissue dataset (real MNI ICBM152 T1 anatomy, synthetic per-case deformation, bias,
noise and anisotropic spacing; labels grey and white matter; ``medmamba.io.datasets.demo``) → nnU-Net-style
plan-and-preprocess with the Mamba-aware planner → a narrow CPU configuration of the chosen network added to the
plans the way nnU-Net adds custom configurations (``inherits_from`` the planned one, same preprocessed data) →
training on fold 0 → prediction of fold 0's validation cases, which training never saw → Dice, HD95 and surface
Dice. Registration: MNI-derived subjects on one grid → a small MambaMorph (Dice of warped labels + smoothness +
LNCC) → registration of the held-out pairs → warped-label Dice/HD95 before and after, folding fraction, std of
log|J|. Then a report folder: ``index.html`` and ``README.md`` with those numbers, training curves and overlays on
the MRI slices, ``summary.json`` with every number, and the ``medmamba`` command lines that redo each step.

Every step is the public engine the CLI runs (plans.plan_and_preprocess, engines.segmentation.trainer.train,
engines.segmentation.predict.predict, engines.evaluate, engines.registration.train/register); the demo only chooses
small settings. The numbers are those of this run: a few CPU minutes of training, not the papers' 1000 epochs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from medmamba import __version__
from medmamba._progress import progress
from medmamba.engines.training import resolve_device
from medmamba.errors import UsageError
from medmamba.io.atomic import atomic_dir, write_json

__all__ = ["DEMO_NETWORKS", "FULL", "QUICK", "DemoResult", "DemoSettings", "run_demo"]

logger = logging.getLogger(__name__)

#: segmentation networks the demo can train, with the narrowing of the planned architecture for the CPU
DEMO_NETWORKS: dict[str, dict[str, Any]] = {
    "umamba_bot": {"n_conv_per_stage": [1, 1, 1, 1], "n_conv_per_stage_decoder": [1, 1, 1]},
    "umamba_enc": {"n_conv_per_stage": [1, 1, 1, 1], "n_conv_per_stage_decoder": [1, 1, 1]},
    "segmamba": {"depths": [1, 1, 1, 1]},
}
#: the folders the demo writes inside its output folder (and the only ones --overwrite removes)
FOLDERS = ("raw", "preprocessed", "results", "heldout", "predictions", "registrations", "report")
SEGMENTATION_ID, REGISTRATION_ID = 990, 991


@dataclass(frozen=True, kw_only=True, slots=True)
class DemoSettings:
    """How big the demo is. ``FULL`` is the README's demo (about 7 minutes on an idle 2-core CPU), ``QUICK`` CI's.

    Args:
        cases: labelled segmentation cases; fold 0 of nnU-Net's 5-fold split holds a fifth of them out.
        epochs: segmentation training epochs.
        iterations: training iterations per epoch (batch 2).
        patch: training patch ``(z, y, x)`` in voxels of the planned spacing (the whole head at ~4 mm is ~48×58×48).
        features: channels per encoder stage of the CPU configuration (the planner's: 32 … 320).
        hidden_size: SegMamba's bottleneck width (its planned value is 768).
        subjects: registration subjects on one grid; consecutive ones form pairs.
        val_pairs: the last pairs, held out from registration training.
        grid_spacing: registration grid spacing (mm, isotropic).
        grid_shape: registration grid ``(x, y, z)``.
        reg_epochs: registration training epochs (one pass over the training pairs each).
        embed_dim: MambaMorph's embedding width (the paper's 96).
    """

    cases: int
    epochs: int
    iterations: int
    patch: tuple[int, int, int]
    features: tuple[int, ...]
    hidden_size: int
    subjects: int
    val_pairs: int
    grid_spacing: float
    grid_shape: tuple[int, int, int]
    reg_epochs: int
    embed_dim: int


FULL = DemoSettings(
    cases=10,
    epochs=12,
    iterations=50,
    patch=(40, 48, 40),
    features=(8, 16, 32, 64),
    hidden_size=64,
    subjects=10,
    val_pairs=2,
    grid_spacing=5.0,
    grid_shape=(32, 40, 32),
    reg_epochs=40,
    embed_dim=16,
)
QUICK = DemoSettings(
    cases=5,
    epochs=1,
    iterations=2,
    patch=(32, 32, 32),
    features=(4, 8, 16, 32),
    hidden_size=32,
    subjects=3,
    val_pairs=1,
    grid_spacing=10.0,
    grid_shape=(16, 20, 16),
    reg_epochs=1,
    embed_dim=12,
)


@dataclass
class DemoResult:
    """What a demo run produced: the report and the numbers in it."""

    output: Path
    report: Path
    summary: dict[str, Any] = field(default_factory=dict)


def run_demo(
    output: str | os.PathLike[str],
    *,
    network: str = "umamba_bot",
    settings: DemoSettings = FULL,
    device: str | torch.device = "auto",
    seed: int = 0,
    overwrite: bool = False,
    segmentation: bool = True,
    registration: bool = True,
) -> DemoResult:
    """Run the demo into ``output`` and write its report; returns where the report is and its numbers.

    Args:
        output: the demo's folder (created); it gets ``raw/``, ``preprocessed/``, ``results/``, ``heldout/``,
            ``predictions/``, ``registrations/`` and ``report/``.
        network: the segmentation network (``umamba_bot``, ``umamba_enc``, ``segmamba``).
        settings: :data:`FULL` or :data:`QUICK` (or your own).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
        seed: seeds data synthesis and training.
        overwrite: replace the folders of an earlier demo in ``output``.
        segmentation: run the segmentation part.
        registration: run the registration part.

    Raises:
        UsageError: an unknown network, nothing to run, or an output folder that already holds a demo (without
            ``overwrite``) or other files.
    """
    if network not in DEMO_NETWORKS:
        raise UsageError(f"--network {network}: the demo trains one of {', '.join(DEMO_NETWORKS)}")
    if not (segmentation or registration):
        raise UsageError("nothing to run: drop --no-segmentation or --no-registration")
    root = _prepare_output(Path(output), overwrite=overwrite)
    run = _DemoRun(root, network, settings, resolve_device(device), seed)
    steps = run.steps(segmentation=segmentation, registration=registration)
    started = time.perf_counter()
    for index, (name, step) in enumerate(progress(steps, desc="demo", total=len(steps)), start=1):
        logger.info("demo step %d/%d: %s", index, len(steps), name)
        begin = time.perf_counter()
        step()
        run.timings[name] = time.perf_counter() - begin
    run.summary["seconds_total"] = time.perf_counter() - started
    return DemoResult(root, run.report, run.summary)


def _prepare_output(root: Path, *, overwrite: bool) -> Path:
    if root.exists() and not root.is_dir():
        raise UsageError(f"-o {root}: exists and is not a folder. Choose a folder for the demo")
    if root.is_dir():
        entries = sorted(p.name for p in root.iterdir())
        ours = [name for name in entries if name in FOLDERS]
        others = [name for name in entries if name not in FOLDERS]
        if others and not ours:
            raise UsageError(
                f"-o {root}: is not empty and holds no earlier demo ({', '.join(others[:5])}). Choose an empty or new "
                "folder"
            )
        if ours and not overwrite:
            raise UsageError(
                f"-o {root}: holds an earlier demo. Pass --overwrite to replace it, or choose a new folder"
            )
        for name in ours:  # only the demo's own folders, never anything else in there
            shutil.rmtree(root / name)
    root.mkdir(parents=True, exist_ok=True)
    return root.resolve()


class _DemoRun:
    """The demo's steps and what they hand each other (paths, tables), in the order they run."""

    def __init__(self, root: Path, network: str, settings: DemoSettings, device: torch.device, seed: int) -> None:
        self.root, self.network, self.settings, self.device, self.seed = root, network, settings, device, seed
        self.raw, self.preprocessed, self.results = root / "raw", root / "preprocessed", root / "results"
        self.report = root / "report"
        self.timings: dict[str, float] = {}
        self.commands: list[tuple[str, list[str]]] = []
        self.summary: dict[str, Any] = {
            "medmamba": __version__,
            "torch": torch.__version__,
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "cpu_threads": torch.get_num_threads(),
            "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores",
            "network": network,
            "seed": seed,
            "settings": asdict(settings),
            "timings_s": self.timings,
        }
        self.seg: dict[str, Any] = {}
        self.reg: dict[str, Any] = {}

    def steps(self, *, segmentation: bool, registration: bool) -> list[tuple[str, Callable[[], None]]]:
        steps: list[tuple[str, Callable[[], None]]] = []
        if segmentation:
            steps += [
                ("segmentation data", self.segmentation_data),
                ("plan and preprocess", self.plan),
                ("train segmentation", self.train_segmentation),
                ("predict held-out cases", self.predict),
                ("evaluate segmentations", self.evaluate_segmentation),
            ]
        if registration:
            steps += [
                ("registration data", self.registration_data),
                ("train registration", self.train_registration),
                ("register held-out pairs", self.register),
                ("evaluate registrations", self.evaluate_registration),
            ]
        steps.append(("report", self.write_report))
        return steps

    def _record(self, step: str, *argv: Any) -> None:
        """Remember the ``medmamba`` command line that redoes ``step`` on the demo's folders (for the report)."""
        self.commands.append((step, ["medmamba", *(str(a) for a in argv)]))

    # --- segmentation -------------------------------------------------------------------------------------------
    def segmentation_data(self) -> None:
        from medmamba.io.datasets.demo import build_demo_segmentation

        s = self.settings
        self.seg["raw"] = build_demo_segmentation(
            self.raw, dataset_id=SEGMENTATION_ID, num_cases=s.cases, num_test=0, seed=self.seed
        )
        self._record("segmentation data", "convert", "demo", "--kind", "segmentation", "--cases", s.cases, "--seed",
                     self.seed, "-o", self.raw)  # fmt: skip

    def plan(self) -> None:
        from medmamba.plans import plan_and_preprocess

        result = plan_and_preprocess(
            self.seg["raw"],
            self.preprocessed,
            networks=[self.network],
            configurations=["3d_fullres"],
            num_workers=min(2, os.cpu_count() or 1),
        )
        plans = json.loads(result.plans_file.read_text(encoding="utf-8"))
        planned = plans["configurations"][f"3d_fullres_{self.network}"]
        architecture = copy.deepcopy(planned["architecture"])
        changes: dict[str, Any] = {"features_per_stage": list(self.settings.features), **DEMO_NETWORKS[self.network]}
        if self.network == "segmamba":
            changes["hidden_size"] = self.settings.hidden_size
        n_stages = len(self.settings.features)
        for key in ("n_conv_per_stage", "depths"):
            if key in changes:
                changes[key] = changes[key][:n_stages]
        if "n_conv_per_stage_decoder" in changes:
            changes["n_conv_per_stage_decoder"] = changes["n_conv_per_stage_decoder"][: n_stages - 1]
        for key, value in changes.items():
            if key not in architecture["arch_kwargs"] and key != "hidden_size":
                raise RuntimeError(f"the planned {self.network} architecture has no {key!r}: the demo is out of date")
            architecture["arch_kwargs"][key] = value
        _fit_stages(architecture["arch_kwargs"], n_stages)
        # nnU-Net's way of adding a configuration: inherit the planned one (and its preprocessed data)
        plans["configurations"][f"3d_demo_{self.network}"] = {
            "inherits_from": f"3d_fullres_{self.network}",
            "patch_size": list(self.settings.patch),
            "batch_size": 2,
            "architecture": architecture,
        }
        write_json(result.plans_file, plans)
        self.seg.update(
            plans_file=result.plans_file,
            planned={"patch_size": planned.get("patch_size"), "batch_size": planned.get("batch_size")},
            spacing=plans["configurations"]["3d_fullres"]["spacing"],
            architecture=architecture["arch_kwargs"],
        )
        self._record("plan and preprocess", "plan-and-preprocess", "-d", SEGMENTATION_ID, "--raw-root", self.raw,
                     "--preprocessed-root", self.preprocessed, "--networks", self.network,
                     "-c", "3d_fullres")  # fmt: skip

    def train_segmentation(self) -> None:
        from medmamba.engines.segmentation.trainer import train

        s = self.settings
        overrides = {
            "num_epochs": s.epochs,
            "iterations_per_epoch": s.iterations,
            "val_iterations_per_epoch": 2,
            "seed": self.seed,
        }
        fold = train(
            self.seg["raw"].name,
            "3d_demo",
            0,
            network=self.network,
            preprocessed=self.preprocessed,
            results=self.results,
            overrides=overrides,
            device=self.device,
            validate=False,
            num_workers=1 if self.device.type == "cpu" else None,
        )
        self.seg["fold"] = fold
        self._record("train segmentation", "train", SEGMENTATION_ID, "3d_demo", 0, "--network", self.network,
                     "--preprocessed", self.preprocessed, "--results", self.results, "--epochs", s.epochs,
                     "--iterations-per-epoch", s.iterations, "--val-iterations", 2, "--seed", self.seed,
                     "--no-validation")  # fmt: skip

    def predict(self) -> None:
        from medmamba.engines.segmentation.predict import predict

        splits = json.loads((self.seg["plans_file"].parent / "splits_final.json").read_text(encoding="utf-8"))
        held_out = sorted(splits[0]["val"])  # fold 0's validation cases: never trained on
        images, labels = self.root / "heldout" / "images", self.root / "heldout" / "labels"
        images.mkdir(parents=True)
        labels.mkdir()
        for case in held_out:
            shutil.copy2(self.seg["raw"] / "imagesTr" / f"{case}_0000.nii.gz", images)
            shutil.copy2(self.seg["raw"] / "labelsTr" / f"{case}.nii.gz", labels)
        predictions = self.root / "predictions"
        predict(images, predictions, self.seg["fold"].parent, device=self.device, folds=[0])
        self.seg.update(held_out=held_out, images=images, labels=labels, predictions=predictions)
        self._record("predict held-out cases", "predict", "-i", images, "-o", predictions, "-m",
                     self.seg["fold"].parent, "-f", 0)  # fmt: skip

    def evaluate_segmentation(self) -> None:
        from medmamba.engines.evaluate import evaluate_segmentations

        table, json_path, _ = evaluate_segmentations(self.seg["labels"], self.seg["predictions"])
        self.seg["table"] = table
        self.seg["metrics_file"] = json_path
        self._record("evaluate segmentations", "evaluate", "-ref", self.seg["labels"], "-pred",
                     self.seg["predictions"])  # fmt: skip

    # --- registration -------------------------------------------------------------------------------------------
    def registration_data(self) -> None:
        from medmamba.io.datasets.demo import build_demo_registration

        s = self.settings
        self.reg["dataset"] = build_demo_registration(
            self.raw,
            dataset_id=REGISTRATION_ID,
            num_subjects=s.subjects,
            num_val_pairs=s.val_pairs,
            seed=self.seed,
            spacing=s.grid_spacing,
            shape=s.grid_shape,
        )
        self._record("registration data", "convert", "demo", "--kind", "registration", "--subjects", s.subjects,
                     "--seed", self.seed, "-o", self.raw)  # fmt: skip

    def train_registration(self) -> None:
        from medmamba.engines.registration.train import train

        s = self.settings
        network_kwargs = {"embed_dim": s.embed_dim, "reg_head_channels": 8}
        overrides = {
            "num_epochs": s.reg_epochs,
            "initial_lr": 3e-3,
            "loss_weights": {"lncc": 1.0},  # a dense image term next to the paper's label Dice: faster learning
            "seed": self.seed,
        }
        self.reg["run"] = train(
            self.reg["dataset"],
            self.results,
            network="mambamorph",
            overrides=overrides,
            network_kwargs=network_kwargs,
            device=self.device,
        )
        self.reg["network_kwargs"] = network_kwargs
        self._record("train registration", "train", self.reg["dataset"], "--network", "mambamorph", "--output",
                     self.reg["run"], "--epochs", s.reg_epochs, "--lr", "3e-3", "--similarity", "lncc", "--seed",
                     self.seed, "--network-kwargs", json.dumps(network_kwargs))  # fmt: skip

    def register(self) -> None:
        from medmamba.engines.registration.register import pairs_from_dataset, register

        registrations = self.root / "registrations"
        register(pairs_from_dataset(self.reg["dataset"], "val"), registrations, self.reg["run"], device=self.device)
        self.reg["registrations"] = registrations
        self._record("register held-out pairs", "register", "--dataset", self.reg["dataset"], "--split", "val", "-m",
                     self.reg["run"], "-o", registrations)  # fmt: skip

    def evaluate_registration(self) -> None:
        from medmamba.engines.evaluate import evaluate_registrations

        table, json_path, _ = evaluate_registrations(self.reg["registrations"])
        self.reg["table"] = table
        self.reg["metrics_file"] = json_path
        self._record("evaluate registrations", "evaluate", "--task", "registration", "-pred",
                     self.reg["registrations"])  # fmt: skip

    # --- report ---------------------------------------------------------------------------------------------------
    def write_report(self) -> None:
        from medmamba.engines import _demo_report

        with atomic_dir(self.report, overwrite=True) as folder:
            self.summary.update(_demo_report.write(folder, self))
            write_json(folder / "summary.json", self.summary)


def _fit_stages(arch_kwargs: dict[str, Any], n_stages: int) -> None:
    """Trim the planned per-stage lists (strides, kernel sizes …) to ``n_stages`` when the demo uses fewer."""
    if "n_stages" in arch_kwargs:
        arch_kwargs["n_stages"] = n_stages
    for key in ("strides", "kernel_sizes"):
        if key in arch_kwargs and len(arch_kwargs[key]) > n_stages:
            arch_kwargs[key] = arch_kwargs[key][:n_stages]
