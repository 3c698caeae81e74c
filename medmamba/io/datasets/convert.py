"""Import other layouts into nnU-Net's raw format: Medical Segmentation Decathlon tasks and DICOM trees.

Both converters check everything first and report every problem at once (``DatasetError``); the dataset is
built in a hidden temporary folder, verified with ``medmamba.io.verify`` and only then renamed into place, so
a failed conversion writes nothing.

* ``convert_msd``: an MSD ``TaskXX_Name`` folder (4-D multi-channel NIfTIs, MSD dataset.json) →
  ``DatasetXXX_Name``, splitting channels with nnunetv2's own ``split_4d_nifti``. Sources are read once with
  medmamba's reader first, because SimpleITK (inside nnunetv2) reads a truncated NIfTI as zeros.
* ``convert_dicom_tree``: one sub-folder per case holding its DICOM series (one per channel) and, for
  training cases, one label map file (NIfTI/NRRD/MHA) on the series' grid::

      SOURCE/
        case_a/  <DICOM files, any depth>  label.nii.gz
        case_b/  <DICOM files>                              (no label: goes to imagesTs)
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmamba.errors import DatasetError, MedmambaError, Problem
from medmamba.io.atomic import atomic_dir, write_json
from medmamba.io.datasets.nnunet_raw import dataset_folder_name
from medmamba.io.dicom import DicomSeries, check_dicom_series, find_dicom_series, read_dicom_series
from medmamba.io.image import NIFTI_ENDINGS, SUPPORTED_ENDINGS, image_ending, read_image, write_image

__all__ = ["convert_dicom_tree", "convert_msd"]

logger = logging.getLogger(__name__)

_MSD_NAME = re.compile(r"^Task(\d+)_(.+)$")


def convert_msd(
    task_folder: str | os.PathLike[str],
    raw_root: str | os.PathLike[str],
    *,
    dataset_id: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a Medical Segmentation Decathlon task folder into ``raw_root/DatasetXXX_Name``.

    Args:
        task_folder: ``TaskXX_Name`` with ``imagesTr``, ``labelsTr``, (``imagesTs``) and the MSD ``dataset.json``.
        raw_root: folder that receives the dataset.
        dataset_id: target id (default: the task's number).
        overwrite: replace an existing dataset of the same folder name.

    Returns:
        The new dataset folder.

    Raises:
        DatasetError: every problem found in the source (layout, dataset.json, unreadable files) or the result.
    """
    from nnunetv2.dataset_conversion.convert_MSD_dataset import split_4d_nifti

    source = Path(task_folder)
    problems: list[Problem] = []
    match = _MSD_NAME.match(source.name)
    if not match:
        problems.append(
            Problem(
                str(source),
                "folder name is not TaskXX_Name",
                "Keep the Decathlon's folder name (e.g. Task04_Hippocampus)",
            )
        )
    problems += [
        Problem(str(source / sub), "missing", "Give the extracted MSD task folder")
        for sub in ("imagesTr", "labelsTr")
        if not (source / sub).is_dir()
    ]
    meta = _read_msd_json(source / "dataset.json", problems)
    if problems or meta is None or match is None:
        raise DatasetError(problems, header=f"{source}: cannot convert this MSD task")
    target_id = int(match.group(1)) if dataset_id is None else dataset_id
    target = Path(raw_root) / dataset_folder_name(target_id, match.group(2))
    _check_free(target, raw_root, target_id, overwrite)

    def listing(sub: str) -> list[Path]:
        folder = source / sub
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.name.endswith(".nii.gz") and not p.name.startswith((".", "_")))

    images_tr, labels_tr, images_ts = listing("imagesTr"), listing("labelsTr"), listing("imagesTs")
    channels = len(meta["modality"])
    for path in images_tr + images_ts:
        try:
            image = read_image(path, multi_volume=True)
        except MedmambaError as err:
            problems.append(Problem(str(path), str(err).removeprefix(f"{path}: ")))
            continue
        if image.num_volumes != channels:
            problems.append(
                Problem(
                    str(path),
                    f"has {image.num_volumes} volume(s), dataset.json declares {channels} modalities",
                    "Fix the file or the modality list",
                )
            )
    label_names = {p.name for p in labels_tr}
    problems += [
        Problem(
            str(source / "labelsTr" / p.name),
            "missing: an image in imagesTr has no label",
            "Add it or remove the image",
        )
        for p in images_tr
        if p.name not in label_names
    ]
    if problems:
        raise DatasetError(problems, header=f"{source}: cannot convert this MSD task")
    with atomic_dir(target, overwrite=overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        for path in images_tr:
            split_4d_nifti(str(path), str(tmp / "imagesTr"))
        for path in images_ts:
            split_4d_nifti(str(path), str(tmp / "imagesTs"))
        for path in labels_tr:
            shutil.copyfile(path, tmp / "labelsTr" / path.name)
        dataset_json: dict[str, Any] = {
            "channel_names": {str(k): v for k, v in meta["modality"].items()},
            "labels": {name: int(value) for value, name in meta["labels"].items()},
            "numTraining": len(images_tr),
            "file_ending": ".nii.gz",
            **{
                k: meta[k]
                for k in ("name", "description", "reference", "licence", "release", "tensorImageSize")
                if k in meta
            },
            "converted_by": f"medmamba convert msd ({source.name})",
        }
        write_json(tmp / "dataset.json", dataset_json)
        _verify_or_raise(tmp, target)
    logger.info("MSD task %s converted to %s", source.name, target)
    return target


def _read_msd_json(path: Path, problems: list[Problem]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append(Problem(str(path), "missing", "Give the extracted MSD task folder (it ships a dataset.json)"))
        return None
    except (OSError, ValueError) as err:
        problems.append(
            Problem(str(path), f"cannot be read as JSON ({err})", "Restore the task's original dataset.json")
        )
        return None
    problems += [
        Problem(str(path), f"no {key!r} object (MSD format: index → name)", "Restore the task's original dataset.json")
        for key in ("modality", "labels")
        if not isinstance(data.get(key), dict) or not data.get(key)
    ]
    if problems:
        return None
    try:
        {int(k): v for k, v in data["labels"].items()}
    except ValueError:
        problems.append(
            Problem(
                str(path),
                "labels keys are not integers (MSD format is value → name)",
                "Restore the task's original dataset.json",
            )
        )
        return None
    return data


def convert_dicom_tree(
    source: str | os.PathLike[str],
    raw_root: str | os.PathLike[str],
    *,
    dataset_id: int,
    name: str,
    labels: Mapping[str, int],
    channel_names: Sequence[str] | None = None,
    channel_series: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Convert a tree of DICOM series with label maps into ``raw_root/DatasetXXX_Name``.

    Args:
        source: folder with one sub-folder per case (its name is the case id).
        raw_root: folder that receives the dataset.
        dataset_id: 1…999.
        name: dataset name.
        labels: name → value, with ``background: 0`` (the dataset.json ``labels``).
        channel_names: one name per channel (default: the series' Modality). The name picks nnU-Net's
            normalisation ("CT" → CT normalisation).
        channel_series: with several series per case, one SeriesDescription pattern per channel (fnmatch,
            case-insensitive, e.g. ``["*T1*", "*FLAIR*"]``); without it each case must hold exactly one series.
        overwrite: replace an existing dataset folder.

    Returns:
        The new dataset folder.

    Raises:
        DatasetError: every problem of every case (several or no series, unreadable series, non-uniform slices,
            missing/extra label files, label values, image/label grid mismatch).
    """
    source = Path(source)
    if not source.is_dir():
        raise DatasetError([Problem(str(source), "is not a folder", "Give the folder with one sub-folder per case")])
    target = Path(raw_root) / dataset_folder_name(dataset_id, name)
    _check_free(target, raw_root, dataset_id, overwrite)
    cases = sorted(p for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    problems: list[Problem] = []
    if not cases:
        problems.append(
            Problem(str(source), "has no case sub-folders", "Put each case's series (and label) in its own folder")
        )
    patterns = list(channel_series) if channel_series else None
    num_channels = len(patterns) if patterns else (len(channel_names) if channel_names else 1)
    if channel_names is not None and len(channel_names) != num_channels:
        problems.append(
            Problem(
                str(source),
                f"{len(channel_names)} channel name(s) for {num_channels} channel(s)",
                "Give one name per --channel-series pattern",
            )
        )
    plan: list[tuple[str, list[DicomSeries], Path | None]] = []
    for case in cases:
        case_id = re.sub(r"[^A-Za-z0-9_.-]", "_", case.name)
        series = _case_series(case, patterns, num_channels, problems)
        label_files = [p for p in sorted(case.iterdir()) if p.is_file() and image_ending(p) in SUPPORTED_ENDINGS]
        if len(label_files) > 1:
            problems.append(
                Problem(
                    str(case),
                    f"{len(label_files)} label files ({', '.join(p.name for p in label_files)})",
                    "Keep one label map per case",
                )
            )
        if series is not None and len(label_files) <= 1:
            plan.append((case_id, series, label_files[0] if label_files else None))
    # problems of the whole tree go into one report: cases that passed the header checks are converted into
    # the temporary folder and verified, and their findings join the header findings before anything is kept
    if not plan:
        raise DatasetError(
            problems or [Problem(str(source), "no case to convert", "Check the folder")],
            header=f"{source}: cannot convert this DICOM tree",
        )
    names = (
        list(channel_names) if channel_names else [plan[0][1][c].modality or f"channel{c}" for c in range(num_channels)]
    )
    declared = sorted(int(v) for v in labels.values())
    with atomic_dir(target, overwrite=overwrite) as tmp:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (tmp / sub).mkdir()
        num_training = 0
        for case_id, series, label_file in plan:
            folder = tmp / ("imagesTr" if label_file is not None else "imagesTs")
            try:
                images = [read_dicom_series(s) for s in series]
            except MedmambaError as err:
                problems.append(Problem(str(source / case_id), str(err)))
                continue
            for channel, image in enumerate(images):
                write_image(image, folder / f"{case_id}_{channel:04d}.nii.gz")
            if label_file is not None:
                num_training += 1
                _write_label(label_file, tmp / "labelsTr" / f"{case_id}.nii.gz", declared, problems)
        write_json(
            tmp / "dataset.json",
            {
                "channel_names": {str(i): n for i, n in enumerate(names)},
                "labels": {str(k): int(v) for k, v in labels.items()},
                "numTraining": num_training,
                "file_ending": ".nii.gz",
                "name": name,
                "converted_by": f"medmamba convert dicom ({source.name})",
            },
        )
        _verify_or_raise(tmp, target, problems, header=f"{source}: cannot convert this DICOM tree (nothing written)")
    logger.info("DICOM tree %s converted to %s", source, target)
    return target


def _case_series(
    case: Path, patterns: list[str] | None, channels: int, problems: list[Problem]
) -> list[DicomSeries] | None:
    try:
        found = find_dicom_series(case)
    except MedmambaError as err:
        problems.append(Problem(str(case), str(err).removeprefix(f"{case}: ")))
        return None
    listing = "; ".join(s.summary() for s in found)
    if patterns is None:
        if len(found) == 1 and not _slices_ok(found[0], problems):
            return None
        if len(found) != 1:
            problems.append(
                Problem(
                    str(case),
                    f"holds {len(found)} series ({listing})",
                    "Keep one series per case, or choose them with --channel-series PATTERN per channel",
                )
            )
            return None
        return found
    chosen = []
    for pattern in patterns:
        hits = [s for s in found if fnmatch.fnmatch(s.description.lower(), pattern.lower())]
        if len(hits) != 1:
            problems.append(
                Problem(
                    str(case),
                    f"{len(hits)} series match {pattern!r} (series: {listing})",
                    "Make each --channel-series pattern match exactly one SeriesDescription",
                )
            )
            return None
        if not _slices_ok(hits[0], problems):
            return None
        chosen.append(hits[0])
    return chosen if len(chosen) == channels else None


def _slices_ok(series: DicomSeries, problems: list[Problem]) -> bool:
    try:
        check_dicom_series(series)
    except MedmambaError as err:
        folder = series.files[0].parent
        problems.append(Problem(str(folder), str(err).removeprefix(f"{folder}: ").removeprefix(f"{folder} ")))
        return False
    return True


def _write_label(path: Path, target: Path, declared: Sequence[int], problems: list[Problem]) -> None:
    try:
        label = read_image(path)
    except MedmambaError as err:
        problems.append(Problem(str(path), str(err).removeprefix(f"{path}: ")))
        return
    if label.array.dtype.kind == "f" and not np.array_equal(label.array, np.round(label.array)):
        problems.append(Problem(str(path), "non-integer label values", "Store the label map as integers"))
        return
    if image_ending(path) in NIFTI_ENDINGS and image_ending(path) == ".nii.gz" and label.array.dtype.kind in "iu":
        shutil.copyfile(path, target)  # already what nnU-Net wants: keep the file byte for byte
        return
    write_image(label, target, dtype=np.uint8 if max(declared, default=0) < 256 else np.uint16)


def _check_free(target: Path, raw_root: str | os.PathLike[str], dataset_id: int, overwrite: bool) -> None:
    others = (
        [p.name for p in Path(raw_root).glob(f"Dataset{dataset_id:03d}_*") if p != target]
        if Path(raw_root).is_dir()
        else []
    )
    if others:
        raise DatasetError(
            [
                Problem(
                    str(raw_root), f"dataset id {dataset_id} is taken by {', '.join(others)}", "Choose another id (-d)"
                )
            ],
            header="not converting",
        )
    if target.exists() and not overwrite:
        raise DatasetError(
            [Problem(str(target), "already exists", "Remove it, choose another id, or pass --overwrite")],
            header="not converting",
        )


def _verify_or_raise(tmp: Path, target: Path, earlier: Sequence[Problem] = (), header: str | None = None) -> None:
    from medmamba.io.verify import check_dataset

    report = check_dataset(tmp)
    # report paths as the user will know them, not the temporary folder's
    problems = [*earlier, *(Problem(p.path.replace(str(tmp), str(target)), p.what, p.fix) for p in report.problems)]
    if problems:
        raise DatasetError(problems, header=header or f"{target}: the converted dataset has problems (nothing written)")
