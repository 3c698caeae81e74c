"""``medmamba verify DATASET``: check a dataset and report every problem at once (exit 2), writing nothing."""

from __future__ import annotations

import argparse
import os

from medmamba.cli.common import common_parser

__all__ = ["add_parser", "raw_root", "run"]


def raw_root(args: argparse.Namespace) -> str | None:
    """``--raw-root``, else ``$MEDMAMBA_RAW``, else ``$nnUNet_raw`` (only the CLI reads the environment)."""
    return getattr(args, "raw_root", None) or os.environ.get("MEDMAMBA_RAW") or os.environ.get("nnUNet_raw")  # noqa: SIM112 - nnU-Net's name


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``verify``."""
    parser = subparsers.add_parser(
        "verify",
        parents=[common_parser()],
        help="check a dataset (nnU-Net raw, registration or video) and list every problem",
        description="Read every file of a dataset and report all problems at once: nnU-Net's integrity checks "
        "(dataset.json keys, case count, labels, channels, shapes, spacing, NaN) plus truncated or unreadable "
        "files, Inf, image/label geometry mismatch, undeclared or non-integer label values, missing channels and "
        "empty foreground. Exit code 0 when clean, 2 when there are problems. Nothing is written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("dataset", metavar="DATASET", help="dataset folder, DatasetXXX_Name or id XXX under --raw-root")
    parser.add_argument(
        "--raw-root", default=None, help="folder of raw datasets (default: $MEDMAMBA_RAW, else $nnUNet_raw)"
    )
    parser.add_argument(
        "--allow-empty-labels", action="store_true", help="report background-only label maps as warnings only"
    )
    parser.add_argument("--no-test", action="store_true", help="skip the unlabelled test images (imagesTs)")
    parser.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print a one-line summary (or the JSON report); problems raise DatasetError → exit 2."""
    import json
    import sys

    from medmamba.io.datasets import find_dataset
    from medmamba.io.verify import check_dataset

    root = find_dataset(args.dataset, raw_root(args))
    report = check_dataset(
        root,
        allow_empty_foreground=args.allow_empty_labels,
        check_test=not args.no_test,
        num_workers=args.num_workers or 1,
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0 if report.ok else 2
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    report.raise_for_problems()
    test = f", {report.num_test} test case(s)" if report.num_test else ""
    print(f"{root}: ok ({report.kind}, {report.num_cases} case(s){test}, {len(report.warnings)} warning(s))")
    return 0
