from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from medmamba.errors import GeometryError, ImageReadError
from medmamba.io.dicom import find_dicom_series, read_dicom_series
from medmamba.io.image import read_image, write_image
from tests.io.conftest import PYDICOM_DIRS

CT5N = PYDICOM_DIRS / "98892001" / "CT5N"  # clean 5-slice CT, instance order ≠ position order
CT2_GAP = PYDICOM_DIRS / "77654033" / "CT2"  # slices at z = -99.5, 103.0, 104.3, 105.5: missing slices
MR2 = PYDICOM_DIRS / "98892003" / "MR2"  # three series, two of them tri-planar localizers


def reference_volume(folder: Path) -> np.ndarray:
    """pydicom's own reading: modality LUT per slice, stacked along position, as (x, y, z)."""
    slices = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([apply_modality_lut(ds.pixel_array, ds).T for ds in slices], axis=-1)


def copy_series(folder: Path, target: Path, **changes) -> Path:
    """Copy a series, changing tags on every slice (e.g. RescaleSlope)."""
    target.mkdir(parents=True)
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.save_as(target / path.name)
    return target


def test_reads_real_ct_series_in_position_order_with_rescale_applied():
    image = read_dicom_series(CT5N)
    assert image.shape == (16, 16, 5)
    np.testing.assert_allclose(image.geometry.spacing, (0.488281, 0.488281, 2.5), rtol=1e-6)
    np.testing.assert_allclose(image.geometry.origin, (-72.199997, -143.0, -1.2375), atol=1e-5)
    np.testing.assert_allclose(image.geometry.direction, np.eye(3).ravel())
    np.testing.assert_array_equal(image.array, reference_volume(CT5N))  # intercept -1024 applied: HU
    assert image.array.min() < 0


def test_non_integer_rescale_slope_and_intercept_are_applied(tmp_path):
    folder = copy_series(CT5N, tmp_path / "scaled", RescaleSlope="2.5", RescaleIntercept="-100")
    image = read_dicom_series(folder)
    np.testing.assert_allclose(image.array, reference_volume(folder), rtol=1e-6)
    raw = read_dicom_series(CT5N).array + 1024  # stored values
    np.testing.assert_allclose(image.array, 2.5 * raw - 100)


def test_dicom_to_nifti_keeps_geometry(tmp_path):
    image = read_dicom_series(CT5N)
    back = read_image(write_image(image, tmp_path / "ct.nii.gz"))
    assert back.geometry.isclose(image.geometry, atol_mm=1e-5, atol_direction=1e-6)
    np.testing.assert_array_equal(back.array, image.array)


def test_folder_with_several_series_lists_them_and_asks_for_a_uid():
    with pytest.raises(ImageReadError) as info:
        read_dicom_series(MR2)
    message = str(info.value)
    assert message.startswith(f"{MR2}: holds 3 series")
    for series in find_dicom_series(MR2):
        assert series.uid in message
    assert "--series-uid" in message


def test_series_chosen_by_uid_from_a_mixed_folder(tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(CT5N, mixed / "a")
    shutil.copytree(CT2_GAP, mixed / "b")
    found = find_dicom_series(mixed)
    assert [len(s.files) for s in found] == [5, 4]
    image = read_dicom_series(mixed, series_uid=found[0].uid)
    np.testing.assert_array_equal(image.array, reference_volume(CT5N))
    with pytest.raises(ImageReadError, match=r"no series with UID 1\.2\.3"):
        read_dicom_series(mixed, series_uid="1.2.3")


def test_non_uniform_slice_spacing_is_an_error_not_a_resample():
    with pytest.raises(GeometryError) as info:
        read_dicom_series(CT2_GAP)
    assert str(info.value).startswith(f"{CT2_GAP} (series ")
    assert "non-uniform slice spacing" in str(info.value)


def test_missing_middle_slice_is_detected(tmp_path):
    folder = tmp_path / "gap"
    shutil.copytree(CT5N, folder)
    middle = sorted(folder.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))[2]
    middle.unlink()
    with pytest.raises(
        GeometryError, match=r"non-uniform slice spacing: gaps between consecutive slices range from 2\.5 to 5"
    ):
        read_dicom_series(folder)


def test_mixed_orientations_in_one_series_are_an_error():
    uid = next(s.uid for s in find_dicom_series(MR2) if len(s.files) == 3)
    with pytest.raises(GeometryError, match="mixed slice orientations"):
        read_dicom_series(MR2, series_uid=uid)


def test_localizer_images_are_dropped(tmp_path, caplog):
    folder = tmp_path / "with_localizer"
    shutil.copytree(CT5N, folder)
    ds = pydicom.dcmread(next(iter(sorted(CT5N.iterdir()))))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(folder / "localizer.dcm")
    image = read_dicom_series(folder)
    assert image.shape == (16, 16, 5)
    assert "1 localizer image(s) dropped" in caplog.text


def test_monochrome1_comes_back_inverted_so_larger_is_brighter(tmp_path):
    folder = copy_series(CT5N, tmp_path / "mono1", PhotometricInterpretation="MONOCHROME1")
    plain = read_dicom_series(CT5N).array
    inverted = read_dicom_series(folder).array
    total = inverted + plain
    assert np.unique(total).size == 1  # an exact affine inversion, voxel by voxel
    assert np.corrcoef(inverted.ravel(), plain.ravel())[0, 1] < -0.999


def test_folder_without_dicom_is_reported(tmp_path):
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(ImageReadError, match="no DICOM image series found"):
        read_dicom_series(tmp_path)
