"""Segmentation training: ``MedmambaTrainer``, nnU-Net v2's trainer extended through its hooks, and ``train()``.

nnU-Net keeps what it does well — the patch loader with foreground oversampling, the augmentation pipeline, deep
supervision, the pseudo-Dice validation and the final sliding-window validation (``plans-and-pipeline.md``
§3.3-3.5). ``MedmambaTrainer`` overrides only hooks:

* the paper's :class:`~medmamba.engines.recipes.TrainRecipe` for the network the plans' ``architecture`` block names
  (optimiser, poly LR per epoch or per iteration, Dice+CE or CE, deep supervision, lengths, batch size);
* bf16 autocast by default on the GPU (nnU-Net hard-codes fp16), the scans staying fp32 inside ``MambaLayer``; no
  ``torch.compile`` unless asked and never over the Triton scan backend;
* checkpoints every epoch (and the best by EMA pseudo Dice), written atomically and read with
  ``torch.load(weights_only=True)`` (nnU-Net unpickles); ``train(resume=True)`` continues on the same schedule;
* logging instead of ``print`` (one ``train.log`` per fold folder), a progress bar with loss and ETA, a light
  ``progress.png`` of the training curves, and DDP on CPU (Gloo) as well as CUDA (NCCL).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pydoc
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from medmamba import __version__
from medmamba.engines.checkpoint import check_checkpoint, load_checkpoint, load_weights, save_checkpoint
from medmamba.engines.recipes import TrainRecipe, merge_overrides, recipe_for
from medmamba.engines.training import (
    DistributedEnv,
    PolyLR,
    amp_policy,
    compile_allowed,
    default_autocast_dtype,
    epoch_progress,
    find_resume_checkpoint,
    format_seconds,
    init_distributed,
    plot_curves,
    resolve_device,
    run_log,
    seed_everything,
    stdout_to_log,
)
from medmamba.errors import PlanError, UsageError
from medmamba.io.atomic import write_json
from medmamba.io.datasets.nnunet_raw import find_dataset

__all__ = ["MedmambaTrainer", "network_name_of", "nnunet_environment", "resolve_configuration", "train"]

logger = logging.getLogger(__name__)
#: nnU-Net's own messages (its ``print_to_log_file``): in the log file, on the console only with ``-v``
nnunet_logger = logging.getLogger(__name__ + ".nnunet")

#: resume order: the last epoch's checkpoint, else the finished run's
RESUME_CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_final.pth")


class MedmambaTrainer(nnUNetTrainer):
    """nnU-Net v2's trainer with each medmamba network's paper recipe, bf16 AMP and weights-only checkpoints.

    The constructor is nnU-Net's (its ``my_init_kwargs`` bookkeeping requires the exact signature), so nnunetv2's
    tools can still find and rebuild it. The recipe defaults to the paper's for the network named in the
    configuration's ``architecture`` block; :meth:`set_recipe` replaces it before training starts.

    Args:
        plans: the plans dict (nnU-Net format) with the key ``continue_training`` added, as nnunetv2 expects.
        configuration: the configuration's name in the plans, e.g. ``"3d_fullres_umamba_bot"``.
        fold: cross-validation fold (0-4) or ``"all"``.
        dataset_json: the preprocessed dataset's ``dataset.json``.
        device: where to train; under DDP the rank's device.

    Raises:
        PlanError: the configuration does not name a registered medmamba segmentation network.
    """

    # set by nnU-Net's __init__ (untyped there); declared for the type checker
    is_ddp: bool
    logger: Any
    network: Any
    inference_allowed_mirroring_axes: Any

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 - nnU-Net's signature, kept exactly
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        # nnU-Net forces cuda:<rank> under DDP (Gloo on CPUs works too) and cuda:0 otherwise (whatever was asked)
        if (self.is_ddp and device.type == "cpu") or (not self.is_ddp and device.type == "cuda"):
            self.device = device
        self.network_name = network_name_of(self.configuration_manager.network_arch_class_name, configuration)
        self.logger = _CurvesLogger(self.logger, title=f"{self.network_name} · {configuration} · fold {fold}")
        self._iteration = 0
        self.set_recipe(recipe_for(self.network_name))

    # --- recipe -----------------------------------------------------------------------------------------------
    def set_recipe(self, recipe: TrainRecipe) -> None:
        """Train with ``recipe`` (call before :meth:`initialize`; it sizes the optimiser, loss and batch)."""
        if self.was_initialized:
            raise RuntimeError("set_recipe() must be called before the trainer is initialised")
        if not recipe.iterations_per_epoch:
            raise UsageError(
                "segmentation training samples patches, it has no 'one pass over the data': give "
                "--iterations-per-epoch >= 1 (nnU-Net: 250)"
            )
        self.recipe = recipe
        self.num_epochs = recipe.num_epochs
        self.num_iterations_per_epoch = recipe.iterations_per_epoch
        self.num_val_iterations_per_epoch = recipe.val_iterations_per_epoch
        self.initial_lr = recipe.initial_lr
        self.weight_decay = recipe.weight_decay
        self.oversample_foreground_percent = recipe.oversample_foreground
        self.enable_deep_supervision = recipe.deep_supervision
        self.save_every = 1  # checkpoint_latest.pth after every epoch, so a killed run loses at most one
        if recipe.batch_size is not None:
            self.configuration_manager.configuration["batch_size"] = recipe.batch_size
            self.plans_manager.plans["configurations"][self.configuration_name]["batch_size"] = recipe.batch_size
        self.amp = amp_policy(self.device, recipe.amp_dtype)
        self.grad_scaler = torch.GradScaler("cuda") if self.amp.grad_scaler else None
        self._compile = compile_allowed(self.device, recipe.compile)

    def _do_i_compile(self) -> bool:
        return self._compile

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, PolyLR]:
        """SGD (momentum, Nesterov) or AdamW, with the poly schedule stepped per epoch or per iteration."""
        recipe, params = self.recipe, self.network.parameters()
        if recipe.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                params, recipe.initial_lr, momentum=recipe.momentum, nesterov=True, weight_decay=recipe.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(params, recipe.initial_lr, weight_decay=recipe.weight_decay)
        schedule = PolyLR(
            optimizer,
            recipe.initial_lr,
            recipe.num_epochs,
            recipe.iterations_per_epoch,
            per_iteration=recipe.lr_step == "iteration",
            exponent=recipe.poly_exponent,
        )
        return optimizer, schedule

    def _build_loss(self) -> nn.Module:
        if self.recipe.loss == "dice_ce":
            return super()._build_loss()
        if self.label_manager.has_regions:
            raise UsageError(
                "loss 'ce' (SegMamba's) needs one label per voxel, but this dataset.json defines overlapping regions. "
                "Train with --loss dice_ce"
            )
        ignore = self.label_manager.ignore_label
        loss: nn.Module = RobustCrossEntropyLoss(ignore_index=ignore if ignore is not None else -100)
        if self.enable_deep_supervision:
            # nnU-Net's weighting: 1/2^i per resolution, the lowest one dropped, normalised to sum 1
            scales = self._get_deep_supervision_scales()
            weights = np.array([1 / 2**i for i in range(len(scales))])
            weights[-1] = 1e-6 if self.is_ddp else 0.0  # DDP complains about parameters without gradient
            loss = DeepSupervisionWrapper(loss, weights / weights.sum())
        return loss

    # --- set-up -----------------------------------------------------------------------------------------------
    def initialize(self) -> None:
        """nnU-Net's initialisation; on the CPU under DDP the network is wrapped for Gloo (no device ids)."""
        if self.recipe.seed is not None:
            seed_everything(self.recipe.seed + self.local_rank)
        if not (self.is_ddp and self.device.type == "cpu"):
            super().initialize()
            return
        self.is_ddp = False  # nnU-Net's DDP wrapping passes CUDA device ids; build plainly, then wrap for CPU
        try:
            super().initialize()
        finally:
            self.is_ddp = True
        self._set_batch_size_and_oversample()  # this rank's share of the global batch
        self.network = DistributedDataParallel(self.network)
        self.loss = self._build_loss()  # the Dice term then gathers over ranks

    def plot_network_architecture(self) -> None:
        """Not drawn: nnU-Net's version needs ``hiddenlayer`` and only prints a warning without it."""

    def print_to_log_file(self, *args: Any, also_print_to_console: bool = True, add_timestamp: bool = True) -> None:
        """nnU-Net's messages go to the logging system (the run's ``train.log``), never to stdout."""
        if self.local_rank == 0:
            nnunet_logger.info("%s", " ".join(str(a) for a in args))

    def do_split(self) -> tuple[list[str], list[str]]:
        """nnU-Net's split; a dataset too small for its 5-fold cross-validation is a user error, not sklearn's."""
        try:
            return super().do_split()
        except ValueError as err:
            if "n_splits" not in str(err):
                raise
            raise UsageError(
                f"{self.preprocessed_dataset_folder_base}: too few training cases for nnU-Net's 5-fold "
                f"cross-validation (fold {self.fold}: {err}). Train fold 'all', add cases, or write your own "
                "splits_final.json"
            ) from None

    def print_plans(self) -> None:
        """The configuration in use, logged once (nnU-Net prints the whole plans)."""
        if self.local_rank == 0:
            nnunet_logger.info("configuration %s: %s", self.configuration_name, self.configuration_manager)

    # --- one step -----------------------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        """nnU-Net's epoch start (LR for the epoch, log line); the iteration counter restarts."""
        self._iteration = 0
        super().on_train_epoch_start()

    def train_step(self, batch: dict) -> dict:
        """nnU-Net's step (forward, loss, backward, clip 12, optimiser) under this run's AMP dtype and LR."""
        if self.recipe.lr_step == "iteration":
            self.lr_scheduler.step(self.current_epoch, self._iteration)
        with self._autocast():
            result = super().train_step(batch)
        self._iteration += 1
        return result

    def validation_step(self, batch: dict) -> dict:
        """nnU-Net's validation step (loss and pseudo-Dice counts) under this run's AMP dtype."""
        with self._autocast():
            return super().validation_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        """nnU-Net's final validation (sliding window over every validation case, ``validation/summary.json``)."""
        with self._autocast(), stdout_to_log(nnunet_logger, logging.INFO):
            super().perform_actual_validation(save_probabilities)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return default_autocast_dtype("cuda", self.amp.dtype)

    # --- the loop ---------------------------------------------------------------------------------------------
    def run_training(self) -> None:
        """nnU-Net's epoch loop (same hooks, same order) with a progress bar per epoch and one log line per epoch."""
        with stdout_to_log(nnunet_logger, logging.INFO):
            self.on_train_start()
        (logger.info if self.local_rank == 0 else logger.debug)(
            "training %s (%s, fold %s) on %s: %d epochs × %d iterations, batch %d, patch %s, %s AMP, recipe %s",
            self.network_name,
            self.configuration_name,
            self.fold,
            self.device,
            self.num_epochs,
            self.num_iterations_per_epoch,
            self.batch_size,
            self.configuration_manager.patch_size,
            self.amp.name,
            self.recipe.to_dict(),
        )
        try:
            durations: list[float] = []
            for epoch in range(self.current_epoch, self.num_epochs):
                started = time.perf_counter()
                self.on_epoch_start()
                self.on_train_epoch_start()
                eta = float(np.mean(durations)) * (self.num_epochs - epoch) if durations else float("nan")
                losses = self.logger.get_value("train_losses", step=None)
                steps = epoch_progress(
                    range(self.num_iterations_per_epoch),
                    epoch=epoch,
                    num_epochs=self.num_epochs,
                    total=self.num_iterations_per_epoch,
                    last_loss=float(losses[-1]) if losses else None,
                    eta_s=eta,
                )
                train_outputs = [self.train_step(next(self.dataloader_train)) for _ in steps]
                self.on_train_epoch_end(train_outputs)
                with torch.no_grad():
                    self.on_validation_epoch_start()
                    val_outputs = [
                        self.validation_step(next(self.dataloader_val))
                        for _ in range(self.num_val_iterations_per_epoch)
                    ]
                    self.on_validation_epoch_end(val_outputs)
                best_before = self._best_ema
                self.on_epoch_end()
                durations.append(time.perf_counter() - started)
                self._log_epoch(epoch, durations, improved=self._best_ema != best_before)
            with stdout_to_log(nnunet_logger, logging.INFO):
                self.on_train_end()
        except BaseException:
            self._stop_loaders()
            raise

    def _log_epoch(self, epoch: int, durations: list[float], *, improved: bool) -> None:
        if self.local_rank != 0:
            return
        value = self.logger.get_value
        remaining = float(np.mean(durations)) * (self.num_epochs - epoch - 1)
        dice = ", ".join(f"{d:.3f}" for d in value("dice_per_class_or_region", step=-1))
        logger.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, pseudo Dice [%s] (EMA %.4f%s), lr %.2e, %.1f s, ETA %s",
            epoch + 1,
            self.num_epochs,
            value("train_losses", step=-1),
            value("val_losses", step=-1),
            dice,
            value("ema_fg_dice", step=-1),
            ", new best" if improved else "",
            value("lrs", step=-1),
            durations[-1],
            format_seconds(remaining),
        )

    def _stop_loaders(self) -> None:
        """Stop the augmentation workers of an interrupted run (nnU-Net does it only in ``on_train_end``)."""
        for loader in (self.dataloader_train, self.dataloader_val):
            finish = getattr(loader, "_finish", None)
            if finish is not None:
                with contextlib.suppress(Exception):
                    finish()

    # --- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        """Write a weights-only checkpoint atomically (rank 0 only)."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            nnunet_logger.info("no checkpoint written, checkpointing is disabled")
            return
        save_checkpoint(
            filename,
            {
                "network": self.network_name,
                "in_channels": self.num_input_channels,
                "out_channels": self.label_manager.num_segmentation_heads,
                "network_weights": _unwrap(self.network).state_dict(),
                "optimizer_state": self.optimizer.state_dict(),
                "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
                "logging": self.logger.get_checkpoint(),
                "_best_ema": self._best_ema,
                "current_epoch": self.current_epoch + 1,
                "init_args": {**self.my_init_kwargs, "device": str(self.device)},
                "trainer_name": type(self).__name__,
                "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
                "recipe": self.recipe.to_dict(),
                "medmamba_version": __version__,
            },
        )

    def load_checkpoint(self, filename_or_checkpoint: dict | str | os.PathLike[str]) -> None:
        """Restore weights, optimiser, scaler, logs, epoch and best score from a weights-only checkpoint.

        Raises:
            CheckpointError: not weights-only loadable, or of another network / channel count / architecture.
        """
        if not self.was_initialized:
            self.initialize()
        expected = {
            "network": self.network_name,
            "in_channels": self.num_input_channels,
            "out_channels": self.label_manager.num_segmentation_heads,
        }
        if isinstance(filename_or_checkpoint, dict):
            checkpoint = filename_or_checkpoint
            source = str(checkpoint.get("_source", "<checkpoint>"))
            check_checkpoint(checkpoint, source, **expected)
        else:
            source = str(filename_or_checkpoint)
            checkpoint = load_checkpoint(source, map_location=self.device, **expected)
        load_weights(_unwrap(self.network), checkpoint["network_weights"], source)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.logger.load_checkpoint(checkpoint["logging"])
        self.current_epoch = int(checkpoint["current_epoch"])
        self._best_ema = checkpoint["_best_ema"]
        axes = checkpoint.get("inference_allowed_mirroring_axes")
        self.inference_allowed_mirroring_axes = (
            tuple(axes) if axes is not None else self.inference_allowed_mirroring_axes
        )


class _CurvesLogger:
    """nnU-Net's ``MetaLogger`` with medmamba's training-curves PNG (small, atomic) instead of its seaborn figure."""

    def __init__(self, inner: Any, *, title: str) -> None:
        self._inner, self._title = inner, title

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def plot_progress_png(self, output_folder: str) -> None:
        series = {key: self._inner.get_value(key, step=None) for key in ("train_losses", "val_losses", "mean_fg_dice",
                                                                          "ema_fg_dice", "lrs")}  # fmt: skip
        epochs = min(len(v) for v in series.values())
        s = {key: list(values[:epochs]) for key, values in series.items()}
        plot_curves(
            {
                "loss": {"train": s["train_losses"], "validation": s["val_losses"]},
                "pseudo Dice": {"mean foreground": s["mean_fg_dice"], "EMA": s["ema_fg_dice"]},
                "learning rate": {"lr": s["lrs"]},
            },
            Path(output_folder) / "progress.png",
            title=self._title,
        )


def _unwrap(network: nn.Module) -> nn.Module:
    """The bare network inside DDP and ``torch.compile`` wrappers."""
    if isinstance(network, DistributedDataParallel):
        network = network.module
    return getattr(network, "_orig_mod", network)


def network_name_of(class_name: str, configuration: str = "") -> str:
    """Registry name of the medmamba segmentation network that a plans' ``network_class_name`` points to.

    Raises:
        PlanError: the class cannot be imported or is not a registered medmamba segmentation network.
    """
    from medmamba.networks import list_networks, spec

    cls = pydoc.locate(class_name)
    where = f"configuration {configuration!r}" if configuration else "the plans"
    if not isinstance(cls, type):
        raise PlanError(f"{where}: architecture class {class_name!r} cannot be imported. Re-plan with medmamba")
    for name in list_networks(task="segmentation"):
        if issubclass(cls, spec(name).cls):
            return name
    raise PlanError(
        f"{where}: architecture class {class_name!r} is not a medmamba network (known: "
        f"{', '.join(list_networks(task='segmentation'))}). Use a configuration planned by `medmamba "
        "plan-and-preprocess`"
    )


def resolve_configuration(plans: Mapping[str, Any], configuration: str, network: str, plans_path: str = "plans") -> str:
    """The plans configuration that trains ``network`` for ``configuration`` (e.g. ``3d_fullres``).

    ``<configuration>_<network>`` (what medmamba's planner writes, e.g. ``3d_fullres_segmamba``) is preferred; a
    configuration named exactly ``configuration`` is accepted when its ``architecture`` names ``network``.

    Raises:
        PlanError: neither exists, or the configuration trains another network.
    """
    configurations = plans.get("configurations", {})
    for candidate in (f"{configuration}_{network}", configuration):
        if candidate in configurations:
            arch = _resolved(configurations, candidate).get("architecture", {})
            try:
                found = network_name_of(arch.get("network_class_name", "<missing>"), candidate)
            except PlanError:
                if candidate != configuration:
                    raise
                break  # e.g. nnU-Net's own 3d_fullres (PlainConvUNet): say which configuration is missing
            if found == network:
                return candidate
            if candidate == configuration:
                raise PlanError(
                    f"{plans_path}: configuration {candidate!r} trains {found!r}, not {network!r}. Use --network "
                    f"{found}, or plan {network} with `medmamba plan-and-preprocess --networks {network}`"
                )
    raise PlanError(
        f"{plans_path}: no configuration {configuration}_{network!s} (have: {', '.join(sorted(configurations))}). "
        f"Plan it with `medmamba plan-and-preprocess --networks {network}`"
    )


def _resolved(configurations: Mapping[str, Any], name: str) -> dict[str, Any]:
    """A configuration with nnU-Net's ``inherits_from`` applied (shallow, as ``PlansManager`` does)."""
    config = dict(configurations[name])
    seen = {name}
    while "inherits_from" in config:
        parent = config.pop("inherits_from")
        if parent in seen or parent not in configurations:
            break
        seen.add(parent)
        config = {**configurations[parent], **config}
    return config


@contextlib.contextmanager
def nnunet_environment(
    *,
    preprocessed: str | os.PathLike[str] | None = None,
    results: str | os.PathLike[str] | None = None,
    num_workers: int | None = None,
) -> Iterator[None]:
    """Point nnunetv2's path variables (read lazily, ``nnunetv2/paths.py``) at the given folders for the block.

    ``num_workers`` sets nnU-Net's augmentation processes (``nnUNet_n_proc_DA``; 0 = in the main process).
    ``nnUNet_compile`` is off inside: nnU-Net's predictor (final validation, inference) would otherwise compile
    the network when a user has it set, Triton scans included; the recipe's ``compile`` decides for training.
    """
    values = {"nnUNet_compile": "f"}
    if preprocessed is not None:
        values["nnUNet_preprocessed"] = str(preprocessed)
    if results is not None:
        values["nnUNet_results"] = str(results)
    if num_workers is not None:
        values["nnUNet_n_proc_DA"] = str(max(0, num_workers))
    previous = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def train(
    dataset: str | int | os.PathLike[str],
    configuration: str,
    fold: int | str,
    *,
    network: str,
    preprocessed: str | os.PathLike[str],
    results: str | os.PathLike[str],
    plans_name: str = "medmambaPlans",
    overrides: Mapping[str, Any] | None = None,
    device: str | torch.device = "auto",
    resume: bool = False,
    overwrite: bool = False,
    validate: bool = True,
    num_workers: int | None = None,
) -> Path:
    """Train ``network`` on a preprocessed dataset; returns the fold folder.

    The run lands in ``results/<Dataset>/MedmambaTrainer__<plans>__<configuration>/fold_<fold>/`` (nnU-Net's
    layout, so ``medmamba predict -m`` and nnunetv2's tools read it) with ``checkpoint_{latest,best,final}.pth``,
    ``train.log``, ``progress.png``, ``recipe.json`` and, unless ``validate=False``, nnU-Net's ``validation/``.
    Under ``torchrun`` or :func:`medmamba.engines.training.spawn` each rank runs this function (DDP).

    Args:
        dataset: id, ``DatasetXXX_Name`` or path of the dataset under ``preprocessed``.
        configuration: ``2d``, ``3d_fullres`` … (``<configuration>_<network>`` is looked up first).
        fold: 0-4, or ``"all"``.
        network: registry name (``umamba_bot``, ``umamba_enc``, ``segmamba``).
        preprocessed: the preprocessed root (``nnUNet_preprocessed``).
        results: the results root (``nnUNet_results``).
        plans_name: plans file name without ``.json``.
        overrides: recipe fields to change (None values ignored), e.g. ``{"num_epochs": 50}``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume: continue from the fold's last checkpoint with the recipe it was started with.
        overwrite: start afresh although the fold folder has checkpoints.
        validate: run nnU-Net's final sliding-window validation of the fold's validation cases.
        num_workers: augmentation worker processes (None: nnU-Net's default, ``min(12, cores)``).

    Raises:
        PlanError: plans or configuration missing or naming another network.
        UsageError: invalid overrides, a fold folder with checkpoints and neither ``resume`` nor ``overwrite``,
            or ``resume`` with overrides that change the run's recipe.
        CheckpointError: the checkpoint to resume from is unusable.
    """
    dist_env = DistributedEnv.from_env()
    device = resolve_device(device)
    if dist_env.active:
        device = init_distributed(dist_env, device)
    dataset_folder = find_dataset(dataset, preprocessed)
    plans_path = dataset_folder / f"{plans_name}.json"
    if not plans_path.is_file():
        raise PlanError(
            f"{plans_path}: no such plans. Run `medmamba plan-and-preprocess -d {dataset}` first (or pass --plans)"
        )
    plans = json.loads(plans_path.read_text())
    dataset_json = json.loads((dataset_folder / "dataset.json").read_text())
    config_name = resolve_configuration(plans, configuration, network, str(plans_path))
    try:
        recipe = merge_overrides(recipe_for(network), overrides or {})
    except ValueError as err:
        raise UsageError(str(err)) from None
    fold_value: Any = "all" if str(fold) == "all" else int(fold)  # nnU-Net types it int but takes "all"
    plans["continue_training"] = resume
    with nnunet_environment(preprocessed=dataset_folder.parent, results=results, num_workers=num_workers):
        with stdout_to_log(nnunet_logger, logging.INFO), warnings.catch_warnings():
            # nnU-Net builds a CUDA GradScaler whenever it assumes CUDA (under DDP); set_recipe replaces it
            warnings.filterwarnings("ignore", message=".*GradScaler is enabled, but CUDA is not available")
            trainer = MedmambaTrainer(plans, config_name, fold_value, dataset_json, device)
        folder = Path(trainer.output_folder)
        with run_log(folder) if dist_env.rank == 0 else contextlib.nullcontext():
            finished = _prepare(trainer, recipe, overrides or {}, folder, resume=resume, overwrite=overwrite)
            if dist_env.rank == 0:
                write_json(folder / "recipe.json", trainer.recipe.to_dict())
            if not finished:
                trainer.run_training()
            if validate:
                trainer.perform_actual_validation()
    if dist_env.active:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return folder


def _prepare(
    trainer: MedmambaTrainer,
    recipe: TrainRecipe,
    overrides: Mapping[str, Any],
    folder: Path,
    *,
    resume: bool,
    overwrite: bool,
) -> bool:
    """Set the recipe and, when resuming, restore the last checkpoint; True if that run had already finished."""
    found = find_resume_checkpoint(folder, RESUME_CHECKPOINTS)
    if not resume:
        if found is not None and not overwrite:
            raise UsageError(
                f"{folder}: holds a trained or running model ({found.name}). Pass --resume to continue it or "
                "--overwrite to start afresh"
            )
        trainer.set_recipe(recipe)
        return False
    if found is None:
        logger.warning("%s: no checkpoint to resume from; starting a new run", folder)
        trainer.set_recipe(recipe)
        return False
    # channels are checked by the trainer once it has built the network
    checkpoint = load_checkpoint(found, map_location=trainer.device, network=trainer.network_name)
    saved = TrainRecipe.from_dict(checkpoint["recipe"])
    given = {k: v for k, v in overrides.items() if v is not None}
    changed = {k: v for k, v in given.items() if getattr(saved, k) != v}
    if changed:
        raise UsageError(
            f"{found}: --resume continues the run with its own recipe, but {changed} differs from it "
            f"({ {k: getattr(saved, k) for k in changed} }). Drop those options, or start a new run with --overwrite"
        )
    trainer.set_recipe(saved)
    trainer.load_checkpoint({**checkpoint, "_source": str(found)})
    logger.info("resuming %s from %s at epoch %d", folder, found.name, trainer.current_epoch)
    return found.name == "checkpoint_final.pth" or trainer.current_epoch >= trainer.num_epochs
