"""Bad input, end to end through the ``medmamba`` command: one parametrised row per item of the catalogue
(ecosystem.md §4, issue 8), at the command where a user meets it.

Every row checks the same contract: exit code 2, one error line naming the file and the problem (no traceback,
nothing on stdout), and no partial output (the output folder absent or empty, inputs unchanged). The
dataset-level checks of ``medmamba verify`` have their own rows in tests/io/test_verify.py and tests/cli; here the
same kinds of damage arrive through predict, train, plan-and-preprocess, evaluate, register and convert.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medmamba.cli import main
from tests.engines.conftest import DATASET, preprocess, train_tiny, write_raw
from tests.io.conftest import PYDICOM_DIRS, package_dir
from tests.io.datasets.test_convert import make_dicom_tree
from tests.io.test_verify import snapshot as snapshot_with_logs

PYDICOM_FILES = package_dir("pydicom") / "data" / "test_files"
TINY_MORPH = {"embed_dim": 12, "reg_head_channels": 8}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Sizes and times of every file under ``folder`` but logs (a failed attempt may log why it failed)."""
    return {name: state for name, state in snapshot_with_logs(folder).items() if not name.endswith(".log")}


@dataclass
class World:
    """What the rows damage copies of: a raw and a preprocessed tiny dataset, trained models, registration data."""

    raw: Path
    preprocessed_root: Path
    model: Path  # U-Mamba_Bot 3D, one channel, fold 0
    segmamba_checkpoint: Path
    pairs: Path  # registration dataset
    morph: Path  # MambaMorph run folder


@dataclass
class Case:
    """One bad input: the command line, the file the message must name, a fragment of the problem, and the
    folders that must stay as they were (``untouched``) or hold nothing afterwards (``empty``)."""

    argv: list[str]
    path: Path | str
    fragment: str
    empty: list[Path] = field(default_factory=list)
    untouched: list[Path] = field(default_factory=list)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    from medmamba.engines.registration.train import train as train_registration
    from medmamba.io.datasets.demo import build_demo_registration

    root = tmp_path_factory.mktemp("world")
    raw = write_raw(root / "raw")
    preprocessed = preprocess(raw, root / "preprocessed")
    tiny = {"raw": raw, "preprocessed": preprocessed, "preprocessed_root": preprocessed.parent}
    model = train_tiny(tiny, root / "results").parent
    segmamba = train_tiny(tiny, root / "results_segmamba", network="segmamba") / "checkpoint_final.pth"
    pairs = build_demo_registration(root / "pairs", num_subjects=3, spacing=10.0, shape=(16, 20, 16))
    morph = train_registration(
        pairs, root / "morph", network_kwargs=TINY_MORPH, overrides={"num_epochs": 1, "seed": 0}, device="cpu"
    )
    return World(raw, preprocessed.parent, model, segmamba, pairs, morph)


# --- builders ---------------------------------------------------------------------------------------------------
def good_image(world: World) -> Path:
    return world.raw / "imagesTr" / "tiny_000_0000.nii.gz"


def nifti(world: World, target: Path, *, data=None, affine=None, edit: Callable | None = None) -> Path:
    """A copy of a good training image with its data, affine or header changed."""
    source = nib.load(good_image(world))
    image = nib.Nifti1Image(
        np.asarray(source.dataobj) if data is None else data, source.affine if affine is None else affine, source.header
    )
    if edit is not None:
        edit(image)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, target)
    return target


def predict_argv(world: World, tmp: Path, source: Path, model: Path | None = None) -> list[str]:
    model = model or world.model
    return ["predict", "-i", str(source), "-o", str(tmp / "out"), "-m", str(model), "--device", "cpu"]


def copy_model(world: World, tmp: Path) -> Path:
    return Path(shutil.copytree(world.model, tmp / "model"))


def copy_raw(world: World, tmp: Path) -> Path:
    return Path(shutil.copytree(world.raw, tmp / "raw" / DATASET))


def plan_argv(raw: Path, tmp: Path) -> list[str]:
    return ["plan-and-preprocess", "-d", str(raw), "--preprocessed-root", str(tmp / "pre"), "--num-workers", "1"]


# --- predict: images ----------------------------------------------------------------------------------------------
def truncated_nifti(world: World, tmp: Path) -> Case:
    path = tmp / "in" / "cut.nii.gz"
    path.parent.mkdir()
    data = good_image(world).read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return Case(predict_argv(world, tmp, path), path, "the file is truncated or damaged", [tmp / "out"])


def qform_not_sform(world: World, tmp: Path) -> Case:
    def edit(image):
        shifted = image.affine.copy()
        shifted[:3, 3] += 7.0
        image.set_sform(shifted, code=1)  # the qform keeps the old grid

    path = nifti(world, tmp / "in" / "qs.nii.gz", edit=edit)
    return Case(predict_argv(world, tmp, path), path, "qform (code 1) and sform (code 1) describe different grids")


def zero_spacing(world: World, tmp: Path) -> Case:
    path = nifti(world, tmp / "in" / "zero.nii.gz", edit=lambda image: image.header["pixdim"].__setitem__(2, 0.0))
    return Case(predict_argv(world, tmp, path), path, "(1.0, 0.0, 1.5) has a zero, negative or non-finite entry")


def negative_spacing(world: World, tmp: Path) -> Case:
    path = nifti(world, tmp / "in" / "neg.nii.gz", edit=lambda image: image.header["pixdim"].__setitem__(3, -1.5))
    return Case(predict_argv(world, tmp, path), path, "-1.5) has a zero, negative or non-finite entry")


def nan_voxels(world: World, tmp: Path) -> Case:
    data = np.asarray(nib.load(good_image(world)).dataobj).astype(np.float32)
    data[2, 2, 2:5] = np.nan
    path = nifti(world, tmp / "in" / "nan.nii.gz", data=data)
    return Case(predict_argv(world, tmp, path), path, "3 non-finite voxel(s) (NaN or ±Inf)")


def four_d_image(world: World, tmp: Path) -> Case:
    volume = np.asarray(nib.load(good_image(world)).dataobj)
    path = nifti(world, tmp / "in" / "4d.nii.gz", data=np.stack([volume, volume], axis=-1))
    return Case(predict_argv(world, tmp, path), path, "has 2 volumes (shape (24, 20, 16) × 2)")


def five_d_image(world: World, tmp: Path) -> Case:
    volume = np.asarray(nib.load(good_image(world)).dataobj)
    path = nifti(world, tmp / "in" / "5d.nii.gz", data=np.stack([volume, volume], axis=-1)[:, :, :, None, :])
    return Case(predict_argv(world, tmp, path), path, "has 2 volumes")


def sheared_affine(world: World, tmp: Path) -> Case:
    affine = nib.load(good_image(world)).affine.copy()
    affine[0, 1] = 0.5
    path = nifti(world, tmp / "in" / "shear.nii.gz", affine=affine)
    return Case(predict_argv(world, tmp, path), path, "the axes are sheared")


def huge_header(world: World, tmp: Path) -> Case:
    header = nib.Nifti1Header()
    header.set_data_shape((30000, 30000, 30000))
    header.set_data_dtype(np.float32)
    path = tmp / "in" / "huge.nii"
    path.parent.mkdir()
    path.write_bytes(header.binaryblock + b"\0" * 68)  # 348-byte header, extension flag, a few voxels
    return Case(predict_argv(world, tmp, path), path, "the header promises 100582.8 GiB of voxels")


def empty_folder(world: World, tmp: Path) -> Case:
    path = tmp / "in"
    path.mkdir()
    return Case(predict_argv(world, tmp, path), path, "no DICOM image series found")


def dicom_with_gaps(world: World, tmp: Path) -> Case:
    path = Path(shutil.copytree(PYDICOM_DIRS / "77654033" / "CT2", tmp / "in" / "CT2"))
    return Case(predict_argv(world, tmp, path), path, "non-uniform slice spacing: gaps between consecutive slices")


def dicom_mixed_series(world: World, tmp: Path) -> Case:
    path = Path(shutil.copytree(PYDICOM_DIRS / "98892003" / "MR2", tmp / "in" / "MR2"))
    return Case(predict_argv(world, tmp, path), path, "holds 3 series")


def truncated_dicom(world: World, tmp: Path) -> Case:
    path = tmp / "in" / "series"
    path.mkdir(parents=True)
    shutil.copy(PYDICOM_FILES / "MR_truncated.dcm", path)
    return Case(predict_argv(world, tmp, path), path, "pixel data cannot be read")


def wrong_channel_count(world: World, tmp: Path) -> Case:
    path = tmp / "in"
    path.mkdir()
    for channel in ("0000", "0001"):
        shutil.copy(good_image(world), path / f"case_{channel}.nii.gz")
    return Case(predict_argv(world, tmp, path), path, "case 'case' has channels 0000, 0001, but the model needs 1")


def missing_input(world: World, tmp: Path) -> Case:
    path = tmp / "no_such_scan.nii.gz"
    return Case(predict_argv(world, tmp, path), path, "does not exist")


# --- predict: models ------------------------------------------------------------------------------------------
def checkpoint_of_another_network(world: World, tmp: Path) -> Case:
    model = copy_model(world, tmp)
    plans = json.loads((model / "plans.json").read_text())
    del plans["configurations"]["3d_fullres_segmamba"]  # a plans file that only knows U-Mamba
    (model / "plans.json").write_text(json.dumps(plans))
    path = model / "fold_0" / "checkpoint_final.pth"
    shutil.copy(world.segmamba_checkpoint, path)
    case = Case(predict_argv(world, tmp, good_image(world), model), path, "was trained as configuration")
    case.fragment += " '3d_fullres_segmamba' (segmamba), which"
    return case


def truncated_checkpoint(world: World, tmp: Path) -> Case:
    model = copy_model(world, tmp)
    path = model / "fold_0" / "checkpoint_final.pth"
    path.write_bytes(path.read_bytes()[:4096])
    return Case(predict_argv(world, tmp, good_image(world), model), path, "not a readable checkpoint")


def pickled_checkpoint(world: World, tmp: Path) -> Case:
    """nnU-Net's own trainer pickles Python objects into its checkpoints; weights_only=True refuses them."""
    import argparse

    model = copy_model(world, tmp)
    path = model / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=True)  # noqa: TID251 - writing a deliberately unsafe file
    torch.save({**checkpoint, "trainer_state": argparse.Namespace(epoch=1)}, path)
    return Case(predict_argv(world, tmp, good_image(world), model), path, "cannot be loaded with torch.load")


def not_a_model_folder(world: World, tmp: Path) -> Case:
    path = tmp / "downloads"
    path.mkdir()
    return Case(predict_argv(world, tmp, good_image(world), path), path, "not a model folder (no plans.json)")


# --- plan-and-preprocess ----------------------------------------------------------------------------------------
def missing_dataset_json_key(world: World, tmp: Path) -> Case:
    raw = copy_raw(world, tmp)
    path = raw / "dataset.json"
    data = json.loads(path.read_text())
    del data["file_ending"]
    path.write_text(json.dumps(data))
    return Case(plan_argv(raw, tmp), path, "required key(s) file_ending missing", [tmp / "pre"], [raw])


def non_integer_labels(world: World, tmp: Path) -> Case:
    raw = copy_raw(world, tmp)
    path = raw / "labelsTr" / "tiny_001.nii.gz"
    source = nib.load(path)
    data = np.asarray(source.dataobj).astype(np.float32)
    data[0, 0, 0] = 0.4999
    nib.save(nib.Nifti1Image(data, source.affine), path)
    return Case(plan_argv(raw, tmp), path, "non-integer label values (e.g. 0.4999)", [tmp / "pre"], [raw])


def undeclared_label(world: World, tmp: Path) -> Case:
    raw = copy_raw(world, tmp)
    path = raw / "labelsTr" / "tiny_002.nii.gz"
    source = nib.load(path)
    data = np.asarray(source.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, source.affine, source.header), path)
    return Case(plan_argv(raw, tmp), path, "label value(s) [7] not declared", [tmp / "pre"], [raw])


def label_on_another_grid(world: World, tmp: Path) -> Case:
    raw = copy_raw(world, tmp)
    path = raw / "labelsTr" / "tiny_003.nii.gz"
    source = nib.load(path)
    affine = source.affine.copy()
    affine[:3, 3] += 4.0
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj), affine, source.header), path)
    return Case(plan_argv(raw, tmp), path, "geometry differs from tiny_003_0000.nii.gz's", [tmp / "pre"], [raw])


def nan_in_training_image(world: World, tmp: Path) -> Case:
    raw = copy_raw(world, tmp)
    path = raw / "imagesTr" / "tiny_004_0000.nii.gz"
    source = nib.load(path)
    data = np.asarray(source.dataobj).astype(np.float32)
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, source.affine, source.header), path)
    return Case(plan_argv(raw, tmp), path, "1 non-finite voxel(s) (1 NaN", [tmp / "pre"], [raw])


def dataset_folder_without_dataset_json(world: World, tmp: Path) -> Case:
    raw = tmp / "raw" / "Dataset123_Empty"
    raw.mkdir(parents=True)
    return Case(plan_argv(raw, tmp), raw / "dataset.json", "missing. Create it", [tmp / "pre"], [raw])


# --- train --------------------------------------------------------------------------------------------------------
def train_argv(world: World, tmp: Path, *extra: str, preprocessed: Path | None = None) -> list[str]:
    return [
        "train", DATASET, "3d_fullres", "0", "--network", "umamba_bot", "--device", "cpu", "--num-workers", "0",
        "--preprocessed", str(preprocessed or world.preprocessed_root), "--results", str(tmp / "results"),
        "--epochs", "1", "--iterations-per-epoch", "1", "--val-iterations", "1", "--no-validation", *extra,
    ]  # fmt: skip


def too_few_cases_for_five_folds(world: World, tmp: Path) -> Case:
    preprocessed = Path(shutil.copytree(world.preprocessed_root, tmp / "preprocessed"))
    folder = preprocessed / DATASET
    (folder / "splits_final.json").unlink()  # nnU-Net would draw a 5-fold split of 4 cases
    data = folder / "nnUNetPlans_3d_fullres"
    for leftover in data.glob("tiny_00[45]*"):
        leftover.unlink()
    case = Case(train_argv(world, tmp, preprocessed=preprocessed), folder, "too few training cases for nnU-Net's")
    case.fragment += " 5-fold cross-validation (fold 0"
    return case


def resume_from_another_networks_checkpoint(world: World, tmp: Path) -> Case:
    fold = tmp / "results" / DATASET / world.model.name / "fold_0"
    fold.mkdir(parents=True)
    path = fold / "checkpoint_latest.pth"
    shutil.copy(world.segmamba_checkpoint, path)
    case = Case(train_argv(world, tmp, "--resume"), path, "holds a 'segmamba' network, not 'umamba_bot'")
    case.untouched.append(fold)
    return case


def dataset_not_preprocessed(world: World, tmp: Path) -> Case:
    preprocessed = tmp / "preprocessed"
    preprocessed.mkdir()
    case = Case(train_argv(world, tmp, preprocessed=preprocessed), preprocessed, f"no dataset '{DATASET}'")
    case.empty.append(tmp / "results")
    return case


# --- evaluate -----------------------------------------------------------------------------------------------------
def evaluate_folders(world: World, tmp: Path, change: Callable[[np.ndarray, np.ndarray], tuple]) -> tuple[Path, Path]:
    reference, prediction = tmp / "reference", tmp / "prediction"
    reference.mkdir()
    prediction.mkdir()
    source = world.raw / "labelsTr" / "tiny_000.nii.gz"
    shutil.copy(source, reference)
    label = nib.load(source)
    data, affine = change(np.asarray(label.dataobj), label.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), prediction / "tiny_000.nii.gz")
    return reference, prediction


def prediction_on_another_grid(world: World, tmp: Path) -> Case:
    def shift(data, affine):
        affine[:3, 3] += 5.0
        return data, affine

    reference, prediction = evaluate_folders(world, tmp, shift)
    argv = ["evaluate", "-ref", str(reference), "-pred", str(prediction)]
    path = prediction / "tiny_000.nii.gz"
    return Case(argv, path, "does not lie on the grid of its reference", untouched=[reference, prediction])


def prediction_not_a_label_map(world: World, tmp: Path) -> Case:
    def blur(data, affine):
        return data.astype(np.float32) * 0.5, affine

    reference, prediction = evaluate_folders(world, tmp, blur)
    argv = ["evaluate", "-ref", str(reference), "-pred", str(prediction)]
    path = prediction / "tiny_000.nii.gz"
    return Case(argv, path, "holds non-integer values; it is not a label map", untouched=[reference, prediction])


# --- register -------------------------------------------------------------------------------------------------------
def register_argv(world: World, tmp: Path, *extra: str, model: Path | None = None) -> list[str]:
    images = world.pairs / "imagesTr"
    return [
        "register", "--fixed", str(images / "mni_000_0000.nii.gz"), "--moving", str(images / "mni_001_0000.nii.gz"),
        "-m", str(model or world.morph), "-o", str(tmp / "out"), "--device", "cpu", *extra,
    ]  # fmt: skip


def moving_labels_on_another_grid(world: World, tmp: Path) -> Case:
    source = nib.load(world.pairs / "labelsTr" / "mni_001_0000.nii.gz")
    path = tmp / "labels.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[:-2], source.affine, source.header), path)
    case = Case(register_argv(world, tmp, "--moving-labels", str(path)), path, "does not lie on the grid of its image")
    case.empty.append(tmp / "out")
    return case


def segmentation_model_for_registration(world: World, tmp: Path) -> Case:
    argv = register_argv(world, tmp, model=world.model)
    return Case(
        argv, world.model, "a segmentation model folder (plans.json, fold_*), not a registration", [tmp / "out"]
    )


def truncated_moving_image(world: World, tmp: Path) -> Case:
    path = tmp / "moving.nii.gz"
    data = (world.pairs / "imagesTr" / "mni_001_0000.nii.gz").read_bytes()
    path.write_bytes(data[: len(data) // 3])
    argv = register_argv(world, tmp)
    argv[argv.index("--moving") + 1] = str(path)
    return Case(argv, path, "the file is truncated or damaged", [tmp / "out"])


# --- convert ------------------------------------------------------------------------------------------------------
def dicom_tree_with_gaps(world: World, tmp: Path) -> Case:
    tree = make_dicom_tree(tmp)
    path = Path(shutil.copytree(PYDICOM_DIRS / "77654033" / "CT2", tree / "patient_c" / "gappy"))
    raw = tmp / "raw"
    argv = ["convert", "dicom", str(tree), "-o", str(raw), "-d", "3", "--name", "Spine", "--labels", "background=0"]
    return Case(argv, path, "non-uniform slice spacing", [raw], [tree])


ROWS = [
    truncated_nifti,
    qform_not_sform,
    zero_spacing,
    negative_spacing,
    nan_voxels,
    four_d_image,
    five_d_image,
    sheared_affine,
    huge_header,
    empty_folder,
    dicom_with_gaps,
    dicom_mixed_series,
    truncated_dicom,
    wrong_channel_count,
    missing_input,
    checkpoint_of_another_network,
    truncated_checkpoint,
    pickled_checkpoint,
    not_a_model_folder,
    missing_dataset_json_key,
    non_integer_labels,
    undeclared_label,
    label_on_another_grid,
    nan_in_training_image,
    dataset_folder_without_dataset_json,
    too_few_cases_for_five_folds,
    resume_from_another_networks_checkpoint,
    dataset_not_preprocessed,
    prediction_on_another_grid,
    prediction_not_a_label_map,
    moving_labels_on_another_grid,
    segmentation_model_for_registration,
    truncated_moving_image,
    dicom_tree_with_gaps,
]


@pytest.mark.parametrize("build", ROWS, ids=[row.__name__ for row in ROWS])
def test_bad_input_is_one_clear_line_exit_2_and_no_partial_output(world, tmp_path, capsys, build):
    case = build(world, tmp_path)
    before = {folder: snapshot(folder) for folder in case.untouched}
    code = main(case.argv)
    captured = capsys.readouterr()
    command = case.argv[0]
    assert code == 2, captured.err
    assert captured.out == ""
    assert captured.err.startswith(f"medmamba {command}: error: "), captured.err
    assert "Traceback" not in captured.err
    assert str(case.path) in captured.err and case.fragment in captured.err, captured.err
    for folder in case.empty:
        assert not folder.exists() or not any(folder.iterdir()), sorted(folder.rglob("*"))
    for folder, state in before.items():
        assert snapshot(folder) == state, folder


def test_the_installed_command_prints_one_line_and_exits_2(world, tmp_path):
    """The real console process (not main() in-process): one stderr line, exit 2, nothing written."""
    case = truncated_nifti(world, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "medmamba", *case.argv], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 2 and result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("medmamba predict: error: ")]
    assert len(lines) == 1 and str(case.path) in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
