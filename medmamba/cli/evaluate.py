"""``medmamba evaluate -ref LABELS -pred PREDICTIONS``: Dice, HD95 and surface Dice per case and class.

``--task registration -pred REGISTERED``: warped-label Dice/HD95 before and after, folding and std of log-Jacobian
of the pair folders ``medmamba register`` wrote. ``--task video``: Dice and IoU per video case.

stdout: the mean of each metric per structure, then the paths of ``metrics.json`` and ``metrics.csv``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medmamba.cli.common import common_parser
from medmamba.errors import UsageError

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``evaluate``."""
    parser = subparsers.add_parser(
        "evaluate",
        parents=[common_parser()],
        help="score label maps against references (Dice, HD95, surface Dice)",
        description="Pair the label maps of PREDICTIONS with those of LABELS by case name, check that each pair "
        "lies on one grid, and compute per case and structure Dice, 95th-percentile Hausdorff distance (mm) and "
        "surface Dice (MONAI metrics), with their means; written to metrics.json and metrics.csv.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--task",
        choices=("segmentation", "registration", "video"),
        default="segmentation",
        help="what to score: label maps, `medmamba register` pair folders (-pred only), or per-frame video masks",
    )
    parser.add_argument(
        "-ref", "--reference", type=Path, default=None, help="folder (or file) of reference labels (not registration)"
    )
    parser.add_argument("-pred", "--prediction", required=True, type=Path, help="folder (or file) of predictions")
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="folder for metrics.json/.csv (default: the predictions')"
    )
    parser.add_argument(
        "-l",
        "--labels",
        nargs="+",
        default=None,
        help="labels to score; '1,2,3' scores a region (default: every label in the references)",
    )
    parser.add_argument(
        "--tolerance-mm",
        type=float,
        nargs="+",
        default=[1.0],
        help="surface-Dice tolerance in mm: one value, or one per label",
    )
    parser.add_argument(
        "--allow-missing", action="store_true", help="score the cases that have a prediction, list the others"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate; print the means and the files written."""
    from medmamba.engines.evaluate import evaluate_segmentations

    structures = [_structure(text) for text in args.labels] if args.labels else None
    if args.task != "segmentation":
        from medmamba.cli._evaluate_tasks import run_task

        return run_task(args, structures)
    if args.reference is None:
        raise UsageError("-ref/--reference is required: the folder (or file) of reference label maps")
    tolerance = args.tolerance_mm[0] if len(args.tolerance_mm) == 1 else args.tolerance_mm
    table, json_path, csv_path = evaluate_segmentations(
        args.reference,
        args.prediction,
        args.output,
        structures=structures,
        tolerance_mm=tolerance,
        allow_missing=args.allow_missing,
    )
    means = table.means()
    print(f"{'structure':<12} {'Dice':>8} {'HD95 mm':>9} {'NSD':>8}   ({len(table.rows)} cases)")
    for name, values in [*means.items(), ("foreground", table.foreground_mean())]:
        print(f"{name:<12} {_fmt(values['dice']):>8} {_fmt(values['hd95']):>9} {_fmt(values['surface_dice']):>8}")
    print(json_path)
    print(csv_path)
    return 0


def _structure(text: str) -> int | tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--labels {text}: not a label (e.g. 1) or a region (e.g. 1,2,3)") from None
    return values[0] if len(values) == 1 else values


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
