from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from medmamba.errors import GeometryError, ImageReadError
from medmamba.io.atomic import atomic_write
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, read_header, read_image, write_image
from tests.io.conftest import REAL_VOLUMES

ENDINGS = [".nii", ".nii.gz", ".nrrd", ".mha"]
# NIfTI stores the affine in float32: 1e-5 mm / 1e-6 in direction cosines is what survives it
ATOL_MM, ATOL_DIR = 1e-5, 1e-6


def assert_same_geometry(a: Geometry, b: Geometry, atol_mm: float = ATOL_MM, atol_dir: float = ATOL_DIR) -> None:
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=atol_mm)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=atol_mm)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=atol_dir)


@pytest.mark.parametrize("name", list(REAL_VOLUMES), ids=list(REAL_VOLUMES))
def test_read_image_geometry_matches_simpleitk_on_real_files(name):
    path = REAL_VOLUMES[name]
    image = read_image(path, multi_volume=True)
    reference = sitk.ReadImage(str(path))
    assert_same_geometry(image.geometry, Geometry.from_sitk(reference), atol_mm=1e-4, atol_dir=1e-5)
    expected = sitk.GetArrayFromImage(reference)
    expected = np.moveaxis(expected, 0, -1).transpose(2, 1, 0, 3) if expected.ndim == 4 else expected.transpose(2, 1, 0)
    np.testing.assert_array_equal(image.array, expected)


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("name", list(REAL_VOLUMES), ids=list(REAL_VOLUMES))
def test_write_then_read_keeps_geometry_and_voxels(tmp_path, name, ending):
    image = read_image(REAL_VOLUMES[name], multi_volume=True)
    path = write_image(image, tmp_path / f"copy{ending}")
    back = read_image(path, multi_volume=True)
    assert_same_geometry(back.geometry, image.geometry)
    assert back.array.dtype == image.array.dtype
    np.testing.assert_array_equal(back.array, image.array)
    assert [p.name for p in tmp_path.iterdir()] == [f"copy{ending}"]  # no temporary left behind


def test_lps_and_oblique_volume_keeps_its_orientation(tmp_path):
    image = read_image(REAL_VOLUMES["dipy_aniso_vox_LPS_oblique"])
    assert image.geometry.axcodes == ("L", "P", "S")
    direction = image.geometry.direction_matrix
    assert np.abs(direction - np.round(direction)).max() > 0.1  # really oblique
    written = write_image(image, tmp_path / "x.nii.gz")
    assert nib.aff2axcodes(nib.load(written).affine) == ("L", "P", "S")
    np.testing.assert_allclose(
        nib.load(written).affine, nib.load(REAL_VOLUMES["dipy_aniso_vox_LPS_oblique"]).affine, atol=1e-4
    )


def test_written_nifti_has_equal_qform_and_sform_read_alike_by_nibabel_and_simpleitk(tmp_path):
    image = read_image(REAL_VOLUMES["nibabel_example4d_oblique"], multi_volume=True).volume(1)
    path = write_image(image, tmp_path / "x.nii.gz")
    header = nib.load(path).header
    assert int(header["qform_code"]) == int(header["sform_code"]) == 1
    np.testing.assert_allclose(header.get_qform(), header.get_sform(), atol=1e-5)
    assert_same_geometry(Geometry.from_sitk(sitk.ReadImage(str(path))), image.geometry, atol_mm=1e-4, atol_dir=1e-5)


def test_geometry_affine_round_trip_and_axcodes():
    geometry = Geometry((2.0, 3.0, 4.0), (1.0, 2.0, 3.0), np.eye(3).ravel())
    assert geometry.axcodes == ("L", "P", "S")
    np.testing.assert_allclose(geometry.affine_ras[:3, 3], [-1.0, -2.0, 3.0])
    assert Geometry.from_affine(geometry.affine_ras).isclose(geometry)
    assert geometry.mismatches(Geometry((2.0, 3.0, 4.5), (1.0, 2.0, 3.0), np.eye(3).ravel())) == [
        "spacing (2, 3, 4) vs (2, 3, 4.5)"
    ]


def test_read_header_does_not_need_the_voxels(tmp_path):
    image = read_image(REAL_VOLUMES["nibabel_anatomical_bigendian"])
    header = read_header(REAL_VOLUMES["nibabel_anatomical_bigendian"])
    assert header.shape == image.shape == (33, 41, 25)
    assert header.geometry.isclose(image.geometry)
    assert header.nbytes == image.array.nbytes


# ------------------------------------------------------------------ bad inputs


def _nifti(tmp_path: Path, name: str = "x.nii.gz", **header_changes) -> Path:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0]))
    for key, value in header_changes.items():
        img.header[key] = value
    path = tmp_path / name
    nib.save(img, path)
    return path


def truncated_gz(tmp_path):
    path = write_image(read_image(REAL_VOLUMES["nibabel_anatomical_bigendian"]), tmp_path / "cut.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def truncated_nii(tmp_path):
    path = write_image(read_image(REAL_VOLUMES["nibabel_anatomical_bigendian"]), tmp_path / "cut.nii")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return path


def truncated_mha(tmp_path):
    path = write_image(read_image(REAL_VOLUMES["nibabel_anatomical_bigendian"]), tmp_path / "cut.mha")
    data = path.read_bytes()
    path.write_bytes(data[: 2 * len(data) // 3])
    return path


def random_bytes(tmp_path):
    path = tmp_path / "noise.nii.gz"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    return path


def gzip_of_text(tmp_path):
    path = tmp_path / "text.nii.gz"
    path.write_bytes(gzip.compress(b"not an image" * 100))
    return path


def zero_spacing(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    img.header["pixdim"][1:4] = [1.0, 0.0, 1.0]
    path = tmp_path / "zero.nii"
    nib.save(img, path)
    return path


def negative_spacing(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    img.header["pixdim"][1:4] = [1.0, -2.0, 1.0]
    path = tmp_path / "negative.nii"
    nib.save(img, path)
    return path


def qform_not_sform(tmp_path):
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    shifted = np.eye(4)
    shifted[:3, 3] = [10.0, 0.0, 0.0]
    img.set_qform(np.eye(4), code=1)
    img.set_sform(shifted, code=1)
    path = tmp_path / "qs.nii"
    nib.save(img, path)
    return path


def sheared(tmp_path):
    affine = np.eye(4)
    affine[0, 1] = 0.5
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
    path = tmp_path / "shear.nii"
    nib.save(img, path)
    return path


def four_d(tmp_path):
    path = tmp_path / "multi.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)), path)
    return path


def unsupported(tmp_path):
    path = tmp_path / "image.jpg"
    path.write_bytes(b"x")
    return path


def missing(tmp_path):
    return tmp_path / "nothing_here.nii.gz"


BAD = [
    (truncated_gz, ImageReadError, "truncated or damaged"),
    (truncated_nii, ImageReadError, "truncated or damaged"),
    (truncated_mha, ImageReadError, "truncated or damaged"),
    (random_bytes, ImageReadError, "not a readable NIfTI"),
    (gzip_of_text, ImageReadError, "not a readable NIfTI"),
    (zero_spacing, GeometryError, "zero, negative"),
    (negative_spacing, GeometryError, "zero, negative"),
    (qform_not_sform, GeometryError, "qform (code 1) and sform (code 1) describe different grids"),
    (sheared, GeometryError, "sheared"),
    (four_d, ImageReadError, "has 3 volumes"),
    (unsupported, ImageReadError, "unsupported file type"),
    (missing, ImageReadError, "does not exist"),
]


@pytest.mark.parametrize(("build", "error", "fragment"), BAD, ids=[b[0].__name__ for b in BAD])
def test_read_image_rejects_bad_input_naming_file_and_problem(tmp_path, build, error, fragment):
    path = build(tmp_path)
    with pytest.raises(error) as info:
        read_image(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert fragment in message


def test_simpleitk_alone_would_accept_the_truncated_nifti(tmp_path):
    # the reason NIfTI goes through nibabel: ITK fills the missing tail with zeros and reports success
    path = truncated_gz(tmp_path)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(path))).shape == (25, 41, 33)


def test_header_promising_too_many_bytes_is_refused_before_reading(tmp_path):
    path = write_image(read_image(REAL_VOLUMES["nibabel_anatomical_bigendian"]), tmp_path / "x.nii.gz")
    with pytest.raises(ImageReadError, match="GiB of voxels"):
        read_image(path, max_bytes=1000)


def test_trailing_singleton_axis_is_squeezed(tmp_path):
    path = tmp_path / "s.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((4, 5, 6, 1), np.int16), np.eye(4)), path)
    assert read_image(path).array.shape == (4, 5, 6)


def _interrupted_write(path: Path) -> None:
    with atomic_write(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="interrupted"):
        _interrupted_write(tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_image_rejects_array_that_does_not_fit_geometry():
    with pytest.raises(ValueError, match="does not fit"):
        Image(np.zeros((2, 3)), Geometry((1, 1, 1), (0, 0, 0), np.eye(3).ravel()))
