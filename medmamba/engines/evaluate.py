"""Evaluate label maps against references: pair files by case, check their grids, score, write JSON and CSV.

Metrics are MONAI's (``medmamba.metrics.segmentation``): Dice, HD95 and surface Dice per structure and case, in
mm from each image's own spacing; ``medmamba.metrics.tables`` adds the means. A prediction must lie on exactly
its reference's grid (shape, spacing, origin, direction): a shifted or resampled prediction is reported as an
error instead of being scored wrongly.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmamba._progress import progress
from medmamba.errors import DatasetError, GeometryError, ImageReadError, Problem, UsageError
from medmamba.io.atomic import atomic_write
from medmamba.io.geometry import Geometry
from medmamba.io.image import image_ending, read_image
from medmamba.metrics.segmentation import Structure, segmentation_metrics, structure_name
from medmamba.metrics.tables import MetricTable

__all__ = [
    "METRICS",
    "REGISTRATION_METRICS",
    "VIDEO_METRICS",
    "evaluate_registrations",
    "evaluate_segmentations",
    "evaluate_videos",
    "pair_cases",
]

logger = logging.getLogger(__name__)

METRICS = ("dice", "hd95", "surface_dice", "n_reference", "n_prediction")
#: files ``medmamba predict --save-probabilities`` writes beside the label maps; not label maps themselves
_NOT_LABELS = ("_probabilities",)


def evaluate_segmentations(
    reference: str | os.PathLike[str],
    prediction: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    structures: Sequence[Structure] | None = None,
    tolerance_mm: float | Sequence[float] | Mapping[Structure, float] = 1.0,
    allow_missing: bool = False,
) -> tuple[MetricTable, Path, Path]:
    """Score every predicted case against its reference; write ``metrics.json`` and ``metrics.csv``.

    Args:
        reference: folder of reference label maps (``<case>.nii.gz``), or one file.
        prediction: folder of predicted label maps with the same case names, or one file.
        output: folder for the two tables (created); default: the prediction folder (a file's folder).
        structures: labels (``1``) or regions (``(1, 2, 3)``) to score; default: every non-zero label that occurs
            in the references.
        tolerance_mm: surface-Dice tolerance, one value or one per structure.
        allow_missing: score the cases that have both files instead of failing on references without
            prediction (the missing ones are listed in the JSON's ``meta``).

    Returns:
        the table, and the paths of the JSON and CSV written.

    Raises:
        DatasetError: predictions without reference, or references without prediction (unless allowed).
        GeometryError: a prediction on another grid than its reference.
        ImageReadError: unreadable file, or a label map with non-integer values.
    """
    pairs, missing = pair_cases(reference, prediction, allow_missing=allow_missing)
    references = {case: _read_labels(path) for case, (path, _) in pairs.items()}
    if structures is None:
        found = sorted({int(v) for image, _ in references.values() for v in np.unique(image)} - {0})
        structures = found
        if not structures:
            raise UsageError(f"{reference}: the references hold no label but background. Pass the labels to score")
    table = MetricTable(
        METRICS,
        meta={
            "reference": str(reference),
            "prediction": str(prediction),
            "structures": [structure_name(s) for s in structures],
            "tolerance_mm": _tolerance_meta(structures, tolerance_mm),
            "missing_predictions": missing,
            "convention": "Dice 0 / surface Dice 0 / HD95 null when exactly one of reference and prediction is "
            "empty; all null when both are; means skip null",
        },
    )
    for case in progress(list(pairs), desc="evaluate", total=len(pairs)):
        ref_path, pred_path = pairs[case]
        ref, geometry = references[case]
        pred, pred_geometry = _read_labels(pred_path)
        if pred.shape != ref.shape or geometry.mismatches(pred_geometry):
            what = (
                f"shape {pred.shape} vs {ref.shape}"
                if pred.shape != ref.shape
                else "; ".join(geometry.mismatches(pred_geometry))
            )
            raise GeometryError(
                f"{pred_path}: does not lie on the grid of its reference {ref_path} ({what}). Predict with `medmamba "
                "predict`, which writes label maps in the input's geometry"
            )
        scores = segmentation_metrics(ref, pred, structures, spacing=tuple(geometry.spacing), tolerance_mm=tolerance_mm)
        table.add(case, {structure_name(s): m.to_dict() for s, m in scores.items()})
    folder = Path(output) if output is not None else _default_output(Path(prediction))
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "metrics.json", folder / "metrics.csv"
    for path, text in ((json_path, table.to_json()), (csv_path, table.to_csv())):
        with atomic_write(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return table, json_path, csv_path


def pair_cases(
    reference: str | os.PathLike[str], prediction: str | os.PathLike[str], *, allow_missing: bool = False
) -> tuple[dict[str, tuple[Path, Path]], list[str]]:
    """Pair reference and prediction files by case id (file name without its ending).

    Returns ``case → (reference file, prediction file)`` and the ids of references without prediction.

    Raises:
        DatasetError: nothing to pair, predictions without reference, or references without prediction.
    """
    refs, preds = _label_files(Path(reference)), _label_files(Path(prediction))
    if Path(reference).is_file() and Path(prediction).is_file():  # two files: pair them whatever their names
        (ref_path,), (pred_path,) = refs.values(), preds.values()
        return {next(iter(preds)): (ref_path, pred_path)}, []
    orphans = sorted(set(preds) - set(refs))
    missing = sorted(set(refs) - set(preds))
    problems = [Problem(str(preds[c]), "has no reference label map", f"Add {c}.nii.gz to {reference}") for c in orphans]
    if missing and not allow_missing:
        problems += [
            Problem(str(refs[c]), "has no prediction", "Predict it, or pass --allow-missing to score the others")
            for c in missing
        ]
    if problems:
        raise DatasetError(problems, header="reference and prediction cases do not match")
    pairs = {case: (refs[case], preds[case]) for case in sorted(set(refs) & set(preds))}
    if not pairs:
        raise DatasetError([Problem(str(prediction), "no case to evaluate", "Check the two folders")])
    return pairs, missing


def _label_files(path: Path) -> dict[str, Path]:
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".") and image_ending(p))
    else:
        raise ImageReadError(f"{path}: does not exist. Give a folder of label maps or one label file")
    cases = {}
    for file in files:
        case = file.name[: -len(image_ending(file) or "")]
        if not case.endswith(_NOT_LABELS):
            cases[case] = file
    return cases


def _read_labels(path: Path) -> tuple[np.ndarray, Geometry]:
    image = read_image(path)
    array = np.asarray(image.array)
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise ImageReadError(f"{path}: holds non-integer values; it is not a label map. Give label maps")
        array = rounded.astype(np.int32)
    return array, image.geometry


def _default_output(prediction: Path) -> Path:
    return prediction if prediction.is_dir() else prediction.parent


def _tolerance_meta(
    structures: Sequence[Structure], tolerance_mm: float | Sequence[float] | Mapping[Structure, float]
) -> dict[str, float]:
    if isinstance(tolerance_mm, Mapping):
        missing = [structure_name(s) for s in structures if s not in tolerance_mm]
        if missing:
            raise UsageError(f"no surface-Dice tolerance for structure(s) {', '.join(missing)}; give one per structure")
        return {structure_name(s): float(tolerance_mm[s]) for s in structures}
    if isinstance(tolerance_mm, (int, float)):
        return {structure_name(s): float(tolerance_mm) for s in structures}
    if len(tolerance_mm) != len(structures):
        raise UsageError(
            f"{len(tolerance_mm)} surface-Dice tolerances for {len(structures)} structures "
            f"({', '.join(structure_name(s) for s in structures)}); give one value or one per structure"
        )
    return {structure_name(s): float(t) for s, t in zip(structures, tolerance_mm, strict=True)}


# --- registration: the pair folders of `medmamba register` ------------------------------------------------------------

#: columns of a registration table: per label the overlap after and before registration; per pair the field's regularity
REGISTRATION_METRICS = (
    "dice",
    "hd95",
    "dice_initial",
    "hd95_initial",
    "folding_fraction",
    "std_log_jacobian",
    "jacobian_min",
    "displacement_mean_mm",
)


def evaluate_registrations(
    registered: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    structures: Sequence[Structure] | None = None,
) -> tuple[MetricTable, Path, Path]:
    """Score registered pairs: warped-label Dice/HD95 (and before registration), folding, std of log-Jacobian.

    Reads the folders ``medmamba register`` writes (``pair.json``, ``displacement.nii.gz``, ``warped_labels.nii.gz``):
    per pair, the row ``field`` holds the displacement's ``folding_fraction`` (share of voxels with ``det J ≤ 0``),
    ``std_log_jacobian``, ``jacobian_min`` and ``displacement_mean_mm``; each label's row holds Dice and HD95 (mm) of
    the warped moving labels against the fixed labels, and ``dice_initial``/``hd95_initial`` of the moving labels
    without registration (resampled onto the fixed grid when needed). Pairs registered without labels get the
    ``field`` row only. ``metrics.json`` and ``metrics.csv`` go to ``output`` (default: ``registered``).

    Args:
        registered: the output folder of ``medmamba register`` (or one pair's folder).
        output: folder for the two tables.
        structures: labels or regions to score; default: every non-zero label of the fixed label maps.

    Raises:
        DatasetError: no pair folder found.
        GeometryError: a displacement field or warped label map not on its fixed image's grid.
    """
    from medmamba.engines.registration.register import displacement_to_voxels, read_displacement_field, resample_onto
    from medmamba.metrics.registration import deformation_metrics, warped_label_metrics

    root = Path(registered)
    folders = [root] if (root / "pair.json").is_file() else sorted(p.parent for p in root.glob("*/pair.json"))
    if not folders:
        raise DatasetError([Problem(str(root), "holds no pair folder (*/pair.json)", "Run `medmamba register` first")])
    table = MetricTable(
        REGISTRATION_METRICS,
        meta={
            "registered": str(root),
            "convention": "row 'field': regularity of the displacement (det J of x + u(x), central differences); "
            "label rows: Dice/HD95 (mm) of warped moving labels vs fixed labels, *_initial without registration; "
            "means skip null",
        },
    )
    for folder in progress(folders, desc="evaluate", total=len(folders)):
        info = json.loads((folder / "pair.json").read_text(encoding="utf-8"))
        fixed = read_image(info["fixed"])
        displacement, geometry = read_displacement_field(folder / "displacement.nii.gz")
        _same_grid(folder / "displacement.nii.gz", displacement.shape[:3], geometry, info["fixed"], fixed)
        ddf = displacement_to_voxels(displacement, geometry)
        rows: dict[str, dict[str, float | None]] = {
            "field": {
                k: _finite(v) for k, v in deformation_metrics(ddf, spacing=list(geometry.spacing)).to_dict().items()
            }
        }
        warped_path = folder / "warped_labels.nii.gz"
        if info.get("fixed_labels") and warped_path.is_file():
            fixed_labels, fixed_geometry = _read_labels(Path(info["fixed_labels"]))
            warped, warped_geometry = _read_labels(warped_path)
            _same_grid(warped_path, warped.shape, warped_geometry, info["fixed_labels"], fixed)
            moving = read_image(info["moving_labels"])
            initial = resample_onto(moving, fixed, nearest=True)
            chosen = structures or sorted({int(v) for v in np.unique(fixed_labels)} - {0})
            spacing = list(fixed_geometry.spacing)
            after = warped_label_metrics(fixed_labels, warped, chosen, spacing=spacing)
            before = warped_label_metrics(fixed_labels, initial, chosen, spacing=spacing)
            for s in chosen:
                rows[structure_name(s)] = {
                    "dice": _finite(after[s]["dice"]),
                    "hd95": _finite(after[s]["hd95"]),
                    "dice_initial": _finite(before[s]["dice"]),
                    "hd95_initial": _finite(before[s]["hd95"]),
                }
        table.add(folder.name, rows)
    folder = Path(output) if output is not None else root
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "metrics.json", folder / "metrics.csv"
    for path, text in ((json_path, table.to_json()), (csv_path, table.to_csv())):
        with atomic_write(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return table, json_path, csv_path


def _same_grid(path: Path, shape: Sequence[int], geometry: Geometry, reference_path: str, reference: Any) -> None:
    if tuple(shape) != tuple(reference.shape) or reference.geometry.mismatches(geometry):
        what = (
            f"shape {tuple(shape)} vs {tuple(reference.shape)}"
            if tuple(shape) != tuple(reference.shape)
            else "; ".join(reference.geometry.mismatches(geometry))
        )
        raise GeometryError(
            f"{path}: does not lie on the grid of its fixed image {reference_path} ({what}). Register again with "
            "`medmamba register`"
        )


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


# --- video: per-frame masks of `medmamba predict` on video cases -----------------------------------------------------

#: columns of a video table
VIDEO_METRICS = ("dice", "iou", "frame_dice", "n_frames")


def evaluate_videos(
    reference: str | os.PathLike[str],
    prediction: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    labels: Sequence[int] | None = None,
) -> tuple[MetricTable, Path, Path]:
    """Score predicted video masks against reference masks: Dice, IoU and mean frame Dice per case and label.

    A case is a folder of per-frame masks (``FFFF.png``, as ``medmamba predict`` and the video dataset format write
    them) or a 2D+t NIfTI ``CASE.nii.gz``; cases pair by name. ``reference`` may also be a video dataset's root (its
    ``masksTr`` is used). ``metrics.json`` and ``metrics.csv`` go to ``output`` (default: the prediction folder).

    Raises:
        DatasetError: cases without a counterpart, or nothing to pair.
        GeometryError: a prediction with another number of frames or another frame size than its reference.
    """
    from medmamba.metrics.video import video_metrics

    ref_root = Path(reference)
    if (ref_root / "dataset.json").is_file() and (ref_root / "masksTr").is_dir():
        ref_root = ref_root / "masksTr"
    refs, preds = _video_cases(ref_root), _video_cases(Path(prediction))
    problems = [
        Problem(str(preds[c]), "has no reference masks", f"Add {c} to {ref_root}")
        for c in sorted(set(preds) - set(refs))
    ] + [Problem(str(refs[c]), "has no prediction", "Predict it") for c in sorted(set(refs) - set(preds))]
    if problems:
        raise DatasetError(problems, header="reference and prediction videos do not match")
    if not refs:
        raise DatasetError([Problem(str(prediction), "no video case to evaluate", "Check the two folders")])
    masks = {case: _video_masks(path) for case, path in refs.items()}
    chosen = list(labels) if labels else sorted({int(v) for m in masks.values() for v in np.unique(m)} - {0})
    table = MetricTable(
        VIDEO_METRICS,
        meta={
            "reference": str(ref_root),
            "prediction": str(prediction),
            "labels": chosen,
            "convention": "dice/iou pool every pixel of every frame; frame_dice averages the frames where the label "
            "is in the reference or the prediction; null when it is in neither",
        },
    )
    for case in progress(sorted(refs), desc="evaluate", total=len(refs)):
        ref, pred = masks[case], _video_masks(preds[case])
        if ref.shape != pred.shape:
            raise GeometryError(
                f"{preds[case]}: {pred.shape[0]} frames of {pred.shape[1:]} but its reference has {ref.shape[0]} of "
                f"{ref.shape[1:]}. Predict with `medmamba predict`, which keeps every frame's size"
            )
        scores = video_metrics(ref, pred, chosen)
        table.add(case, {str(k): {**v, "n_frames": int(ref.shape[0])} for k, v in scores.items()})
    folder = Path(output) if output is not None else _default_output(Path(prediction))
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / "metrics.json", folder / "metrics.csv"
    for path, text in ((json_path, table.to_json()), (csv_path, table.to_csv())):
        with atomic_write(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return table, json_path, csv_path


def _video_cases(folder: Path) -> dict[str, Path]:
    """Case id → mask folder (``FFFF.png`` files) or 2D+t NIfTI."""
    if not folder.is_dir():
        raise ImageReadError(f"{folder}: is not a folder. Give a folder of per-case mask folders or 2D+t NIfTIs")
    cases = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and any(p.suffix == ".png" for p in entry.iterdir()):
            cases[entry.name] = entry
        elif entry.is_file() and image_ending(entry) in (".nii.gz", ".nii"):
            cases[entry.name[: -len(image_ending(entry) or "")]] = entry
    return cases


def _video_masks(path: Path) -> np.ndarray:
    """``(T, X, Y)`` integer masks of a case."""
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix == ".png" and not p.name.startswith("."))
        planes = [read_image(p).array for p in frames]
        return np.stack([a[..., 0] if a.ndim == 3 else a for a in planes]).astype(np.int32)
    array, _ = _read_labels(path)
    return np.moveaxis(array, -1, 0)
