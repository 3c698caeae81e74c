from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmamba.errors import DatasetError
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, read_image, write_image
from medmamba.io.verify import check_dataset, verify_dataset


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` with its size and mtime: verify must leave it unchanged."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def rewrite(path: Path, change) -> None:
    image = read_image(path)
    write_image(change(image), path)


def truncated_image(root: Path) -> tuple[Path, str]:
    path = root / "imagesTr" / "case_000_0000.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "the file is truncated or damaged"


def nan_voxels(root: Path) -> tuple[Path, str]:
    path = root / "imagesTr" / "case_001_0001.nii.gz"

    def change(image: Image) -> Image:
        array = image.array.copy()
        array[0, 0, :3] = np.nan
        return Image(array, image.geometry)

    rewrite(path, change)
    return path, "3 non-finite voxel(s) (3 NaN, 0 ±Inf"


def inf_voxels(root: Path) -> tuple[Path, str]:
    path = root / "imagesTr" / "case_001_0000.nii.gz"

    def change(image: Image) -> Image:
        array = image.array.copy()
        array[1, 1, 1] = np.inf
        return Image(array, image.geometry)

    rewrite(path, change)
    return path, "1 non-finite voxel(s) (0 NaN, 1 ±Inf"


def zero_spacing(root: Path) -> tuple[Path, str]:
    path = root / "imagesTr" / "case_002_0000.nii.gz"
    img = nib.load(path)
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    img.header["pixdim"][2] = 0.0
    nib.save(img, path)
    return path, "spacing (pixdim) (1.5, 0.0, 2.0) has a zero, negative or non-finite entry"


def qform_not_sform(root: Path) -> tuple[Path, str]:
    path = root / "labelsTr" / "case_000.nii.gz"
    img = nib.load(path)
    shifted = img.affine.copy()
    shifted[:3, 3] += 7.0
    img = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header)
    img.set_sform(shifted, code=1)
    nib.save(img, path)
    return path, "qform (code 1) and sform (code 1) describe different grids"


def undeclared_label(root: Path) -> tuple[Path, str]:
    path = root / "labelsTr" / "case_001.nii.gz"

    def change(image: Image) -> Image:
        array = image.array.copy()
        array[0, 0, 0] = 5
        return Image(array, image.geometry)

    rewrite(path, change)
    return path, "label value(s) [5] not declared in dataset.json (declared: [0, 1, 2])"


def non_integer_label(root: Path) -> tuple[Path, str]:
    path = root / "labelsTr" / "case_002.nii.gz"
    image = read_image(path)
    array = image.array.astype(np.float32)
    array[0, 0, 0] = 0.4999
    write_image(Image(array, image.geometry), path)
    return path, "non-integer label values (e.g. 0.4999)"


def label_shape_mismatch(root: Path) -> tuple[Path, str]:
    path = root / "labelsTr" / "case_000.nii.gz"
    image = read_image(path)
    write_image(Image(image.array[:-1], image.geometry), path)
    return path, "shape (7, 9, 7) differs from case_000_0000.nii.gz's (8, 9, 7) (image and label must share one grid)"


def label_origin_mismatch(root: Path) -> tuple[Path, str]:
    path = root / "labelsTr" / "case_001.nii.gz"

    def change(image: Image) -> Image:
        g = image.geometry
        return Image(image.array, Geometry(g.spacing, (g.origin[0] + 3.0, *g.origin[1:]), g.direction))

    rewrite(path, change)
    return path, "geometry differs from case_001_0000.nii.gz's: origin (13, -20, 5) vs (10, -20, 5)"


def channel_spacing_mismatch(root: Path) -> tuple[Path, str]:
    path = root / "imagesTr" / "case_002_0001.nii.gz"

    def change(image: Image) -> Image:
        g = image.geometry
        return Image(image.array, Geometry((1.0, 1.0, 2.0), g.origin, g.direction))

    rewrite(path, change)
    return path, "spacing (1, 1, 2) vs (1.5, 1, 2) (channels of one case must share one grid)"


def missing_channel(root: Path) -> tuple[Path, str]:
    path = root / "imagesTr" / "case_001_0001.nii.gz"
    path.unlink()
    return path, "missing: case case_001 has no file for channel 0001"


def extra_channel(root: Path) -> tuple[Path, str]:
    source = root / "imagesTr" / "case_000_0000.nii.gz"
    path = root / "imagesTr" / "case_000_0002.nii.gz"
    path.write_bytes(source.read_bytes())
    return path, "channel beyond the 2 declared in channel_names"


def missing_label(root: Path) -> tuple[Path, str]:
    path = root / "labelsTr" / "case_002.nii.gz"
    path.unlink()
    return path, "missing: case case_002 has no label"


def empty_foreground(root: Path) -> tuple[Path, str]:
    path = root / "labelsTr" / "case_000.nii.gz"
    rewrite(path, lambda image: Image(np.zeros_like(image.array), image.geometry))
    return path, "contains only background (0): no foreground voxel"


def orphan_label(root: Path) -> tuple[Path, str]:
    path = root / "labelsTr" / "ghost.nii.gz"
    path.write_bytes((root / "labelsTr" / "case_000.nii.gz").read_bytes())
    return path, "label without images in imagesTr"


def stray_file(root: Path) -> tuple[Path, str]:
    path = root / "imagesTr" / "case_007.nii.gz"
    path.write_bytes((root / "imagesTr" / "case_000_0000.nii.gz").read_bytes())
    return path, "does not follow the naming rule CASE_dddd.nii.gz"


def _edit_json(root: Path, change) -> Path:
    path = root / "dataset.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def wrong_num_training(root: Path) -> tuple[Path, str]:
    path = _edit_json(root, lambda d: d.update(numTraining=5))
    return path, "numTraining is 5 but 3 training case(s) were found"


def missing_json_key(root: Path) -> tuple[Path, str]:
    path = _edit_json(root, lambda d: d.pop("file_ending"))
    return path, "required key(s) file_ending missing"


def non_consecutive_labels(root: Path) -> tuple[Path, str]:
    path = _edit_json(root, lambda d: d.update(labels={"background": 0, "organ": 1, "lesion": 3}))
    return path, "label values [0, 1, 3] are not consecutive from 0"


def no_background(root: Path) -> tuple[Path, str]:
    path = _edit_json(root, lambda d: d.update(labels={"organ": 0, "lesion": 1}))
    return path, 'labels lack "background": 0'


def truncated_test_image(root: Path) -> tuple[Path, str]:
    path = root / "imagesTs" / "case_003_0001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[:100])
    return path, "not a readable NIfTI file"


BAD_DATASETS = [
    truncated_image,
    nan_voxels,
    inf_voxels,
    zero_spacing,
    qform_not_sform,
    undeclared_label,
    non_integer_label,
    label_shape_mismatch,
    label_origin_mismatch,
    channel_spacing_mismatch,
    missing_channel,
    extra_channel,
    missing_label,
    empty_foreground,
    orphan_label,
    stray_file,
    wrong_num_training,
    missing_json_key,
    non_consecutive_labels,
    no_background,
    truncated_test_image,
]


def test_clean_dataset_passes(make_dataset):
    root = make_dataset()
    report = verify_dataset(root)
    assert report.ok
    assert (report.kind, report.num_cases, report.num_test) == ("nnunet", 3, 1)
    assert report.warnings == ()


@pytest.mark.parametrize("damage", BAD_DATASETS, ids=[f.__name__ for f in BAD_DATASETS])
def test_each_bad_input_is_reported_with_file_and_problem_and_nothing_is_written(make_dataset, damage):
    root = make_dataset()
    path, fragment = damage(root)
    before = snapshot(root)
    report = check_dataset(root)
    matching = [p for p in report.problems if p.path == str(path) and fragment in p.what]
    assert matching, f"no problem for {path.name} with {fragment!r}; got {[str(p) for p in report.problems]}"
    assert all(p.fix for p in report.problems)  # every problem says how to fix it
    with pytest.raises(DatasetError) as info:
        verify_dataset(root)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)
    assert snapshot(root) == before


def test_every_problem_lands_in_one_report(make_dataset):
    root = make_dataset()
    damaged = [d(root) for d in (inf_voxels, undeclared_label, missing_channel, missing_label)]
    with pytest.raises(DatasetError) as info:
        verify_dataset(root)
    assert len(info.value.problems) == 4
    for path, fragment in damaged:
        assert any(p.path == str(path) and fragment in p.what for p in info.value.problems)


def test_empty_foreground_can_be_allowed_as_a_warning(make_dataset):
    root = make_dataset()
    empty_foreground(root)
    report = verify_dataset(root, allow_empty_foreground=True)
    assert [w.what for w in report.warnings] == ["contains only background (0): no foreground voxel"]


def test_mixed_orientations_across_cases_warn(make_dataset):
    root = make_dataset()
    flipped = Geometry((1.5, 1.0, 2.0), (10.0, -20.0, 5.0), np.diag([-1.0, 1.0, 1.0]).ravel())
    for path in [
        root / "imagesTr" / "case_002_0000.nii.gz",
        root / "imagesTr" / "case_002_0001.nii.gz",
        root / "labelsTr" / "case_002.nii.gz",
    ]:
        rewrite(path, lambda image: Image(image.array, flipped))
    report = verify_dataset(root)
    assert report.ok
    assert len(report.warnings) == 1
    assert "cases are stored in 2 orientations (LPS: 3, RPS: 1)" in report.warnings[0].what


def test_threads_give_the_same_report(make_dataset):
    root = make_dataset()
    nan_voxels(root)
    missing_label(root)
    assert check_dataset(root, num_workers=2).problems == check_dataset(root).problems


def test_nnunet_accepts_what_we_write(make_dataset):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    root = make_dataset()
    images, properties = SimpleITKIO().read_images([str(root / "imagesTr" / "case_000_0000.nii.gz")])
    assert images.shape == (1, 7, 9, 8)  # nnU-Net's (c, z, y, x)
    np.testing.assert_allclose(properties["spacing"], [2.0, 1.0, 1.5])
    labels = json.loads((root / "dataset.json").read_text())["labels"]
    assert LabelManager(labels, regions_class_order=None).all_labels == [0, 1, 2]
