from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medmamba.engines.checkpoint import save_checkpoint
from medmamba.engines.segmentation.predict import MedmambaPredictor, find_input_cases, predict
from medmamba.errors import CheckpointError, ImageReadError, PlanError, UsageError
from medmamba.io.dicom import read_dicom_series
from medmamba.io.image import Image, read_image, write_image
from tests.engines.conftest import SHAPE, geometry

_PYDICOM = Path(next(iter(importlib.util.find_spec("pydicom").submodule_search_locations)))
CT_SERIES = _PYDICOM / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"  # real CT, 5 slices


def test_label_maps_have_exactly_the_input_grid(trained_model, tiny_dataset, tmp_path):
    images = tiny_dataset["raw"] / "imagesTr"
    written = predict(images, tmp_path / "out", trained_model, device="cpu")
    assert [p.name for p in written] == [f"tiny_{i:03d}.nii.gz" for i in range(6)]
    for path in written:
        source = images / path.name.replace(".nii.gz", "_0000.nii.gz")
        out, inp = nib.load(path), nib.load(source)
        assert out.shape == inp.shape == SHAPE
        np.testing.assert_array_equal(out.affine, inp.affine)  # bit-identical sform: overlays in Slicer/ITK-SNAP
        np.testing.assert_array_equal(out.header.get_qform(), inp.header.get_qform())
        labels = np.asarray(out.dataobj)
        assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [p.name for p in written]  # no temporaries


def test_same_labels_as_nnunets_own_file_pipeline(trained_model, tiny_dataset, tmp_path):
    """Our arrays-in/arrays-out path (medmamba.io + axis conversion) agrees with nnU-Net reading and writing the
    files itself (SimpleITKIO), voxel for voxel."""
    source = tiny_dataset["raw"] / "imagesTr" / "tiny_004_0000.nii.gz"
    ours = predict(source, tmp_path / "ours.nii.gz", trained_model, device="cpu")[0]
    predictor = MedmambaPredictor(torch.device("cpu"))
    predictor.initialize_from_trained_model_folder(trained_model, None)
    (tmp_path / "nnunet").mkdir()
    predictor.predict_from_files_sequential([[str(source)]], str(tmp_path / "nnunet"), False, True, None)
    theirs = tmp_path / "nnunet" / "tiny_004.nii.gz"
    assert len(np.unique(read_image(ours).array)) > 1  # a constant map would prove nothing about the axes
    np.testing.assert_array_equal(read_image(ours).array, read_image(theirs).array)
    assert read_image(ours).geometry.isclose(read_image(theirs).geometry)


def test_dicom_series_prediction_lies_on_the_series_grid(trained_model, tmp_path):
    series = read_dicom_series(CT_SERIES)
    (written,) = predict(CT_SERIES, tmp_path, trained_model, device="cpu")
    assert written.name == "CT5N.nii.gz"
    out = read_image(written)
    assert out.shape == series.shape
    assert out.geometry.isclose(series.geometry, atol_mm=1e-4), out.geometry.mismatches(series.geometry)


def test_probabilities_are_one_volume_per_class_summing_to_one(trained_model, tiny_dataset, tmp_path):
    source = tiny_dataset["raw"] / "imagesTr" / "tiny_001_0000.nii.gz"
    (labels_path,) = predict(source, tmp_path / "case.nii.gz", trained_model, device="cpu", save_probabilities=True)
    probabilities = read_image(tmp_path / "case_probabilities.nii.gz", multi_volume=True)
    labels = read_image(labels_path)
    assert probabilities.array.shape == (*SHAPE, 3) and probabilities.geometry.isclose(labels.geometry)
    np.testing.assert_allclose(probabilities.array.sum(-1), 1.0, atol=1e-5)
    agree = (probabilities.array.argmax(-1) == labels.array).mean()
    assert agree > 0.999  # argmax of the probabilities is the label map (ties aside)


def test_find_input_cases_groups_channels_and_singles(tmp_path):
    image = Image(np.ones((4, 4, 4), np.float32), geometry())
    for name in ("a_0000.nii.gz", "a_0001.nii.gz", "b_0000.nii.gz", "b_0001.nii.gz", "c.nii.gz"):
        write_image(image, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    cases = find_input_cases(tmp_path, num_channels=2)
    assert [(c.case_id, [p.name for p in c.sources], c.volumes_as_channels) for c in cases] == [
        ("a", ["a_0000.nii.gz", "a_0001.nii.gz"], False),
        ("b", ["b_0000.nii.gz", "b_0001.nii.gz"], False),
        ("c", ["c.nii.gz"], True),  # a single file for a 2-channel model: its volumes must be the channels
    ]
    single = find_input_cases(tmp_path / "b_0001.nii.gz", num_channels=2)
    assert [p.name for p in single[0].sources] == ["b_0000.nii.gz", "b_0001.nii.gz"]
    (tmp_path / "a_0001.nii.gz").unlink()
    with pytest.raises(ImageReadError, match=r"case 'a' has channels 0000, but the model needs 2"):
        find_input_cases(tmp_path, num_channels=2)


@pytest.mark.parametrize(
    ("setup", "error", "fragment"),
    [
        ("empty-input", ImageReadError, "no DICOM"),
        ("not-a-model", PlanError, "not a model folder"),
        ("no-such-checkpoint", CheckpointError, "no fold has checkpoint_latest.pth (found checkpoint_best.pth"),
        ("pickled-checkpoint", CheckpointError, "weights_only=True"),
        ("wrong-classes", CheckpointError, "trained with 5 output channels"),
        ("fold-mismatch", UsageError, "--folds [1] disagrees"),
        ("bad-step", UsageError, "--step-size 0.0"),
    ],
)
def test_bad_inputs_and_models_are_user_errors_and_write_nothing(
    trained_model, tiny_dataset, tmp_path, setup, error, fragment
):
    inputs, model, kwargs = tiny_dataset["raw"] / "imagesTr" / "tiny_000_0000.nii.gz", trained_model, {}
    if setup == "empty-input":
        inputs = tmp_path / "empty"
        inputs.mkdir()
    elif setup == "not-a-model":
        model = tmp_path
    elif setup == "no-such-checkpoint":
        kwargs["checkpoint"] = "checkpoint_latest.pth"
    elif setup in ("pickled-checkpoint", "wrong-classes"):
        model = tmp_path / "model"
        shutil.copytree(trained_model, model)
        final = model / "fold_0" / "checkpoint_final.pth"
        checkpoint = torch.load(final, weights_only=True)  # noqa: TID251
        if setup == "pickled-checkpoint":
            torch.save({**checkpoint, "logging": {"x": [np.float64(1.0)]}}, final)
        else:
            save_checkpoint(final, {**checkpoint, "out_channels": 5})
    elif setup == "fold-mismatch":
        model, kwargs["folds"] = trained_model / "fold_0", [1]
    elif setup == "bad-step":
        kwargs["step_size"] = 0.0
    output = tmp_path / "out"
    with pytest.raises(error) as info:
        predict(inputs, output, model, device="cpu", **kwargs)
    assert fragment in str(info.value)
    assert not output.exists()


@pytest.mark.gpu
def test_gpu_prediction_in_bf16_agrees_with_cpu(trained_model, tiny_dataset, tmp_path):
    source = tiny_dataset["raw"] / "imagesTr" / "tiny_002_0000.nii.gz"
    cpu = read_image(predict(source, tmp_path / "cpu.nii.gz", trained_model, device="cpu")[0])
    gpu = read_image(predict(source, tmp_path / "gpu.nii.gz", trained_model, device="cuda", amp_dtype="bf16")[0])
    assert gpu.geometry.isclose(cpu.geometry)
    assert (gpu.array == cpu.array).mean() > 0.98


def test_refuses_to_overwrite_an_input(trained_model, tiny_dataset, tmp_path):
    shutil.copy(tiny_dataset["raw"] / "imagesTr" / "tiny_000_0000.nii.gz", tmp_path / "scan.nii.gz")
    before = (tmp_path / "scan.nii.gz").read_bytes()
    with pytest.raises(UsageError, match=r"scan\.nii\.gz would overwrite an input image"):
        predict(tmp_path, tmp_path, trained_model, device="cpu")
    assert (tmp_path / "scan.nii.gz").read_bytes() == before
