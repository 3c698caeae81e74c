from __future__ import annotations

import json

import numpy as np
import pytest

from medmamba.engines.evaluate import evaluate_segmentations
from medmamba.errors import DatasetError, GeometryError, ImageReadError, UsageError
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, write_image
from medmamba.metrics.segmentation import segmentation_metrics

GEOMETRY = Geometry((1.0, 1.5, 2.0), (3.0, -4.0, 5.0), (0, 1, 0, 1, 0, 0, 0, 0, 1))


def labels(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.zeros((12, 10, 8), np.uint8)
    a[2:8, 2:7, 1:6] = 1
    a[4:6, 3:5, 2:4] = 2
    noise = rng.random(a.shape) < 0.05
    return np.where(noise, rng.integers(0, 3, a.shape), a).astype(np.uint8)


@pytest.fixture
def folders(tmp_path):
    ref, pred = tmp_path / "labels", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for i in range(3):
        write_image(Image(labels(i), GEOMETRY), ref / f"case_{i}.nii.gz")
        write_image(Image(labels(10 + i), GEOMETRY), pred / f"case_{i}.nii.gz")
    # what `medmamba predict --save-probabilities` leaves beside the label maps: not a case
    write_image(Image(np.zeros((12, 10, 8, 3), np.float32), GEOMETRY), pred / "case_0_probabilities.nii.gz")
    return ref, pred


def test_writes_per_case_and_mean_metrics_as_json_and_csv(folders):
    ref, pred = folders
    _, json_path, csv_path = evaluate_segmentations(ref, pred, tolerance_mm=[1.0, 2.0])
    assert json_path == pred / "metrics.json" and csv_path == pred / "metrics.csv"
    data = json.loads(json_path.read_text())
    assert [c["case"] for c in data["metric_per_case"]] == ["case_0", "case_1", "case_2"]
    assert data["meta"]["structures"] == ["1", "2"] and data["meta"]["tolerance_mm"] == {"1": 1.0, "2": 2.0}
    expected = segmentation_metrics(labels(1), labels(11), [1, 2], spacing=GEOMETRY.spacing, tolerance_mm=[1.0, 2.0])
    got = data["metric_per_case"][1]["metrics"]
    for label in (1, 2):
        assert got[str(label)]["dice"] == pytest.approx(expected[label].dice)
        assert got[str(label)]["hd95"] == pytest.approx(expected[label].hd95)
        assert got[str(label)]["surface_dice"] == pytest.approx(expected[label].surface_dice)
    assert data["mean"]["1"]["dice"] == pytest.approx(
        np.mean([c["metrics"]["1"]["dice"] for c in data["metric_per_case"]])
    )
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "case,structure,dice,hd95,surface_dice,n_reference,n_prediction"
    assert len(lines) == 1 + 3 * 2 + 2 + 1 and lines[-1].startswith("mean,foreground,")


def test_regions_and_single_files(folders, tmp_path):
    ref, pred = folders
    table, _, _ = evaluate_segmentations(
        ref / "case_0.nii.gz", pred / "case_0.nii.gz", tmp_path / "o", structures=[(1, 2)]
    )
    assert list(table.rows) == ["case_0"] and list(table.rows["case_0"]) == ["1+2"]
    assert (tmp_path / "o" / "metrics.csv").is_file()


def test_a_prediction_on_another_grid_is_an_error_not_a_score(folders):
    ref, pred = folders
    shifted = Geometry(GEOMETRY.spacing, (3.0, -4.0, 7.0), GEOMETRY.direction)
    write_image(Image(labels(11), shifted), pred / "case_1.nii.gz")
    with pytest.raises(GeometryError, match=r"case_1\.nii\.gz: does not lie on the grid .*\(origin"):
        evaluate_segmentations(ref, pred)
    assert not (pred / "metrics.json").exists()


def test_unmatched_cases(folders):
    ref, pred = folders
    (pred / "case_2.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case_2\.nii\.gz: has no prediction"):
        evaluate_segmentations(ref, pred)
    table, json_path, _ = evaluate_segmentations(ref, pred, allow_missing=True)
    assert list(table.rows) == ["case_0", "case_1"]
    assert json.loads(json_path.read_text())["meta"]["missing_predictions"] == ["case_2"]
    write_image(Image(labels(3), GEOMETRY), pred / "stray.nii.gz")
    with pytest.raises(DatasetError, match=r"stray\.nii\.gz: has no reference"):
        evaluate_segmentations(ref, pred, allow_missing=True)


def test_non_label_files_and_bad_tolerances(folders):
    ref, pred = folders
    with pytest.raises(UsageError, match="3 surface-Dice tolerances for 2 structures"):
        evaluate_segmentations(ref, pred, tolerance_mm=[1.0, 2.0, 3.0])
    write_image(Image(labels(11).astype(np.float32) + 0.5, GEOMETRY), pred / "case_1.nii.gz")
    with pytest.raises(ImageReadError, match=r"case_1\.nii\.gz: holds non-integer values"):
        evaluate_segmentations(ref, pred)
