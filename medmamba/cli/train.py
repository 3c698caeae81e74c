"""``medmamba train DATASET CONFIG FOLD --network NAME``: train a network on preprocessed data.

The network's task picks the engine (segmentation: nnU-Net v2's trainer with the paper's recipe; registration
(``mambamorph``, ``mambamorph_feat``): ``engines.registration.train`` on a pair dataset folder; video
(``vivim``): ``engines.video.train`` on a video dataset folder — these two take ``DATASET`` as a folder and no
CONFIG/FOLD). Paths come from
``--preprocessed``/``--results`` or the environment (``MEDMAMBA_PREPROCESSED``/``MEDMAMBA_RESULTS``, else
nnU-Net's ``nnUNet_preprocessed``/``nnUNet_results``). stdout: the fold folder written.

Several GPUs: ``--num-gpus N`` starts N processes (DDP over NCCL), or run under ``torchrun --nproc_per_node N
-m medmamba train …`` (which also works on CPUs, over Gloo).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medmamba.cli.common import common_parser, scan_backend_context
from medmamba.errors import UsageError

__all__ = ["add_parser", "run"]

NETWORKS = ("umamba_bot", "umamba_enc", "segmamba", "mambamorph", "mambamorph_feat", "vivim")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``train``."""
    parser = subparsers.add_parser(
        "train",
        parents=[common_parser()],
        help="train a network on a preprocessed dataset",
        description="Train a network on a dataset prepared by `medmamba plan-and-preprocess`. Each network trains "
        "with its paper's recipe (U-Mamba: nnU-Net's defaults; SegMamba: cross-entropy, no deep supervision, poly LR "
        "per iteration); the options below override single fields. Writes RESULTS/<Dataset>/MedmambaTrainer__<plans>"
        "__<configuration>/fold_<FOLD>/ with checkpoints (every epoch, best, final), train.log and progress.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("dataset", metavar="DATASET", help="dataset id (e.g. 4), name (Dataset004_Demo) or folder")
    parser.add_argument(
        "configuration", metavar="CONFIG", nargs="?", help="configuration, e.g. 3d_fullres or 2d (segmentation only)"
    )
    parser.add_argument(
        "fold", metavar="FOLD", nargs="?", help="cross-validation fold 0-4, or 'all' (segmentation only)"
    )
    parser.add_argument("--network", required=True, choices=NETWORKS, help="which network to train")
    parser.add_argument("--plans", default="medmambaPlans", help="plans file name (without .json)")
    parser.add_argument(
        "--preprocessed", type=Path, default=None, help="preprocessed root (default: $MEDMAMBA_PREPROCESSED)"
    )
    parser.add_argument("--results", type=Path, default=None, help="results root (default: $MEDMAMBA_RESULTS)")
    recipe = parser.add_argument_group("recipe overrides (default: the network's paper recipe)")
    recipe.add_argument("--epochs", type=int, default=None, help="number of epochs (paper: 1000)")
    recipe.add_argument("--iterations-per-epoch", type=int, default=None, help="training iterations per epoch (250)")
    recipe.add_argument("--val-iterations", type=int, default=None, help="validation batches per epoch (50)")
    recipe.add_argument("--lr", type=float, default=None, help="initial learning rate (1e-2)")
    recipe.add_argument("--optimizer", choices=("sgd", "adamw", "adam"), default=None, help="optimiser (sgd)")
    recipe.add_argument("--weight-decay", type=float, default=None, help="weight decay (3e-5)")
    recipe.add_argument("--batch-size", type=int, default=None, help="images per step (default: the plans')")
    recipe.add_argument("--loss", choices=("dice_ce", "ce"), default=None, help="loss (U-Mamba dice_ce, SegMamba ce)")
    recipe.add_argument(
        "--deep-supervision",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train every decoder resolution (U-Mamba on, SegMamba off)",
    )
    recipe.add_argument(
        "--amp", choices=("bf16", "fp16", "fp32"), default=None, help="mixed precision on the GPU (bf16; CPU: fp32)"
    )
    recipe.add_argument(
        "--compile", action="store_true", default=None, help="torch.compile the network (never with Triton scans)"
    )
    recipe.add_argument("--seed", type=int, default=None, help="seed torch, numpy and random")
    from medmamba.cli._train_tasks import add_task_options

    add_task_options(parser)
    parser.add_argument("--resume", action="store_true", help="continue the fold's run from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in a fold folder that has checkpoints")
    parser.add_argument(
        "--no-validation",
        action="store_true",
        help="skip nnU-Net's final sliding-window validation of the fold's validation cases",
    )
    parser.add_argument(
        "--num-gpus", type=int, default=1, help="GPUs of this host for DDP (one process each); or use torchrun"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train; print the fold folder."""
    with _console(args):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    from medmamba.cli._train_tasks import run_task

    if run_task(args):  # registration and video networks: their own engines, no plans
        return 0
    if args.configuration is None or args.fold is None:
        raise UsageError(f"--network {args.network}: segmentation training needs DATASET CONFIG FOLD")
    preprocessed = _root(args.preprocessed, "--preprocessed", ("MEDMAMBA_PREPROCESSED", "nnUNet_preprocessed"))
    results = _root(args.results, "--results", ("MEDMAMBA_RESULTS", "nnUNet_results"), create=True)
    if args.num_gpus < 1:
        raise UsageError(f"--num-gpus {args.num_gpus}: must be at least 1")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run, or start afresh")
    workers = args.num_workers if args.num_workers is not None else min(os.cpu_count() or 1, 8)
    # nnunetv2 reads its worker counts from the environment, one of them at import time
    os.environ.setdefault("nnUNet_def_n_proc", str(max(1, workers)))
    if args.scan_backend:  # spawned DDP processes do not inherit the use_backend() context, only the environment
        os.environ["MEDMAMBA_SCAN_BACKEND"] = args.scan_backend

    from medmamba.networks import spec

    if spec(args.network).task != "segmentation":
        raise UsageError(
            f"--network {args.network}: training of {spec(args.network).task} networks is not available yet"
        )
    kwargs: dict[str, Any] = {
        "dataset": args.dataset,
        "configuration": args.configuration,
        "fold": args.fold,
        "network": args.network,
        "preprocessed": preprocessed,
        "results": results,
        "plans_name": args.plans,
        "overrides": {
            "num_epochs": args.epochs,
            "iterations_per_epoch": args.iterations_per_epoch,
            "val_iterations_per_epoch": args.val_iterations,
            "initial_lr": args.lr,
            "optimizer": args.optimizer,
            "weight_decay": args.weight_decay,
            "batch_size": args.batch_size,
            "loss": args.loss,
            "deep_supervision": args.deep_supervision,
            "amp_dtype": args.amp,
            "compile": args.compile,
            "seed": args.seed,
        },
        "device": args.device,
        "resume": args.resume,
        "overwrite": args.overwrite,
        "validate": not args.no_validation,
        "num_workers": args.num_workers,
    }
    if args.num_gpus > 1:
        from medmamba.engines.training import spawn

        if args.device not in ("auto", "cuda"):
            raise UsageError(f"--num-gpus {args.num_gpus} trains on CUDA devices; drop --device {args.device}")
        import torch

        if torch.cuda.device_count() < args.num_gpus:
            raise UsageError(f"--num-gpus {args.num_gpus}: only {torch.cuda.device_count()} CUDA device(s) visible")
        spawn(_rank_main, args.num_gpus, (kwargs,))
        print(_fold_folder(results, kwargs))
        return 0
    with scan_backend_context(args):
        from medmamba.engines.segmentation.trainer import train

        folder = train(**kwargs)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the folder; one line on stdout
        print(folder)
    return 0


def _rank_main(rank: int, kwargs: dict[str, Any]) -> None:
    from medmamba.engines.segmentation.trainer import train

    train(**{**kwargs, "device": "cuda"})


def _fold_folder(results: Path, kwargs: dict[str, Any]) -> Path:
    """Where a spawned run wrote (the ranks return nothing to the parent)."""
    matches = sorted(
        results.glob(f"*/MedmambaTrainer__{kwargs['plans_name']}__*{kwargs['network']}*/fold_{kwargs['fold']}")
    )
    return matches[-1] if matches else results


def _root(given: Path | None, option: str, variables: tuple[str, ...], *, create: bool = False) -> Path:
    if given is None:
        value = next((os.environ[v] for v in variables if os.environ.get(v)), None)
        if value is None:
            raise UsageError(f"{option} not given and ${variables[0]} not set. Pass {option} DIR or export it")
        given = Path(value)
    if create:
        given.mkdir(parents=True, exist_ok=True)
    elif not given.is_dir():
        raise UsageError(f"{option} {given}: no such folder. Run `medmamba plan-and-preprocess` first or fix the path")
    return given


@contextlib.contextmanager
def _console(args: argparse.Namespace) -> Iterator[None]:
    """Training reports one line per epoch on stderr (INFO); nnU-Net's own chatter only with -v, -q hides both."""
    level = logging.WARNING if args.quiet else logging.INFO
    handlers = [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]  # main()'s console
    before = [h.level for h in handlers]
    package = logging.getLogger("medmamba")
    package_level = package.level

    def hide_nnunet(record: logging.LogRecord) -> bool:
        return not record.name.endswith(".nnunet") or record.levelno >= logging.WARNING

    for handler in handlers:
        handler.setLevel(logging.DEBUG if args.verbose > 1 else level)
        if not args.verbose:
            handler.addFilter(hide_nnunet)
    package.setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
    try:
        yield
    finally:
        package.setLevel(package_level)
        for handler, old in zip(handlers, before, strict=True):
            handler.setLevel(old)
            handler.removeFilter(hide_nnunet)
