"""``medmamba demo``: the main job on data that ships — dataset, plan, train, predict, register, evaluate, report.

stdout: the headline numbers, then the report's ``index.html`` path (last line).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medmamba.cli.common import common_parser, scan_backend_context

__all__ = ["add_parser", "run"]

NETWORKS = ("umamba_bot", "umamba_enc", "segmamba")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        parents=[common_parser()],
        help="run the whole pipeline on data that ships and write a report",
        description="Build the MNI-derived demo datasets (real MNI152 anatomy, synthetic variation; nothing is "
        "downloaded), plan and preprocess, train a small segmentation network (GPU if present, else CPU) and a small "
        "MambaMorph, segment and register held-out cases, evaluate them (Dice, HD95, surface Dice; warped-label "
        "Dice, folding) and write OUTPUT/report/: index.html and README.md with the numbers, training curves and "
        "overlays on the MRI slices, and summary.json. About 7 minutes on an idle 2-core CPU; --quick is a smoke run "
        "of a minute or two whose numbers mean little.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-o", "--output", type=Path, default=Path("medmamba-demo"), help="the demo's folder")
    parser.add_argument("--network", choices=NETWORKS, default="umamba_bot", help="segmentation network to train")
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the pipeline, not the numbers")
    parser.add_argument("--seed", type=int, default=0, help="seeds the data and the training")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier demo in OUTPUT")
    parser.add_argument("--no-segmentation", action="store_true", help="skip the segmentation part")
    parser.add_argument("--no-registration", action="store_true", help="skip the registration part")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo; print the headline numbers and the report path."""
    _console(args)
    from medmamba.engines.demo import FULL, QUICK, run_demo

    with scan_backend_context(args):
        result = run_demo(
            args.output,
            network=args.network,
            settings=QUICK if args.quick else FULL,
            device=args.device,
            seed=args.seed,
            overwrite=args.overwrite,
            segmentation=not args.no_segmentation,
            registration=not args.no_registration,
        )
    summary = result.summary
    if "segmentation" in summary:
        seg = summary["segmentation"]
        fg = seg["foreground_mean"]
        print(
            f"segmentation ({seg['network']}, {len(seg['held_out'])} held-out cases): mean Dice {_num(fg['dice'])}, "
            f"HD95 {_num(fg['hd95'], 2)} mm, surface Dice {_num(fg['surface_dice'])}"
        )
    if "registration" in summary:
        fg = summary["registration"]["foreground_mean"]
        folding = None if fg["folding_fraction"] is None else 100 * fg["folding_fraction"]
        print(
            f"registration (MambaMorph, {len(summary['registration']['per_pair'])} held-out pairs): warped-label Dice "
            f"{_num(fg['dice_initial'])} -> {_num(fg['dice'])}, folding {_num(folding)} % of voxels"
        )
    print(f"report: {result.report / 'index.html'}")
    return 0


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _console(args: argparse.Namespace) -> None:
    """The demo narrates its steps and epochs on stderr (INFO); -q keeps warnings only."""
    level = logging.WARNING if args.quiet else logging.INFO
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # the console handler main() installed
            handler.setLevel(logging.DEBUG if args.verbose > 1 else level)
            if not args.verbose:  # nnU-Net's own chatter only with -v
                handler.addFilter(lambda r: not r.name.endswith(".nnunet") or r.levelno >= logging.WARNING)
    logging.getLogger("medmamba").setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
