"""``medmamba train`` for registration and video networks: their options and the dispatch to their engines.

Kept beside ``cli/train.py`` so that the segmentation command stays as it is: ``train.py`` adds these options and
calls :func:`run_task` first; a network whose registry task is ``registration`` (MambaMorph) or ``video`` (Vivim)
trains here, on a dataset *folder* (Learn2Reg-style pairs or a video dataset), without plans.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from medmamba.cli.common import scan_backend_context
from medmamba.errors import UsageError

__all__ = ["add_task_options", "run_task"]


def add_task_options(parser: argparse.ArgumentParser) -> None:
    """The options only registration and video training read."""
    both = parser.add_argument_group("registration and video networks (DATASET is the dataset folder)")
    both.add_argument(
        "--output", type=Path, default=None, help="run folder (default: RESULTS/<dataset folder>/<network>)"
    )
    both.add_argument(
        "--network-kwargs",
        default=None,
        metavar="JSON",
        help="constructor arguments of the network, e.g. '{\"embed_dim\": 48}' (default: the paper's network)",
    )
    reg = parser.add_argument_group("registration loss (MambaMorph; default: Dice of warped labels + 0.1 smoothness)")
    reg.add_argument(
        "--similarity",
        choices=("lncc", "mi", "mse"),
        default=None,
        help="add an image similarity term: lncc (one modality), mi (MR-CT), mse",
    )
    reg.add_argument("--similarity-weight", type=float, default=None, help="its weight (1.0 when --similarity given)")
    reg.add_argument("--dice-weight", type=float, default=None, help="warped-label Dice, weak supervision (1.0)")
    reg.add_argument("--smoothness-weight", type=float, default=None, help="gradient L2 of the velocity (0.1)")
    reg.add_argument("--bending-weight", type=float, default=None, help="bending energy of the displacement (0)")
    reg.add_argument(
        "--contrastive-weight", type=float, default=None, help="MambaMorphFeat's contrastive term (feat: 0.001)"
    )
    video = parser.add_argument_group("video (Vivim)")
    video.add_argument("--clip-length", type=int, default=None, help="frames per clip, centred on the target (5)")
    video.add_argument(
        "--frame-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="frames are resized to (256 256)"
    )


def run_task(args: argparse.Namespace) -> bool:
    """Train a registration or video network and print its run folder; False for a segmentation network."""
    from medmamba.networks import spec

    task = spec(args.network).task
    if task == "segmentation":
        return False
    if args.configuration is not None or args.fold is not None:
        raise UsageError(
            f"--network {args.network}: {task} training takes the dataset folder only (no CONFIG/FOLD); "
            f"got {args.configuration!r} {args.fold!r}"
        )
    dataset = Path(args.dataset)
    if not (dataset / "dataset.json").is_file():
        raise UsageError(f"{dataset}: not a dataset folder (no dataset.json). Give the {task} dataset's folder")
    if args.num_gpus < 1:
        raise UsageError(f"--num-gpus {args.num_gpus}: must be at least 1")
    if args.scan_backend:  # spawned DDP processes inherit the environment, not the use_backend() context
        os.environ["MEDMAMBA_SCAN_BACKEND"] = args.scan_backend
    kwargs = _engine_kwargs(args, task)
    if args.num_gpus > 1:
        import torch

        from medmamba.engines.training import spawn

        if args.device not in ("auto", "cuda"):
            raise UsageError(f"--num-gpus {args.num_gpus} trains on CUDA devices; drop --device {args.device}")
        if torch.cuda.device_count() < args.num_gpus:
            raise UsageError(f"--num-gpus {args.num_gpus}: only {torch.cuda.device_count()} CUDA device(s) visible")
        spawn(_rank_main, args.num_gpus, (task, {**kwargs, "device": "cuda"}))
        print(kwargs["output"])
        return True
    with scan_backend_context(args):
        folder = _engine(task)(**kwargs)
    print(folder)
    return True


def _engine(task: str) -> Any:
    if task == "registration":
        from medmamba.engines.registration.train import train
    else:
        from medmamba.engines.video.train import train
    return train


def _rank_main(rank: int, task: str, kwargs: dict[str, Any]) -> None:
    _engine(task)(**kwargs)


def _engine_kwargs(args: argparse.Namespace, task: str) -> dict[str, Any]:
    network_kwargs = None
    if args.network_kwargs is not None:
        try:
            network_kwargs = json.loads(args.network_kwargs)
        except ValueError as err:
            raise UsageError(f"--network-kwargs: not JSON ({err}). Give e.g. '{{\"embed_dim\": 48}}'") from None
        if not isinstance(network_kwargs, dict):
            raise UsageError("--network-kwargs: give a JSON object, e.g. '{\"embed_dim\": 48}'")
    output = args.output
    if output is None:
        results = args.results or next(
            (Path(os.environ[v]) for v in ("MEDMAMBA_RESULTS", "nnUNet_results") if os.environ.get(v)), None
        )
        if results is None:
            raise UsageError("--results not given and $MEDMAMBA_RESULTS not set. Pass --results DIR or --output DIR")
        output = Path(results) / Path(args.dataset).resolve().name / args.network
    overrides: dict[str, Any] = {
        "num_epochs": args.epochs,
        "iterations_per_epoch": args.iterations_per_epoch,
        "val_iterations_per_epoch": args.val_iterations,
        "initial_lr": args.lr,
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "batch_size": args.batch_size,
        "loss": args.loss,
        "amp_dtype": args.amp,
        "compile": args.compile,
        "seed": args.seed,
    }
    kwargs: dict[str, Any] = {
        "dataset": Path(args.dataset),
        "results": output.parent,
        "network": args.network,
        "network_kwargs": network_kwargs,
        "output": output,
        "device": args.device,
        "resume": args.resume,
        "overwrite": args.overwrite,
    }
    if task == "registration":
        weights = {
            "dice": args.dice_weight,
            "smoothness": args.smoothness_weight,
            "bending": args.bending_weight,
            "contrastive": args.contrastive_weight,
        }
        if args.similarity is not None:
            weights[args.similarity] = 1.0 if args.similarity_weight is None else args.similarity_weight
        elif args.similarity_weight is not None:
            raise UsageError("--similarity-weight needs --similarity lncc|mi|mse")
        given = {k: v for k, v in weights.items() if v is not None}
        overrides["loss_weights"] = given or None
    else:
        if args.similarity is not None or args.dice_weight is not None or args.contrastive_weight is not None:
            raise UsageError(f"--network {args.network}: the registration loss options do not apply to video")
        kwargs["clip_length"] = args.clip_length
        kwargs["frame_size"] = tuple(args.frame_size) if args.frame_size else None
        kwargs["num_workers"] = args.num_workers
    kwargs["overrides"] = overrides
    return kwargs
