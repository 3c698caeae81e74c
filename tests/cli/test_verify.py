from __future__ import annotations

import json

import pytest

from medmamba.cli import main
from tests.io.conftest import build_toy_dataset
from tests.io.datasets.test_convert import make_dicom_tree, make_msd_task
from tests.io.test_verify import BAD_DATASETS, snapshot


@pytest.fixture
def make_dataset(tmp_path):
    return lambda **kwargs: build_toy_dataset(tmp_path / "raw", **kwargs)


@pytest.fixture
def msd_task(tmp_path):
    return make_msd_task(tmp_path)


@pytest.fixture
def dicom_tree(tmp_path):
    return make_dicom_tree(tmp_path)


def test_verify_clean_dataset_exits_0(make_dataset, capsys):
    root = make_dataset()
    assert main(["verify", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == f"{root}: ok (nnunet, 3 case(s), 1 test case(s), 0 warning(s))"


def test_verify_finds_dataset_by_id_under_raw_root(make_dataset, capsys, monkeypatch):
    root = make_dataset(dataset_id=5)
    monkeypatch.setenv("MEDMAMBA_RAW", str(root.parent))
    assert main(["verify", "5"]) == 0
    assert str(root) in capsys.readouterr().out


@pytest.mark.parametrize("damage", BAD_DATASETS, ids=[f.__name__ for f in BAD_DATASETS])
def test_verify_bad_dataset_exits_2_naming_file_and_problem(make_dataset, capsys, damage):
    root = make_dataset()
    path, fragment = damage(root)
    before = snapshot(root)
    assert main(["verify", str(root)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("medmamba verify: error: ")
    assert f"{path}: " in captured.err and fragment in captured.err
    assert "Traceback" not in captured.err
    assert snapshot(root) == before


def test_verify_json_report(make_dataset, capsys):
    root = make_dataset()
    (root / "labelsTr" / "case_001.nii.gz").unlink()
    assert main(["verify", str(root), "--json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["problems"] == [
        {
            "path": str(root / "labelsTr" / "case_001.nii.gz"),
            "what": "missing: case case_001 has no label",
            "fix": "Add the label map or move the case to imagesTs",
        }
    ]


def test_verify_unknown_dataset_exits_2(tmp_path, capsys):
    assert main(["verify", "17", "--raw-root", str(tmp_path)]) == 2
    assert "no dataset '17'" in capsys.readouterr().err


def test_convert_msd_then_verify(msd_task, tmp_path, capsys):
    raw = tmp_path / "raw"
    assert main(["convert", "msd", str(msd_task), "-o", str(raw), "-d", "77"]) == 0
    target = raw / "Dataset077_Toy"
    assert capsys.readouterr().out.strip() == str(target)
    assert main(["verify", str(target)]) == 0


def test_convert_msd_bad_source_exits_2_and_writes_nothing(msd_task, tmp_path, capsys):
    (msd_task / "labelsTr" / "toy_002.nii.gz").unlink()
    raw = tmp_path / "raw"
    raw.mkdir()
    assert main(["convert", "msd", str(msd_task), "-o", str(raw)]) == 2
    err = capsys.readouterr().err
    assert f"{msd_task / 'labelsTr' / 'toy_002.nii.gz'}: missing: an image in imagesTr has no label" in err
    assert list(raw.iterdir()) == []


def test_convert_dicom_tree(dicom_tree, tmp_path, capsys):
    raw = tmp_path / "raw"
    args = ["convert", "dicom", str(dicom_tree), "-o", str(raw), "-d", "3", "--name", "Spine"]
    assert main([*args, "--labels", "background=0", "tissue=1"]) == 0
    assert capsys.readouterr().out.strip() == str(raw / "Dataset003_Spine")
    assert main([*args, "--labels", "background", "--overwrite"]) == 2
    assert "--labels 'background': write NAME=VALUE" in capsys.readouterr().err


def test_convert_demo_writes_both_datasets(tmp_path, capsys):
    assert main(["convert", "demo", "-o", str(tmp_path), "--cases", "2", "--subjects", "2", "--seed", "1"]) == 2
    assert "--subjects must be at least 3" in capsys.readouterr().err  # one pair is the validation pair
    assert main(["convert", "demo", "-o", str(tmp_path), "--kind", "segmentation", "--cases", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "Dataset990_MNITissue")


def test_convert_without_output_folder_is_a_usage_error(msd_task, capsys, monkeypatch):
    monkeypatch.delenv("MEDMAMBA_RAW", raising=False)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    assert main(["convert", "msd", str(msd_task)]) == 2
    assert "pass -o/--raw-root" in capsys.readouterr().err
