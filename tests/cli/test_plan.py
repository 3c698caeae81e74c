"""``medmamba plan-and-preprocess``: plans path on stdout, exit 2 and nothing written for a bad dataset or option."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmamba.cli import main
from tests.plans.conftest import write_raw_dataset


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_raw_dataset(tmp_path_factory.mktemp("raw"), dataset_id=9, n_cases=4, name="Cli")


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in ("MEDMAMBA_RAW", "MEDMAMBA_PREPROCESSED", "nnUNet_raw", "nnUNet_preprocessed"):
        monkeypatch.delenv(name, raising=False)


def test_plans_and_preprocesses_and_prints_the_plans_path(raw, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pre"
    args = ["plan-and-preprocess", "-d", str(raw), "--preprocessed-root", str(out), "--no-progress"]
    assert main([*args, "--networks", "umamba_bot", "-c", "3d_fullres"]) == 0
    captured = capsys.readouterr()
    plans_file = out / "Dataset009_Cli" / "medmambaPlans.json"
    assert captured.out.strip() == str(plans_file)
    assert "3d_fullres_umamba_bot" in captured.err and "4 case(s) written" in captured.err
    plans = json.loads(plans_file.read_text())
    assert plans["configurations"]["3d_fullres_umamba_bot"]["inherits_from"] == "3d_fullres"
    assert "2d_umamba_enc" not in plans["configurations"]
    assert len(list((out / "Dataset009_Cli" / "medmambaPlans_3d_fullres").glob("*.pkl"))) == 4

    # by id under MEDMAMBA_RAW / MEDMAMBA_PREPROCESSED, again: every case is already done
    monkeypatch.setenv("MEDMAMBA_RAW", str(raw.parent))
    monkeypatch.setenv("MEDMAMBA_PREPROCESSED", str(out))
    assert main(["plan-and-preprocess", "-d", "9", "--networks", "umamba_bot", "-c", "3d_fullres", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["plans_file"] == str(plans_file)
    assert summary["preprocessed"] == [
        {
            "folder": str(plans_file.parent / "medmambaPlans_3d_fullres"),
            "configuration": "3d_fullres",
            "written": 0,
            "skipped": 4,
        }
    ]
    row = next(r for r in summary["configurations"] if r["configuration"] == "3d_fullres_umamba_bot")
    assert row["network"] == "medmamba.networks.nnunet.UMambaBot" and 0 < row["gpu_memory_gb"] <= 8


def test_a_dataset_that_fails_verification_exits_2_and_writes_nothing(raw, tmp_path, capsys):
    bad = tmp_path / raw.name
    shutil.copytree(raw, bad)
    label = bad / "labelsTr" / "toy_002.nii.gz"
    image = nib.load(label)
    data = np.asarray(image.dataobj).copy()
    data[0, 0, 0] = 7  # not declared in dataset.json
    nib.save(nib.Nifti1Image(data, image.affine), label)
    out = tmp_path / "pre"
    assert main(["plan-and-preprocess", "-d", str(bad), "--preprocessed-root", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medmamba plan-and-preprocess: error:")
    assert "toy_002.nii.gz" in err and "7" in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--networks", "umamba_bott"], "Did you mean 'umamba_bot'"),
        (["--gpu-memory-gb", "0"], "--gpu-memory-gb must be positive"),
        (["--network-kwargs", "{segmamba"], "--network-kwargs: not JSON"),
        (["--network-kwargs", '{"segmamba": false}'], "expected an object of objects"),
        (["--networks", "umamba_bot", "--network-kwargs", '{"segmamba": {"ssm_fp32": false}}'], "not planned"),
        (
            ["--networks", "umamba_bot", "--network-kwargs", '{"umamba_bot": {"embed_dim": 48}}'],
            "umamba_bot does not take embed_dim",
        ),
    ],
    ids=["unknown-network", "zero-budget", "not-json", "not-objects", "unplanned-network", "unknown-argument"],
)
def test_bad_options_exit_2_before_anything_is_written(raw, tmp_path, capsys, extra, message):
    out = tmp_path / "pre"
    assert main(["plan-and-preprocess", "-d", str(raw), "--preprocessed-root", str(out), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_without_an_output_folder_it_says_how_to_give_one(raw, capsys):
    assert main(["plan-and-preprocess", "-d", str(raw)]) == 2
    assert "--preprocessed-root" in capsys.readouterr().err
