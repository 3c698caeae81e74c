"""Dataset fingerprint, nnU-Net's, extracted in this process (or a pool sized to the machine).

nnunetv2's ``DatasetFingerprintExtractor.run`` always starts a ``spawn`` pool of ``-npfp`` (default 8) workers,
each re-importing torch; on a small dataset that start-up is > 95 % of the wall time (``plans-and-pipeline.md``
§4). The per-case work is its own static ``analyze_case`` (read, crop to non-zero, sample foreground
intensities with seed 1234), called here directly; the aggregation below produces the same
``dataset_fingerprint.json`` keys and values as nnU-Net's (``tests/plans/test_fingerprint.py`` compares the two).

A source record beside the fingerprint (file names, sizes, modification times, dataset.json) makes a re-run
reuse the fingerprint only while the raw data are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medmamba.io.atomic import write_json
from medmamba.io.datasets.nnunet_raw import RawDataset
from medmamba.io.image import read_header

from ._resources import run_jobs, worker_count

__all__ = ["FINGERPRINT_FILE", "aggregate", "extract_fingerprint", "source_signature", "voxel_count"]

logger = logging.getLogger(__name__)

FINGERPRINT_FILE = "dataset_fingerprint.json"
_SOURCE_FILE = "dataset_fingerprint.source.json"
#: foreground voxels nnU-Net samples per channel over the dataset (``num_foreground_voxels_for_intensitystats``)
NNUNET_FOREGROUND_SAMPLES = 10e7
_PERCENTILES = np.array((0.5, 50.0, 99.5))


def extract_fingerprint(
    dataset: RawDataset,
    output_folder: str | Path,
    *,
    num_workers: int | None = None,
    overwrite: bool = False,
    foreground_samples: float = NNUNET_FOREGROUND_SAMPLES,
) -> dict[str, Any]:
    """Compute (or reuse) the nnU-Net fingerprint of ``dataset`` and write ``output_folder/dataset_fingerprint.json``.

    Args:
        dataset: the opened raw dataset (``medmamba.io.datasets.open_dataset``); verify it first.
        output_folder: ``<preprocessed>/DatasetXXX_Name``; created if missing.
        num_workers: worker processes; ``None`` follows cores, RAM and the dataset's size (1 = this process).
        overwrite: recompute even when a fingerprint of the same raw files exists.
        foreground_samples: foreground intensities sampled per channel over the dataset (nnU-Net: 1e8, drawn with
            replacement, so tiny datasets get millions per case); fewer is faster and changes only the
            intensity statistics' last digits.

    Returns:
        the fingerprint (``spacings``, ``shapes_after_crop``, ``foreground_intensity_properties_per_channel``,
        ``median_relative_size_after_cropping``).
    """
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    folder = Path(output_folder)
    target, source_file = folder / FINGERPRINT_FILE, folder / _SOURCE_FILE
    signature = source_signature(dataset)
    if not overwrite and target.is_file() and source_file.is_file():
        if json.loads(source_file.read_text(encoding="utf-8")).get("signature") == signature:
            logger.info("reusing %s (raw data unchanged)", target)
            return json.loads(target.read_text(encoding="utf-8"))
        logger.info("raw data changed since %s was written; recomputing it", target)

    cases = dataset.training
    dataset_json = dataset.dataset_json.to_dict()
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(cases[0].images[0]))
    per_case = int(foreground_samples // len(cases))
    jobs = [([str(p) for p in case.images], str(case.label), reader, per_case) for case in cases]
    voxels = [voxel_count(case.images[0]) for case in cases]
    bytes_per_case = max(voxels) * (len(dataset_json["channel_names"]) + 1) * 4 * 4 + per_case * 4 * 2
    workers = worker_count(len(jobs), bytes_per_case, total_voxels=sum(voxels), requested=num_workers)
    logger.info("fingerprint of %d cases with %d worker(s)", len(jobs), workers)
    results = run_jobs(DatasetFingerprintExtractor.analyze_case, jobs, workers, desc="Fingerprint")

    fingerprint = aggregate(results, len(dataset_json["channel_names"]))
    folder.mkdir(parents=True, exist_ok=True)
    write_json(target, fingerprint)
    write_json(source_file, {"signature": signature})
    return fingerprint


def aggregate(results: Sequence[tuple[Any, ...]], num_channels: int) -> dict[str, Any]:
    """Pool ``analyze_case`` results the way nnU-Net's extractor does, as plain JSON types."""
    intensities = [np.concatenate([r[2][c] for r in results]) for c in range(num_channels)]
    statistics = {}
    for c in range(num_channels):
        low, median, high = np.percentile(intensities[c], _PERCENTILES)
        statistics[str(c)] = {
            "mean": float(np.mean(intensities[c])),
            "median": float(median),
            "std": float(np.std(intensities[c])),
            "min": float(np.min(intensities[c])),
            "max": float(np.max(intensities[c])),
            "percentile_99_5": float(high),
            "percentile_00_5": float(low),
        }
    return {
        "spacings": [[float(s) for s in r[1]] for r in results],
        "shapes_after_crop": [[int(s) for s in r[0]] for r in results],
        "foreground_intensity_properties_per_channel": statistics,
        "median_relative_size_after_cropping": float(np.median([r[4] for r in results], 0)),
    }


def source_signature(dataset: RawDataset) -> str:
    """A hash of dataset.json and of every training file's name, size and modification time."""
    digest = hashlib.sha256(json.dumps(dataset.dataset_json.to_dict(), sort_keys=True, default=str).encode())
    for case in dataset.training:
        for path in (*case.images, case.label):
            if path is None:
                continue
            stat = Path(path).stat()
            digest.update(f"{Path(path).name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def voxel_count(path: Path) -> int:
    """Voxels of an image file (all volumes), from its header."""
    header = read_header(path)
    return int(np.prod(header.shape, dtype=np.int64)) * header.num_volumes
