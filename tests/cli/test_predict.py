"""``medmamba predict``: label maps on stdout, one line each; exit 2 for user mistakes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmamba.cli import main
from tests.engines.conftest import preprocess, train_tiny, write_raw


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli_predict")
    raw = write_raw(root / "raw", num_cases=4)
    preprocessed = preprocess(raw, root / "preprocessed")
    tiny = {"raw": raw, "preprocessed": preprocessed, "preprocessed_root": preprocessed.parent}
    splits = preprocessed / "splits_final.json"
    splits.write_text('[{"train": ["tiny_000", "tiny_001", "tiny_002"], "val": ["tiny_003"]}]')
    return raw, train_tiny(tiny, root / "results").parent


def test_predicts_a_folder_and_prints_each_label_map(model, tmp_path, capsys):
    raw, model_dir = model
    args = ["predict", "-i", str(raw / "imagesTr"), "-o", str(tmp_path), "-m", str(model_dir), "--device", "cpu"]
    assert main([*args, "--save-probabilities", "--no-progress", "-f", "0"]) == 0
    out = capsys.readouterr().out.split()
    assert out == [str(tmp_path / f"tiny_{i:03d}.nii.gz") for i in range(4)]
    for i in range(4):
        label = nib.load(tmp_path / f"tiny_{i:03d}.nii.gz")
        source = nib.load(raw / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")
        np.testing.assert_array_equal(label.affine, source.affine)
        assert nib.load(tmp_path / f"tiny_{i:03d}_probabilities.nii.gz").shape == (*source.shape, 3)


def test_mirroring_averages_flipped_passes(model, tmp_path, capsys):
    raw, model_dir = model
    source = raw / "imagesTr" / "tiny_003_0000.nii.gz"
    for name, extra in (("plain", []), ("mirrored", ["--mirror"])):
        args = ["predict", "-i", str(source), "-o", str(tmp_path / f"{name}.nii.gz"), "-m", str(model_dir / "fold_0")]
        assert main([*args, "--device", "cpu", "--save-probabilities", *extra]) == 0
    capsys.readouterr()
    plain = np.asarray(nib.load(tmp_path / "plain_probabilities.nii.gz").dataobj)
    mirrored = np.asarray(nib.load(tmp_path / "mirrored_probabilities.nii.gz").dataobj)
    assert not np.allclose(plain, mirrored)  # 8 flipped passes averaged: not the plain pass


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["-i", "{raw}/imagesTr", "-m", "{tmp}"], "not a model folder"),
        (["-i", "{tmp}/nothing", "-m", "{model}"], "does not exist"),
        (["-i", "{raw}/imagesTr", "-m", "{model}", "--step-size", "1.5"], "--step-size 1.5"),
        (["-i", "{raw}/imagesTr", "-m", "{model}", "--checkpoint", "checkpoint_best.pth", "-f", "3"], "fold_3"),
    ],
    ids=["not-a-model", "no-input", "bad-step", "missing-fold"],
)
def test_user_mistakes_exit_2(model, tmp_path, capsys, args, fragment):
    raw, model_dir = model
    args = [a.format(raw=raw, tmp=tmp_path, model=model_dir) for a in args]
    assert main(["predict", *args, "-o", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert fragment in err and "medmamba predict: error:" in err
    assert not (tmp_path / "out").exists()
