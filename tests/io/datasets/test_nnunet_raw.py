from __future__ import annotations

import json

import numpy as np
import pytest

from medmamba.errors import DatasetError
from medmamba.io.datasets.nnunet_raw import (
    RawDatasetWriter,
    dataset_folder_name,
    find_dataset,
    load_dataset_json,
    open_dataset,
    parse_dataset_json,
)
from medmamba.io.image import read_image
from tests.io.conftest import toy_case


def test_writer_produces_nnunet_layout_and_dataset_json(make_dataset):
    root = make_dataset()
    assert root.name == "Dataset001_Toy"
    assert sorted(p.name for p in (root / "imagesTr").iterdir()) == [
        f"case_{i:03d}_{c:04d}.nii.gz" for i in range(3) for c in range(2)
    ]
    assert sorted(p.name for p in (root / "labelsTr").iterdir()) == [f"case_{i:03d}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in (root / "imagesTs").iterdir()) == ["case_003_0000.nii.gz", "case_003_0001.nii.gz"]
    data = json.loads((root / "dataset.json").read_text())
    assert data["channel_names"] == {"0": "CT", "1": "MR"}
    assert data["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    assert (data["numTraining"], data["file_ending"]) == (3, ".nii.gz")
    assert read_image(root / "labelsTr" / "case_000.nii.gz").array.dtype == np.uint8
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_open_dataset_lists_cases_like_nnunet(make_dataset):
    root = make_dataset()
    dataset = open_dataset(root)
    assert (dataset.dataset_id, dataset.name) == (1, "Toy")
    assert [c.case_id for c in dataset.training] == ["case_000", "case_001", "case_002"]
    assert [p.name for p in dataset.training[1].images] == ["case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    assert dataset.training[1].label == root / "labelsTr" / "case_001.nii.gz"
    assert [c.case_id for c in dataset.test] == ["case_003"]
    assert dataset.dataset_json.label_values == (0, 1, 2)


def test_find_dataset_by_id_name_or_path(make_dataset):
    root = make_dataset(dataset_id=42, name="Liver")
    assert find_dataset(42, root.parent) == root
    assert find_dataset("42", root.parent) == root
    assert find_dataset("Dataset042_Liver", root.parent) == root
    assert find_dataset(root) == root
    with pytest.raises(DatasetError, match="no dataset '7'"):
        find_dataset(7, root.parent)


def _write_case_without_label(root) -> None:
    image, _ = toy_case(np.random.default_rng(0))
    with RawDatasetWriter(root, 3, "Broken", channel_names=["CT"], labels={"background": 0, "x": 1}) as writer:
        writer.add_case("ok_case", [image], None)


def test_failed_writer_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="needs a label"):
        _write_case_without_label(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_to_overwrite(make_dataset):
    root = make_dataset()
    with (
        pytest.raises(DatasetError, match="already exists"),
        RawDatasetWriter(root.parent, 1, "Toy", channel_names=["CT"], labels={"background": 0}),
    ):
        pass


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"labels": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"}, "channel_names"),
        (
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "a": 2},
                "numTraining": 1,
                "file_ending": ".nii.gz",
            },
            "not consecutive",
        ),
        (
            {"channel_names": {"1": "CT"}, "labels": {"background": 0}, "numTraining": 1, "file_ending": ".nii.gz"},
            "keys ['1'] are not 0",
        ),
        (
            {"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": -1, "file_ending": ".nii.gz"},
            "numTraining -1",
        ),
        (
            {"channel_names": {"0": "CT"}, "labels": {"background": 0}, "numTraining": 1, "file_ending": "nii"},
            "does not start with a dot",
        ),
        (
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "a": 1, "ignore": 5},
                "numTraining": 1,
                "file_ending": ".nii.gz",
            },
            "ignore label 5",
        ),
        (
            {
                "channel_names": {"0": "CT"},
                "labels": {"background": 0, "wt": [1, 2], "tc": 2},
                "numTraining": 1,
                "file_ending": ".nii.gz",
            },
            "regions_class_order",
        ),
    ],
    ids=["missing-key", "gap", "channel-index", "negative-count", "ending", "ignore", "regions"],
)
def test_dataset_json_rules(data, fragment):
    parsed, problems = parse_dataset_json(data)
    assert parsed is None
    assert any(fragment in p.what for p in problems), [p.what for p in problems]


def test_region_labels_with_order_are_valid():
    data = {
        "channel_names": {"0": "T1", "1": "T2"},
        "labels": {"background": 0, "whole_tumor": [1, 2, 3], "core": [2, 3], "enhancing": 3},
        "regions_class_order": [1, 2, 3],
        "numTraining": 2,
        "file_ending": ".nii.gz",
        "licence": "CC-BY",
    }
    parsed, problems = parse_dataset_json(data)
    assert problems == []
    assert parsed.has_regions and parsed.label_values == (0, 1, 2, 3)
    assert parsed.to_dict() == data


def test_load_dataset_json_reports_invalid_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="is not valid JSON"):
        load_dataset_json(tmp_path)


def test_dataset_folder_name_rules():
    assert dataset_folder_name(5, "Heart") == "Dataset005_Heart"
    with pytest.raises(ValueError, match="1…999"):
        dataset_folder_name(1000, "X")
    with pytest.raises(ValueError, match="one word"):
        dataset_folder_name(1, "a b")
