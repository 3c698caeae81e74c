from __future__ import annotations

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from medmamba.errors import DatasetError
from medmamba.io.datasets.convert import convert_dicom_tree, convert_msd
from medmamba.io.dicom import read_dicom_series
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, read_image, write_image
from medmamba.io.verify import verify_dataset
from tests.io.conftest import PYDICOM_DIRS

CT5N = PYDICOM_DIRS / "98892001" / "CT5N"
CT2_GAP = PYDICOM_DIRS / "77654033" / "CT2"


def make_msd_task(tmp_path):
    """A tiny Decathlon task: 2-channel 4-D images, labels, a test image, MSD's dataset.json."""
    task = tmp_path / "src" / "Task09_Toy"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    affine = np.diag([-1.5, 1.5, 3.0, 1.0])
    affine[:3, 3] = [20.0, -10.0, 4.0]
    names = ["toy_001", "toy_002"]
    for name in names:
        nib.save(
            nib.Nifti1Image(rng.normal(size=(6, 7, 5, 2)).astype(np.float32), affine),
            task / "imagesTr" / f"{name}.nii.gz",
        )
        label = np.zeros((6, 7, 5), np.uint8)
        label[1:4, 2:5, 1:3] = 1
        nib.save(nib.Nifti1Image(label, affine), task / "labelsTr" / f"{name}.nii.gz")
    nib.save(
        nib.Nifti1Image(rng.normal(size=(6, 7, 5, 2)).astype(np.float32), affine), task / "imagesTs" / "toy_003.nii.gz"
    )
    (task / "imagesTr" / "._toy_001.nii.gz").write_bytes(b"macOS resource fork")  # MSD archives carry these
    (task / "dataset.json").write_text(
        json.dumps(
            {
                "name": "Toy",
                "modality": {"0": "FLAIR", "1": "T1w"},
                "labels": {"0": "background", "1": "lesion"},
                "numTraining": 2,
                "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"} for n in names],
                "test": ["./imagesTs/toy_003.nii.gz"],
            }
        )
    )
    return task


@pytest.fixture
def msd_task(tmp_path):
    return make_msd_task(tmp_path)


def test_msd_task_becomes_a_verified_nnunet_dataset(msd_task, tmp_path):
    raw = tmp_path / "raw"
    target = convert_msd(msd_task, raw)
    assert target == raw / "Dataset009_Toy"
    data = json.loads((target / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "FLAIR", "1": "T1w"}
    assert data["labels"] == {"background": 0, "lesion": 1}
    assert data["numTraining"] == 2 and "training" not in data
    source = read_image(msd_task / "imagesTr" / "toy_002.nii.gz", multi_volume=True)
    for channel in range(2):
        split = read_image(target / "imagesTr" / f"toy_002_{channel:04d}.nii.gz")
        np.testing.assert_array_equal(split.array, source.array[..., channel])
        assert split.geometry.isclose(source.geometry, atol_mm=1e-5, atol_direction=1e-6)
    assert sorted(p.name for p in (target / "imagesTs").iterdir()) == ["toy_003_0000.nii.gz", "toy_003_0001.nii.gz"]
    assert verify_dataset(target).ok


def test_msd_with_truncated_source_writes_nothing(msd_task, tmp_path):
    path = msd_task / "imagesTr" / "toy_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(DatasetError) as info:
        convert_msd(msd_task, raw)
    assert str(path) in str(info.value)
    assert "truncated or damaged" in str(info.value)
    assert list(raw.iterdir()) == []


def test_msd_target_id_override_and_taken_id(msd_task, tmp_path):
    raw = tmp_path / "raw"
    assert convert_msd(msd_task, raw, dataset_id=109).name == "Dataset109_Toy"
    (raw / "Dataset009_Other").mkdir()
    with pytest.raises(DatasetError, match="dataset id 9 is taken by Dataset009_Other"):
        convert_msd(msd_task, raw)


def ct_label(image: Image) -> Image:
    label = np.zeros(image.shape, np.uint8)
    label[image.array > -200] = 1  # dense tissue
    return Image(label, image.geometry)


def make_dicom_tree(tmp_path):
    """Two cases of the real CT5N series: one with a label map on its grid, one without (a test case)."""
    source = tmp_path / "pacs"
    shutil.copytree(CT5N, source / "patient_a" / "series")
    shutil.copytree(CT5N, source / "patient_b" / "dicom")  # no label: a test case
    write_image(ct_label(read_dicom_series(CT5N)), source / "patient_a" / "label.nii.gz")
    return source


@pytest.fixture
def dicom_tree(tmp_path):
    return make_dicom_tree(tmp_path)


def test_dicom_tree_becomes_a_verified_nnunet_dataset(dicom_tree, tmp_path):
    target = convert_dicom_tree(
        dicom_tree, tmp_path / "raw", dataset_id=12, name="Spine", labels={"background": 0, "tissue": 1}
    )
    image = read_image(target / "imagesTr" / "patient_a_0000.nii.gz")
    reference = read_dicom_series(CT5N)
    np.testing.assert_array_equal(image.array, reference.array)
    assert image.geometry.isclose(reference.geometry, atol_mm=1e-5, atol_direction=1e-6)
    assert (target / "imagesTs" / "patient_b_0000.nii.gz").is_file()
    data = json.loads((target / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "CT"} and data["numTraining"] == 1
    assert verify_dataset(target).ok


def test_dicom_tree_problems_are_all_reported_and_nothing_written(dicom_tree, tmp_path):
    shutil.copytree(CT2_GAP, dicom_tree / "patient_c" / "gappy")
    write_image(ct_label(read_dicom_series(CT5N)), dicom_tree / "patient_c" / "label.nii.gz")
    shutil.copytree(CT5N, dicom_tree / "patient_d" / "one")
    shutil.copytree(CT2_GAP, dicom_tree / "patient_d" / "two")
    shutil.copytree(CT5N, dicom_tree / "patient_e" / "s")
    reference = read_dicom_series(CT5N)
    g = reference.geometry
    shifted = Geometry(g.spacing, (g.origin[0] + 5.0, *g.origin[1:]), g.direction)
    write_image(ct_label(Image(reference.array, shifted)), dicom_tree / "patient_e" / "label.nii.gz")
    raw = tmp_path / "raw"
    with pytest.raises(DatasetError) as info:
        convert_dicom_tree(dicom_tree, raw, dataset_id=12, name="Spine", labels={"background": 0, "tissue": 1})
    message = str(info.value)
    assert "patient_d: holds 2 series" in message
    assert message.count("non-uniform slice spacing") == 1
    assert f"{raw / 'Dataset012_Spine' / 'labelsTr' / 'patient_e.nii.gz'}: geometry differs" in message
    assert "origin (-67.2, -143, -1.237) vs (-72.2, -143, -1.237)" in message
    assert len(info.value.problems) == 3
    assert not raw.exists() or list(raw.iterdir()) == []
