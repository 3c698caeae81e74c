"""``medmamba evaluate --task registration|video``: the scoring of registered pairs and of video masks.

Kept beside ``cli/evaluate.py``, which calls :func:`run_task` for any task but segmentation.
"""

from __future__ import annotations

import argparse

from medmamba.errors import UsageError

__all__ = ["run_task"]


def run_task(args: argparse.Namespace, structures: list | None) -> int:
    """Score, print the means and the tables written."""
    if args.task == "registration":
        from medmamba.engines.evaluate import evaluate_registrations

        if args.reference is not None:
            raise UsageError("--task registration reads the fixed labels from each pair.json; drop -ref")
        table, json_path, csv_path = evaluate_registrations(args.prediction, args.output, structures=structures)
        means = table.means()
        print(f"{'structure':<12} {'Dice':>8} {'before':>8} {'HD95 mm':>9} {'before':>8}   ({len(table.rows)} pairs)")
        label_rows = {k: v for k, v in means.items() if k != "field"}
        for name, values in [*label_rows.items(), ("mean", table.foreground_mean())]:
            cells = (values["dice"], values["dice_initial"], values["hd95"], values["hd95_initial"])
            print(
                f"{name:<12} "
                + " ".join(f"{_fmt(v):>8}" for v in cells[:2])
                + f" {_fmt(cells[2]):>9} "
                + (f"{_fmt(cells[3]):>8}")
            )
        field = means.get("field", {})
        print(
            f"folding (det J <= 0) {_fmt(field.get('folding_fraction'), percent=True)}, "
            f"std log|J| {_fmt(field.get('std_log_jacobian'))}"
        )
    else:
        from medmamba.engines.evaluate import evaluate_videos

        if args.reference is None:
            raise UsageError(
                "-ref/--reference is required: the reference masks (a video dataset's masksTr or a folder)"
            )
        table, json_path, csv_path = evaluate_videos(args.reference, args.prediction, args.output, labels=structures)
        print(f"{'label':<12} {'Dice':>8} {'IoU':>8} {'frame Dice':>11}   ({len(table.rows)} cases)")
        for name, values in [*table.means().items(), ("mean", table.foreground_mean())]:
            print(f"{name:<12} {_fmt(values['dice']):>8} {_fmt(values['iou']):>8} {_fmt(values['frame_dice']):>11}")
    print(json_path)
    print(csv_path)
    return 0


def _fmt(value: float | None, *, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.3f} %" if percent else f"{value:.4f}"
