"""The demo's report folder: figures and the same numbers as HTML, Markdown and JSON.

Figures are training curves and overlays on the MRI slices. Everything is read back from the files the demo's
steps wrote (checkpoints, label maps, displacement fields, ``metrics.json``), so the report shows what is on disk.
"""

from __future__ import annotations

import html
import json
import shlex
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medmamba.engines.checkpoint import load_checkpoint
from medmamba.io.image import Image, read_image

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from medmamba.engines.demo import _DemoRun

#: label value → (name, overlay colour); the demo datasets' labels
TISSUES = {1: ("grey matter", (1.0, 0.55, 0.0)), 2: ("white matter", (0.1, 0.7, 1.0))}
_PLANE = {"S": "axial", "I": "axial", "A": "coronal", "P": "coronal", "L": "sagittal", "R": "sagittal"}
_UP = {"axial": "A", "coronal": "S", "sagittal": "S"}  # which end points up in each view
_DPI = 90


def write(folder: Path, run: _DemoRun) -> dict[str, Any]:
    """Write figures, ``index.html`` and ``README.md`` into ``folder``; returns the summary's new entries."""
    summary: dict[str, Any] = {"generated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    figures: dict[str, list[str]] = {"curves": [], "segmentation": [], "registration": []}
    if _curves(folder / "training_curves.png", run):
        figures["curves"].append("training_curves.png")
    if "table" in run.seg:
        summary["segmentation"] = _segmentation_summary(run)
        for case in run.seg["held_out"]:
            name = f"segmentation_{case}.png"
            _segmentation_figure(folder / name, run, case, summary["segmentation"]["per_case"][case])
            figures["segmentation"].append(name)
    if "table" in run.reg:
        summary["registration"] = _registration_summary(run)
        for pair, values in summary["registration"]["per_pair"].items():
            name = f"registration_{pair}.png"
            _registration_figure(folder / name, run.reg["registrations"] / pair, pair, values)
            figures["registration"].append(name)
    summary["figures"] = figures
    summary["commands"] = [{"step": step, "argv": argv} for step, argv in run.commands]
    full = {**run.summary, **summary}
    (folder / "README.md").write_text(_markdown(full, run), encoding="utf-8")
    (folder / "index.html").write_text(_html(full, run), encoding="utf-8")
    return summary


# --- numbers ------------------------------------------------------------------------------------------------------
def _segmentation_summary(run: _DemoRun) -> dict[str, Any]:
    table = run.seg["table"]
    names = {str(value): name for value, (name, _) in TISSUES.items()}
    per_case = {
        case: {names.get(s, s): {k: v.get(k) for k in ("dice", "hd95", "surface_dice")} for s, v in rows.items()}
        for case, rows in table.rows.items()
    }
    means = {names.get(s, s): {k: v[k] for k in ("dice", "hd95", "surface_dice")} for s, v in table.means().items()}
    foreground = {k: v for k, v in table.foreground_mean().items() if k in ("dice", "hd95", "surface_dice")}
    checkpoint = load_checkpoint(run.seg["fold"] / "checkpoint_final.pth")
    return {
        "dataset": run.seg["raw"].name,
        "network": run.network,
        "configuration": f"3d_demo_{run.network}",
        "architecture": {
            k: run.seg["architecture"][k] for k in ("features_per_stage", "strides") if k in run.seg["architecture"]
        },
        "patch_size": list(run.settings.patch),
        "planned": run.seg["planned"],
        "spacing_mm": run.seg["spacing"],
        "epochs": checkpoint["current_epoch"],
        "iterations_per_epoch": run.settings.iterations,
        "held_out": run.seg["held_out"],
        "per_case": per_case,
        "mean": means,
        "foreground_mean": foreground,
        "surface_dice_tolerance_mm": 1.0,
        "metrics_file": str(run.seg["metrics_file"]),
        "model": str(run.seg["fold"].parent),
    }


def _registration_summary(run: _DemoRun) -> dict[str, Any]:
    table = run.reg["table"]
    names = {str(value): name for value, (name, _) in TISSUES.items()}
    per_pair: dict[str, Any] = {}
    for pair, rows in table.rows.items():
        field = rows.get("field", {})
        per_pair[pair] = {
            "structures": {names.get(s, s): dict(v) for s, v in rows.items() if s != "field"},
            "folding_fraction": field.get("folding_fraction"),
            "std_log_jacobian": field.get("std_log_jacobian"),
            "jacobian_min": field.get("jacobian_min"),
            "displacement_mean_mm": field.get("displacement_mean_mm"),
        }
    return {
        "dataset": run.reg["dataset"].name,
        "network": "mambamorph",
        "network_kwargs": run.reg["network_kwargs"],
        "grid": {"shape": list(run.settings.grid_shape), "spacing_mm": run.settings.grid_spacing},
        "epochs": run.settings.reg_epochs,
        "per_pair": per_pair,
        "foreground_mean": table.foreground_mean(),
        "metrics_file": str(run.reg["metrics_file"]),
        "model": str(run.reg["run"]),
    }


# --- figures ------------------------------------------------------------------------------------------------------
def _figure(rows: int, columns: int, size: tuple[float, float]):
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.subplots(rows, columns, squeeze=False)


def _curves(path: Path, run: _DemoRun) -> bool:
    panels: list[tuple[str, dict[str, list[float]], str]] = []
    if "fold" in run.seg:
        log = load_checkpoint(run.seg["fold"] / "checkpoint_final.pth")["logging"]
        panels.append(("segmentation loss", {"train": log["train_losses"], "validation": log["val_losses"]}, "loss"))
        panels.append(("segmentation pseudo Dice", {"mean": log["mean_fg_dice"], "EMA": log["ema_fg_dice"]}, "Dice"))
    if "run" in run.reg:
        history = load_checkpoint(run.reg["run"] / "checkpoint_final.pth")["loop_state"]["history"]
        panels.append(
            ("registration loss", {"train": history["train_loss"], "validation": history["val_loss"]}, "loss")
        )
        panels.append(("registration: validation Dice of warped labels", {"Dice": history.get("val_dice", [])}, "Dice"))
    if not panels:
        return False
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure((len(panels) + 1) // 2, 2, (10, 3.2 * ((len(panels) + 1) // 2)))
    for ax, (title, series, ylabel) in zip(axes.ravel(), panels, strict=False):
        for label, values in series.items():
            values = [np.nan if v is None else float(v) for v in values]
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes.ravel()[len(panels) :]:
        ax.set_axis_off()
    fig.savefig(path, dpi=_DPI)
    return True


def _views(image: Image) -> list[tuple[str, int, int, int]]:
    """``(plane, sliced axis, column axis, row axis)`` for the axial, coronal and sagittal views of ``image``."""
    codes = image.geometry.axcodes
    views = []
    for axis in range(3):
        plane = _PLANE[codes[axis]]
        rest = [a for a in range(3) if a != axis]
        row = next((a for a in rest if codes[a] in (_UP[plane], _OPPOSITE[_UP[plane]])), rest[1])
        views.append((plane, axis, next(a for a in rest if a != row), row))
    order = {"axial": 0, "coronal": 1, "sagittal": 2}
    return sorted(views, key=lambda v: order[v[0]])


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def _slice(array: np.ndarray, image: Image, view: tuple[str, int, int, int], index: int) -> np.ndarray:
    """Slice ``index`` of ``view`` as ``(row, column)`` for ``imshow``.

    The view's 'up' end is on top, the patient's right on the viewer's left (axial, coronal), the front on the left
    (sagittal).
    """
    plane, axis, column, row = view
    picked = np.take(array, index, axis=axis)  # the other two axes, in increasing order
    shown = picked if [a for a in range(3) if a != axis].index(row) == 0 else picked.T
    codes = image.geometry.axcodes
    if codes[row] == _UP[plane]:  # the index grows towards the top end, imshow draws row 0 on top
        shown = shown[::-1]
    if codes[column] == ("A" if plane == "sagittal" else "R"):
        shown = shown[:, ::-1]
    return shown


def _aspect(image: Image, view: tuple[str, int, int, int]) -> float:
    spacing = image.geometry.spacing
    return float(spacing[view[3]] / spacing[view[2]])


def _grey(ax: Axes, data: np.ndarray, aspect: float, limits: tuple[float, float]) -> None:
    ax.imshow(data, cmap="gray", vmin=limits[0], vmax=limits[1], aspect=aspect, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _overlay(ax: Axes, labels: np.ndarray, aspect: float) -> None:
    from matplotlib.colors import ListedColormap

    colours = [(0, 0, 0, 0)] + [(*TISSUES[v][1], 0.45) for v in sorted(TISSUES)]
    ax.imshow(
        labels, cmap=ListedColormap(colours), vmin=0, vmax=len(colours) - 1, aspect=aspect, interpolation="nearest"
    )


def _centre(labels: np.ndarray) -> list[int]:
    foreground = np.argwhere(labels > 0)
    if len(foreground) == 0:
        return [s // 2 for s in labels.shape]
    return [int(v) for v in np.round(foreground.mean(axis=0))]


def _limits(array: np.ndarray) -> tuple[float, float]:
    low, high = np.percentile(array[np.isfinite(array)], [1, 99.5])
    return float(low), float(max(high, low + 1e-6))


def _segmentation_figure(path: Path, run: _DemoRun, case: str, scores: Mapping[str, Any]) -> None:
    image = read_image(run.seg["images"] / f"{case}_0000.nii.gz")
    reference = read_image(run.seg["labels"] / f"{case}.nii.gz").array
    prediction = read_image(run.seg["predictions"] / f"{case}.nii.gz").array
    views = _views(image)
    centre = _centre(reference)
    limits = _limits(image.array)
    fig, axes = _figure(2, 3, (10, 7.2))
    for column, view in enumerate(views):
        aspect = _aspect(image, view)
        for row, (title, labels) in enumerate((("reference", reference), ("prediction", prediction))):
            ax = axes[row, column]
            _grey(ax, _slice(image.array, image, view, centre[view[1]]), aspect, limits)
            _overlay(ax, _slice(labels, image, view, centre[view[1]]), aspect)
            ax.set_title(f"{title} · {view[0]}", fontsize="medium")
    dice = ", ".join(f"{name} {_num(values.get('dice'))}" for name, values in scores.items())
    handles = _legend_handles()
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")
    fig.suptitle(f"{case} (held out): T1 with labels — Dice {dice}")
    fig.savefig(path, dpi=_DPI)


def _legend_handles() -> list[Any]:
    from matplotlib.patches import Patch

    return [Patch(color=colour, alpha=0.6, label=name) for name, colour in TISSUES.values()]


def _registration_figure(path: Path, folder: Path, pair: str, values: Mapping[str, Any]) -> None:
    from medmamba.engines.registration.register import displacement_to_voxels, read_displacement_field
    from medmamba.metrics.registration import jacobian_determinant

    info = json.loads((folder / "pair.json").read_text(encoding="utf-8"))
    fixed, moving = read_image(info["fixed"]), read_image(info["moving"])
    warped = read_image(folder / "warped.nii.gz")
    displacement, geometry = read_displacement_field(folder / "displacement.nii.gz")
    det = jacobian_determinant(displacement_to_voxels(displacement, geometry))
    moving_on_fixed = moving.array if moving.shape == fixed.shape else None
    labels = read_image(info["fixed_labels"]).array if info.get("fixed_labels") else fixed.array > 0
    centre = _centre(np.asarray(labels))
    views = _views(fixed)[:2]  # axial and coronal
    limits = _limits(fixed.array)
    columns: list[tuple[str, np.ndarray | None, str]] = [
        ("fixed", fixed.array, "grey"),
        ("moving", moving_on_fixed, "grey"),
        ("warped moving", warped.array, "grey"),
        ("|fixed − moving|", None if moving_on_fixed is None else np.abs(fixed.array - moving_on_fixed), "diff"),
        ("|fixed − warped|", np.abs(fixed.array - warped.array), "diff"),
        ("det J (1 = no volume change)", det, "jac"),
    ]
    difference = float(np.percentile(np.abs(fixed.array - warped.array), 99.5)) or 1.0
    fig, axes = _figure(len(views), len(columns), (15, 2.9 * len(views) + 0.8))
    for row, view in enumerate(views):
        aspect = _aspect(fixed, view)
        index = centre[view[1]]
        for column, (title, data, kind) in enumerate(columns):
            ax = axes[row, column]
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{title} · {view[0]}", fontsize="small")
            if data is None:
                ax.set_axis_off()
                continue
            shown = _slice(data, fixed, view, index)
            if kind == "grey":
                _grey(ax, shown, aspect, limits)
            elif kind == "diff":
                ax.imshow(shown, cmap="magma", vmin=0, vmax=difference, aspect=aspect, interpolation="nearest")
            else:
                im = ax.imshow(shown, cmap="RdBu_r", vmin=0.0, vmax=2.0, aspect=aspect, interpolation="nearest")
                if row == 0:
                    fig.colorbar(im, ax=ax, shrink=0.8)
    structures = values.get("structures", {})
    dice = ", ".join(f"{name} {_num(v.get('dice_initial'))} → {_num(v.get('dice'))}" for name, v in structures.items())
    folding = values.get("folding_fraction")
    fig.suptitle(f"{pair} (held out): warped-label Dice before → after: {dice}; folding {_percent(folding)} of voxels")
    fig.savefig(path, dpi=_DPI)


# --- text -------------------------------------------------------------------------------------------------------
def _num(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{float(value):.{digits}f}"


def _percent(value: Any) -> str:
    return "n/a" if value is None else f"{100 * float(value):.3f} %"


def _segmentation_rows(seg: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for case, structures in seg["per_case"].items():
        for name, v in structures.items():
            rows.append([case, name, _num(v["dice"]), _num(v["hd95"], 2), _num(v["surface_dice"])])
    for name, v in seg["mean"].items():
        rows.append(["**mean**", name, _num(v["dice"]), _num(v["hd95"], 2), _num(v["surface_dice"])])
    fg = seg["foreground_mean"]
    rows.append(["**mean**", "foreground", _num(fg["dice"]), _num(fg["hd95"], 2), _num(fg["surface_dice"])])
    return rows


def _registration_rows(reg: Mapping[str, Any]) -> tuple[list[list[str]], list[list[str]]]:
    labels, fields = [], []
    for pair, values in reg["per_pair"].items():
        for name, v in values["structures"].items():
            labels.append(
                [pair, name, _num(v.get("dice_initial")), _num(v.get("dice")), _num(v.get("hd95_initial"), 2),
                 _num(v.get("hd95"), 2)]
            )  # fmt: skip
        fields.append(
            [pair, _percent(values["folding_fraction"]), _num(values["std_log_jacobian"]), _num(values["jacobian_min"]),
             _num(values["displacement_mean_mm"], 2)]
        )  # fmt: skip
    return labels, fields


_SEG_HEADER = ["case", "structure", "Dice", "HD95 (mm)", "surface Dice (1 mm)"]
_REG_HEADER = ["pair (moving → fixed)", "structure", "Dice before", "Dice after", "HD95 before (mm)", "HD95 after (mm)"]
_FIELD_HEADER = ["pair", "folding (det J ≤ 0)", "SD of log det J", "min det J", "mean displacement (mm)"]

_DATA_NOTE = (
    "Data: the MNI ICBM152 2009a T1 template and its tissue maps (Fonov et al., NeuroImage 2011), shipped inside "
    "nilearn's wheel. Every case is the template deformed by a random smooth field, with bias field, noise and "
    "anisotropic resampling: real anatomy, synthetic variation. Labels: grey and white matter."
)
_COMMANDS_NOTE = (
    "The demo runs these steps in one process through the same engines; the lines below redo them one at a time "
    "on its folders. Two settings have no command-line option: the `3d_demo_*` configuration is one the demo adds "
    "to the plans (a narrower network and a smaller patch), and the registration grid comes from "
    "`build_demo_registration(spacing=…, shape=…)`."
)
_HONESTY_NOTE = (
    "These numbers come from this run: a few minutes of training of deliberately small networks on the device "
    "above. They show the pipeline working end to end, not what the papers' networks reach after 1000 epochs."
)


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(summary: Mapping[str, Any], run: _DemoRun) -> str:
    parts = [
        "# medmamba demo report",
        "",
        (
            f"medmamba {summary['medmamba']}, torch {summary['torch']}, device {summary['device']}, "
            f"{summary['machine']}; seed {summary['seed']}; {_minutes(summary)}."
        ),
        "",
        _DATA_NOTE,
        "",
        _HONESTY_NOTE,
        "",
    ]
    parts += [f"![training curves]({name})" for name in summary["figures"]["curves"]]
    if "segmentation" in summary:
        seg = summary["segmentation"]
        parts += [
            "",
            f"## Segmentation: {seg['network']} on {seg['dataset']}",
            "",
            (
                f"Configuration `{seg['configuration']}` (inherits the planned `3d_fullres_{seg['network']}`; "
                f"features {seg['architecture'].get('features_per_stage')}, patch {seg['patch_size']} at "
                f"{seg['spacing_mm']} mm), "
                f"{seg['epochs']} epochs × {seg['iterations_per_epoch']} iterations. Held-out cases (fold 0's "
                f"validation cases, never trained on): {', '.join(seg['held_out'])}."
            ),
            "",
            _markdown_table(_SEG_HEADER, _segmentation_rows(seg)),
            "",
        ]
        parts += [f"![{name}]({name})" for name in summary["figures"]["segmentation"]]
    if "registration" in summary:
        reg = summary["registration"]
        labels, fields = _registration_rows(reg)
        parts += [
            "",
            f"## Registration: MambaMorph on {reg['dataset']}",
            "",
            (
                f"{reg['network_kwargs']}, grid {reg['grid']['shape']} at {reg['grid']['spacing_mm']} mm, "
                f"{reg['epochs']} epochs; the held-out pairs were never trained on."
            ),
            "",
            _markdown_table(_REG_HEADER, labels),
            "",
            _markdown_table(_FIELD_HEADER, fields),
            "",
        ]
        parts += [f"![{name}]({name})" for name in summary["figures"]["registration"]]
    parts += ["", "## Each step as a command", "", _COMMANDS_NOTE, "", "```bash"]
    parts += [f"{shlex.join(argv)}   # {step}" for step, argv in run.commands]
    parts += ["```", "", f"Every number above is in `summary.json`; the per-case tables in `{_relative(run)}`.", ""]
    return "\n".join(parts)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c.replace('**', ''))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html(summary: Mapping[str, Any], run: _DemoRun) -> str:
    def images(names: Sequence[str]) -> str:
        return "".join(f'<p><img src="{html.escape(n)}" alt="{html.escape(n)}"></p>' for n in names)

    body = [
        "<h1>medmamba demo report</h1>",
        (
            f"<p>medmamba {html.escape(summary['medmamba'])}, torch {html.escape(summary['torch'])}, device "
            f"{html.escape(summary['device'])}, {html.escape(summary['machine'])}; seed {summary['seed']}; "
            f"{html.escape(_minutes(summary))}.</p>"
        ),
        f"<p>{html.escape(_DATA_NOTE)}</p>",
        f"<p><em>{html.escape(_HONESTY_NOTE)}</em></p>",
        images(summary["figures"]["curves"]),
    ]
    if "segmentation" in summary:
        seg = summary["segmentation"]
        body += [
            f"<h2>Segmentation: {html.escape(seg['network'])} on {html.escape(seg['dataset'])}</h2>",
            (
                f"<p>Configuration <code>{html.escape(seg['configuration'])}</code>, {seg['epochs']} epochs × "
                f"{seg['iterations_per_epoch']} iterations, patch {seg['patch_size']}. Held-out cases (never trained "
                f"on): {html.escape(', '.join(seg['held_out']))}.</p>"
            ),
            _html_table(_SEG_HEADER, _segmentation_rows(seg)),
            images(summary["figures"]["segmentation"]),
        ]
    if "registration" in summary:
        reg = summary["registration"]
        labels, fields = _registration_rows(reg)
        body += [
            f"<h2>Registration: MambaMorph on {html.escape(reg['dataset'])}</h2>",
            (
                f"<p>{html.escape(str(reg['network_kwargs']))}, grid {reg['grid']['shape']} at "
                f"{reg['grid']['spacing_mm']} mm, {reg['epochs']} epochs; held-out pairs.</p>"
            ),
            _html_table(_REG_HEADER, labels),
            _html_table(_FIELD_HEADER, fields),
            images(summary["figures"]["registration"]),
        ]
    commands = "\n".join(f"{shlex.join(argv)}   # {step}" for step, argv in run.commands)
    body += [
        "<h2>Each step as a command</h2>",
        f"<p>{html.escape(_COMMANDS_NOTE)}</p>",
        f"<pre>{html.escape(commands)}</pre>",
    ]
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}"
        "th{background:#f3f3f3}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>medmamba demo report</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _minutes(summary: Mapping[str, Any]) -> str:
    seconds = sum(summary.get("timings_s", {}).values())
    return f"{seconds / 60:.1f} minutes for the steps before the report"


def _relative(run: _DemoRun) -> str:
    files = [run.seg.get("metrics_file"), run.reg.get("metrics_file")]
    return "`, `".join(str(Path(f).relative_to(run.root)) for f in files if f is not None)
