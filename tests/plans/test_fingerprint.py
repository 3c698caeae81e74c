"""The in-process fingerprint equals nnU-Net's own, is reused while the raw data are unchanged, and workers follow
the machine."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from medmamba.io.datasets import open_dataset
from medmamba.plans import _resources
from medmamba.plans._nnunet import nnunet_folders
from medmamba.plans.fingerprint import FINGERPRINT_FILE, extract_fingerprint


def test_fingerprint_equals_nnunets_extractor(raw_dataset, tmp_path):
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    ours = extract_fingerprint(open_dataset(raw_dataset), tmp_path / "ours", foreground_samples=2e4, num_workers=1)
    with nnunet_folders(raw_dataset.parent, tmp_path / "nnunet"):
        extractor = DatasetFingerprintExtractor(raw_dataset.name, num_processes=1)
        extractor.num_foreground_voxels_for_intensitystats = 2e4
        extractor.show_progress_bar = False
        extractor.run()
    theirs = json.loads((tmp_path / "nnunet" / raw_dataset.name / FINGERPRINT_FILE).read_text())
    written = json.loads((tmp_path / "ours" / FINGERPRINT_FILE).read_text())
    assert written == ours
    assert ours == theirs
    assert ours["spacings"][0] == [2.5, 1.0, 1.0]  # nnU-Net's (z, y, x) order
    assert 0.3 < ours["median_relative_size_after_cropping"] < 1.0  # the body was cropped out of the zero background


def test_fingerprint_is_reused_until_the_raw_data_change(raw_dataset, tmp_path, monkeypatch):
    data = tmp_path / raw_dataset.name
    shutil.copytree(raw_dataset, data)
    first = extract_fingerprint(open_dataset(data), tmp_path / "out", foreground_samples=2e4)

    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor

    def fail(*args, **kwargs):
        raise AssertionError("a case was analysed again")

    monkeypatch.setattr(DatasetFingerprintExtractor, "analyze_case", staticmethod(fail))
    assert extract_fingerprint(open_dataset(data), tmp_path / "out", foreground_samples=2e4) == first
    with pytest.raises(AssertionError, match="analysed again"):
        extract_fingerprint(open_dataset(data), tmp_path / "out", foreground_samples=2e4, overwrite=True)
    label = data / "labelsTr" / "toy_000.nii.gz"
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="analysed again"):
        extract_fingerprint(open_dataset(data), tmp_path / "out", foreground_samples=2e4)


def test_workers_follow_cores_ram_and_the_size_of_the_work(monkeypatch):
    monkeypatch.setattr(_resources, "usable_cores", lambda: 16)
    monkeypatch.setattr(_resources, "available_memory_bytes", lambda: 64 * 2**30)
    big = 10**9
    assert _resources.worker_count(100, 2**30, total_voxels=big) == 16
    assert _resources.worker_count(5, 2**30, total_voxels=big) == 5  # never more workers than cases
    assert _resources.worker_count(100, 2**30, total_voxels=10**6) == 1  # a pool would cost more than the work
    assert _resources.worker_count(100, 2**30, total_voxels=big, requested=3) == 3
    monkeypatch.setattr(_resources, "available_memory_bytes", lambda: 8 * 2**30)
    # 0.7 · 8 GiB over (0.4 GiB start-up + 2 GiB per case) → 2 workers, not 16
    assert _resources.worker_count(100, 2 * 2**30, total_voxels=big) == 2
    monkeypatch.setattr(_resources, "available_memory_bytes", lambda: 2**30)
    assert _resources.worker_count(100, 2 * 2**30, total_voxels=big) == 1


def test_a_spawned_pool_gives_the_same_fingerprint(raw_dataset, tmp_path):
    one = extract_fingerprint(open_dataset(raw_dataset), tmp_path / "a", foreground_samples=2e4, num_workers=1)
    two = extract_fingerprint(open_dataset(raw_dataset), tmp_path / "b", foreground_samples=2e4, num_workers=2)
    assert one == two
