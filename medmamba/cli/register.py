"""``medmamba register --fixed F --moving M -m MODEL_DIR -o OUT``: register image pairs with a trained MambaMorph.

stdout: one line per pair folder written (``OUT/<moving>_to_<fixed>/``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medmamba.cli.common import common_parser, scan_backend_context
from medmamba.errors import UsageError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``register``."""
    parser = subparsers.add_parser(
        "register",
        parents=[common_parser()],
        help="register image pairs with a trained registration model",
        description="Warp each moving image onto its fixed image with the model MODEL_DIR that `medmamba train "
        "--network mambamorph` wrote. Pairs: two files, two folders of images with matching names, or the pairs of "
        "a dataset split (--dataset). Images of any size are resampled to the model's grid and the displacement "
        "back. Per pair, OUT/<moving>_to_<fixed>/ gets warped.nii.gz, displacement.nii.gz (ITK displacement field: "
        "LPS millimetres on the fixed grid, warped(p) = moving(p + u(p))), warped_labels.nii.gz (nearest "
        "neighbour, with --moving-labels) and pair.json — all in exactly the fixed image's geometry.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--fixed", type=Path, default=None, help="fixed image file, or a folder of them")
    parser.add_argument("--moving", type=Path, default=None, help="moving image file, or a folder (same file names)")
    parser.add_argument("--moving-labels", type=Path, default=None, help="label map(s) of the moving image(s)")
    parser.add_argument(
        "--fixed-labels", type=Path, default=None, help="label map(s) of the fixed image(s), recorded for evaluate"
    )
    parser.add_argument(
        "--dataset", type=Path, default=None, help="a registration dataset folder: register the pairs of --split"
    )
    parser.add_argument("--split", choices=("train", "val", "test"), default="test", help="the --dataset split")
    parser.add_argument("-m", "--model", required=True, type=Path, help="the run folder of `medmamba train`")
    parser.add_argument("-o", "--output", required=True, type=Path, help="output folder (one sub-folder per pair)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file in the model folder")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Register; print the pair folders written."""
    from medmamba.engines.registration.register import pairs_from_dataset, pairs_from_paths, register

    if args.dataset is not None:
        if args.fixed or args.moving or args.moving_labels or args.fixed_labels:
            raise UsageError("--dataset registers the dataset's pairs; drop --fixed/--moving/--*-labels")
        jobs = pairs_from_dataset(args.dataset, args.split)
    else:
        if args.fixed is None or args.moving is None:
            raise UsageError("give --fixed and --moving (files or folders), or --dataset DIR")
        jobs = pairs_from_paths(
            args.fixed, args.moving, moving_labels=args.moving_labels, fixed_labels=args.fixed_labels
        )
    with scan_backend_context(args):
        written = register(jobs, args.output, args.model, checkpoint=args.checkpoint, device=args.device)
    for folder in written:
        print(folder)
    return 0
