"""``medmamba evaluate``: means on stdout, then the JSON and CSV paths."""

from __future__ import annotations

import json

import numpy as np

from medmamba.cli import main
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, write_image

GEOMETRY = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))


def write_pair(tmp_path, case: str, shift: int):
    ref = np.zeros((16, 16, 8), np.uint8)
    ref[4:10, 4:10, 2:6] = 1
    ref[6:8, 6:8, 3:5] = 2
    write_image(Image(ref, GEOMETRY), tmp_path / "labels" / f"{case}.nii.gz")
    write_image(Image(np.roll(ref, shift, axis=0), GEOMETRY), tmp_path / "pred" / f"{case}.nii.gz")


def test_evaluate_prints_means_and_writes_tables(tmp_path, capsys):
    (tmp_path / "labels").mkdir()
    (tmp_path / "pred").mkdir()
    write_pair(tmp_path, "a", 0)
    write_pair(tmp_path, "b", 1)
    args = ["evaluate", "-ref", str(tmp_path / "labels"), "-pred", str(tmp_path / "pred"), "-o", str(tmp_path / "m")]
    assert main([*args, "--labels", "1", "2", "1,2", "--tolerance-mm", "1", "1", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["structure", "Dice", "HD95", "mm", "NSD"]
    assert [line.split()[0] for line in lines[1:5]] == ["1", "2", "1+2", "foreground"]
    assert lines[-2:] == [str(tmp_path / "m" / "metrics.json"), str(tmp_path / "m" / "metrics.csv")]
    data = json.loads((tmp_path / "m" / "metrics.json").read_text())
    case_a = data["metric_per_case"][0]["metrics"]
    assert case_a["1"]["dice"] == 1.0 and case_a["1+2"]["hd95"] == 0.0
    case_b = data["metric_per_case"][1]["metrics"]
    assert case_b["1+2"]["hd95"] == 1.0  # shifted one voxel (1 mm) along x


def test_a_bad_label_is_exit_2(tmp_path, capsys):
    (tmp_path / "labels").mkdir()
    (tmp_path / "pred").mkdir()
    write_pair(tmp_path, "a", 0)
    args = ["evaluate", "-ref", str(tmp_path / "labels"), "-pred", str(tmp_path / "pred"), "--labels", "one"]
    assert main(args) == 2
    assert "--labels one: not a label" in capsys.readouterr().err
