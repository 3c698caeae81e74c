"""Preprocessing through nnunetv2's ``DefaultPreprocessor``, in this process (or a pool sized to the machine).

Per case nnunetv2's own ``run_case_save`` does the work (transpose, crop to non-zero, normalise, resample,
foreground locations, Blosc2 files; ``plans-and-pipeline.md`` §3.1-3.2). What changes is around it:

* **Resumable.** nnU-Net's ``run`` deletes the output folder and redoes every case. Here a case whose files are all
  present is skipped; a case is written to a staging folder and moved in (data, segmentation, then the ``.pkl``
  last), so an interrupted run never leaves half a case that would count as done. A record of the settings that
  shape the data (spacing, transpose, normalisation, resampling, intensity statistics, patch size for the chunk
  layout, nnunetv2 version) sits beside the folder; when it differs, the folder is rebuilt.
* **Workers** follow cores and available RAM (``plans._resources``); small datasets run in-process, because a
  spawn pool costs seconds of re-imports per worker.
* **One pass per data folder.** Our configurations inherit nnU-Net's data (``3d_fullres_umamba_bot`` →
  ``3d_fullres``), so each distinct ``data_identifier`` is preprocessed once.

The data folder itself holds only nnU-Net's files (its dataset class infers the format from the file endings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from medmamba.errors import PlanError
from medmamba.io.atomic import atomic_write, write_json
from medmamba.io.datasets.nnunet_raw import RawCase, RawDataset

from ._resources import run_jobs, worker_count
from .fingerprint import voxel_count

__all__ = ["PreprocessResult", "case_files", "preprocess"]

logger = logging.getLogger(__name__)

#: configuration keys that change the preprocessed arrays (or, for patch_size, their chunk layout)
_DATA_KEYS = (
    "spacing",
    "normalization_schemes",
    "use_mask_for_norm",
    "resampling_fn_data",
    "resampling_fn_seg",
    "resampling_fn_data_kwargs",
    "resampling_fn_seg_kwargs",
    "preprocessor_name",
    "patch_size",
)


@dataclass(frozen=True, slots=True)
class PreprocessResult:
    """What one data folder got: its path, the configuration that made it, cases written and cases skipped."""

    folder: Path
    configuration: str
    written: tuple[str, ...]
    skipped: tuple[str, ...]


def case_files(folder: Path, case_id: str) -> tuple[Path, Path, Path]:
    """The three files nnunetv2 writes per case, the ``.pkl`` (written last) at the end."""
    return folder / f"{case_id}.b2nd", folder / f"{case_id}_seg.b2nd", folder / f"{case_id}.pkl"


def preprocess(
    dataset: RawDataset,
    plans_file: str | Path,
    configurations: Sequence[str],
    *,
    num_workers: int | None = None,
) -> list[PreprocessResult]:
    """Preprocess ``dataset`` for ``configurations`` of a plans file, skipping cases already done.

    Must run with nnunetv2 pointed at the raw and preprocessed roots (``plans._nnunet.nnunet_folders``): its
    reader and preprocessor classes are found by name.

    Args:
        dataset: the raw dataset (verified).
        plans_file: ``<preprocessed>/DatasetXXX_Name/<plans>.json``; its folder receives the data folders,
            ``dataset.json`` must be there (the planner copies it) and ``gt_segmentations/`` is filled.
        configurations: configuration names; several that share a data folder are done once.
        num_workers: worker processes; ``None`` follows cores, RAM and the dataset's size.

    Returns:
        one result per data folder, in the order of ``configurations``.

    Raises:
        PlanError: a configuration is not in the plans.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans_file = Path(plans_file)
    plans = json.loads(plans_file.read_text(encoding="utf-8"))
    manager = PlansManager(plans)
    missing = [c for c in configurations if c not in manager.available_configurations]
    if missing:
        raise PlanError(
            f"{plans_file}: no configuration {', '.join(missing)}. "
            f"Choose from {', '.join(manager.available_configurations)}"
        )
    root = plans_file.parent
    dataset_json = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    results, done = [], set()
    for name in configurations:
        config = manager.get_configuration(name)
        if config.data_identifier in done:
            continue
        done.add(config.data_identifier)
        results.append(_preprocess_configuration(dataset, manager, name, root, dataset_json, num_workers))
    _copy_ground_truth(dataset, root / "gt_segmentations")
    return results


def _preprocess_configuration(
    dataset: RawDataset,
    manager: Any,
    name: str,
    root: Path,
    dataset_json: dict,
    num_workers: int | None,
) -> PreprocessResult:
    config = manager.get_configuration(name)
    folder = root / config.data_identifier
    record_file = root / f"{config.data_identifier}.medmamba.json"
    record = _record(manager, config)
    if folder.exists() and (not record_file.is_file() or json.loads(record_file.read_text()) != record):
        logger.warning("%s was made with other settings (or by another tool); rebuilding it", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(record_file, record)
    staging = root / f".{config.data_identifier}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    todo = [c for c in dataset.training if not all(p.is_file() for p in case_files(folder, c.case_id))]
    skipped = tuple(c.case_id for c in dataset.training if c not in todo)
    if skipped:
        logger.info("%s: %d case(s) already preprocessed, skipped", name, len(skipped))
    voxels = [voxel_count(c.images[0]) for c in todo]
    channels = len(dataset_json["channel_names"])
    # the case in float32, cropped and resampled copies of data and one-hot segmentation, resampling temporaries
    per_case = max(voxels, default=0) * (channels + 2) * 4 * 6
    workers = worker_count(len(todo), per_case, total_voxels=sum(voxels), requested=num_workers)
    logger.info("%s: preprocessing %d case(s) with %d worker(s) into %s", name, len(todo), workers, folder)
    jobs = [(str(staging / c.case_id), _strings(c), manager, config, dataset_json) for c in todo]

    def commit(index: int, _: Any) -> None:
        # a finished case moves in at once, data first and the properties file last: it counts as done only whole
        case_id = todo[index].case_id
        for source, target in zip(case_files(staging, case_id), case_files(folder, case_id), strict=True):
            source.replace(target)

    try:
        run_jobs(_run_case_save, jobs, workers, desc=f"Preprocessing {name}", on_done=commit)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return PreprocessResult(folder, name, tuple(c.case_id for c in todo), skipped)


def _run_case_save(prefix: str, files: tuple[list[str], str], manager: Any, config: Any, dataset_json: dict) -> None:
    """One case through nnunetv2's preprocessor (a top-level function, so a spawn pool can pickle it)."""
    preprocessor = config.preprocessor_class(verbose=False)
    preprocessor.run_case_save(prefix, files[0], files[1], manager, config, dataset_json)


def _strings(case: RawCase) -> tuple[list[str], str]:
    return [str(p) for p in case.images], str(case.label)


def _record(manager: Any, config: Any) -> dict[str, Any]:
    settings = {key: config.configuration.get(key) for key in _DATA_KEYS}
    settings["transpose_forward"] = manager.transpose_forward
    settings["image_reader_writer"] = manager.plans["image_reader_writer"]
    settings["intensity"] = manager.foreground_intensity_properties_per_channel
    settings["nnunetv2"] = metadata.version("nnunetv2")
    blob = json.dumps(settings, sort_keys=True, default=str).encode()
    return {
        "settings_sha256": hashlib.sha256(blob).hexdigest(),
        "settings": json.loads(json.dumps(settings, default=str)),
    }


def _copy_ground_truth(dataset: RawDataset, folder: Path) -> None:
    """Label files for nnU-Net's validation, copied when missing or changed (as ``nnUNetv2_preprocess`` does)."""
    folder.mkdir(parents=True, exist_ok=True)
    ending = dataset.dataset_json.file_ending
    for case in dataset.training:
        if case.label is None:
            continue
        target = folder / f"{case.case_id}{ending}"
        source = case.label.stat()
        if target.is_file() and (target.stat().st_size, target.stat().st_mtime_ns) == (
            source.st_size,
            source.st_mtime_ns,
        ):
            continue
        with atomic_write(target) as tmp:
            shutil.copy2(case.label, tmp)
