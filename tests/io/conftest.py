"""Fixtures for the io tests: real volumes that ship inside installed wheels, and tiny dataset builders."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from medmamba.io.datasets.nnunet_raw import RawDatasetWriter
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return Path(next(iter(spec.submodule_search_locations)))


NIBABEL_DATA = package_dir("nibabel") / "tests" / "data"
DIPY_DATA = package_dir("dipy") / "data" / "files"
NILEARN_DATA = package_dir("nilearn") / "datasets" / "data"
PYDICOM_DIRS = package_dir("pydicom") / "data" / "test_files" / "dicomdirtests"

#: real volumes, with what makes each interesting for geometry
REAL_VOLUMES = {
    "dipy_aniso_vox_LPS_oblique": DIPY_DATA / "aniso_vox.nii.gz",  # LPS, oblique, 4×4×5 mm, qform = sform
    "nibabel_example4d_oblique": NIBABEL_DATA / "example4d.nii.gz",  # oblique LAS, 4-D (2 volumes)
    "nibabel_anatomical_bigendian": NIBABEL_DATA / "anatomical.nii",  # LAS, big-endian int16
    "nibabel_reoriented_anat_moved": NIBABEL_DATA / "reoriented_anat_moved.nii",  # RAS float32
    "nilearn_mni_gm_sform_only": NILEARN_DATA / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",  # sform 2, qform 0
}

GEOMETRY = Geometry((1.5, 1.0, 2.0), (10.0, -20.0, 5.0), np.eye(3).ravel())


def toy_case(rng: np.random.Generator, shape=(8, 9, 7), geometry: Geometry = GEOMETRY) -> tuple[Image, Image]:
    """A small float32 image and a uint8 label map (values 0, 1, 2) on the same grid."""
    label = np.zeros(shape, np.uint8)
    label[2:6, 2:7, 2:5] = 1
    label[3:5, 3:6, 3:4] = 2
    image = (rng.normal(0, 0.1, shape) + label).astype(np.float32)
    return Image(image, geometry), Image(label, geometry)


def build_toy_dataset(
    raw_root: Path, num_cases: int = 3, channels: int = 2, dataset_id: int = 1, name: str = "Toy"
) -> Path:
    """A tiny valid nnU-Net raw dataset (2 channels, 3 training cases, 1 test case); returns its folder."""
    rng = np.random.default_rng(0)
    labels = {"background": 0, "organ": 1, "lesion": 2}
    names = ["CT", "MR"][:channels]
    with RawDatasetWriter(raw_root, dataset_id, name, channel_names=names, labels=labels) as writer:
        for i in range(num_cases + 1):
            image, label = toy_case(rng)
            writer.add_case(f"case_{i:03d}", [image] * channels, label, test=i == num_cases)
    return writer.path


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """``build_toy_dataset`` under ``tmp_path/raw``."""
    return lambda **kwargs: build_toy_dataset(tmp_path / "raw", **kwargs)
