"""A tiny synthetic nnU-Net raw dataset: a few 3D cases written with nibabel, anisotropic so the planner has work."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

#: (x, y, z) voxels and mm; z coarser, as in most clinical scans, so nnU-Net transposes it to the front
SHAPE = (40, 36, 16)
SPACING = (1.0, 1.0, 2.5)


def write_raw_dataset(root: Path, dataset_id: int = 7, n_cases: int = 4, name: str = "Toy", seed: int = 0) -> Path:
    """``root/Dataset007_Toy`` with ``n_cases`` labelled MR-like cases: a body (zero outside) with two organs."""
    rng = np.random.default_rng(seed)
    folder = root / f"Dataset{dataset_id:03d}_{name}"
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    grid = np.stack(np.meshgrid(*[np.arange(s) * sp for s, sp in zip(SHAPE, SPACING, strict=True)], indexing="ij"))
    centre = np.array([s * sp / 2 for s, sp in zip(SHAPE, SPACING, strict=True)])[:, None, None, None]
    for case in range(n_cases):
        shift = rng.uniform(-3, 3, size=(3, 1, 1, 1))
        r = np.sqrt((((grid - centre - shift) / np.array([16, 14, 16])[:, None, None, None]) ** 2).sum(0))
        body = r < 1.0
        label = np.zeros(SHAPE, np.uint8)
        label[r < 0.55] = 1
        label[(r < 0.25)] = 2
        image = np.where(body, 100.0 + 40.0 * label + rng.normal(0, 5, SHAPE), 0.0).astype(np.float32)
        affine = np.diag([*SPACING, 1.0])
        nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / f"toy_{case:03d}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"toy_{case:03d}.nii.gz")
    dataset_json = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "organ": 1, "core": 2},
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": name,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


@pytest.fixture(scope="session")
def raw_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only tiny raw dataset shared by the tests (copy it before changing it)."""
    return write_raw_dataset(tmp_path_factory.mktemp("raw"))


#: the networks the shared run plans (SegMamba has its own, fixed-topology test)
NETWORKS = ("umamba_bot", "umamba_enc")
GPU_MEMORY_GB = 8.0


@pytest.fixture(scope="session")
def planned(tmp_path_factory: pytest.TempPathFactory, raw_dataset: Path):
    """One plan-and-preprocess run of the tiny dataset, shared read-only (copy its folders before changing them)."""
    from medmamba.plans import plan_and_preprocess

    out = tmp_path_factory.mktemp("preprocessed")
    return plan_and_preprocess(
        raw_dataset, out, networks=NETWORKS, gpu_memory_gb=GPU_MEMORY_GB, foreground_samples=1e5, num_workers=1
    )
