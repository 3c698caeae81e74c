from __future__ import annotations

import json

import numpy as np
import pytest

from medmamba.io.datasets.registration import RegistrationDatasetWriter, open_registration_dataset
from medmamba.io.image import Image, read_image, write_image
from medmamba.io.verify import check_dataset
from tests.io.conftest import toy_case


@pytest.fixture
def pairs_dataset(tmp_path):
    rng = np.random.default_rng(1)
    with RegistrationDatasetWriter(
        tmp_path, 11, "Pairs", modalities=["MR", "CT"], labels={0: "background", 1: "organ", 2: "lesion"}
    ) as writer:
        paths = []
        for i in range(3):
            mr, label = toy_case(rng)
            fixed = writer.add_image(f"sub_{i}", mr, label, modality=0)
            moving = writer.add_image(f"sub_{i}", Image(mr.array * 100 - 1000, mr.geometry), label, modality=1)
            paths.append((fixed, moving))
        writer.add_pair(*paths[0])
        writer.add_pair(*paths[1])
        writer.add_pair(*paths[2], split="val")
    return writer.path


def test_writer_follows_learn2reg_dataset_json(pairs_dataset):
    data = json.loads((pairs_dataset / "dataset.json").read_text())
    assert data["modality"] == {"0": "MR", "1": "CT"}
    assert data["registration_direction"] == {"fixed": 0, "moving": 1}
    assert data["tensorImageShape"]["0"] == [8, 9, 7]
    assert data["numTraining"] == 6 and data["numPairedTraining"] == 2 and data["numRegistration_val"] == 1
    assert data["training_paired_images"][0] == {
        "fixed": "./imagesTr/sub_0_0000.nii.gz",
        "moving": "./imagesTr/sub_0_0001.nii.gz",
    }
    assert data["training"][1] == {"image": "./imagesTr/sub_0_0001.nii.gz", "label": "./labelsTr/sub_0_0001.nii.gz"}


def test_open_resolves_pairs_with_their_labels(pairs_dataset):
    dataset = open_registration_dataset(pairs_dataset)
    assert len(dataset.pairs_of("train")) == 2 and len(dataset.pairs_of("val")) == 1
    pair = dataset.pairs_of("val")[0]
    assert pair.fixed.image == (pairs_dataset / "imagesTr" / "sub_2_0000.nii.gz").resolve()
    assert pair.moving.label == (pairs_dataset / "labelsTr" / "sub_2_0001.nii.gz").resolve()
    assert dataset.modalities == {0: "MR", 1: "CT"}
    assert dataset.label_values(1) == (0, 1, 2)
    np.testing.assert_array_equal(read_image(pair.fixed.label).array, read_image(pair.moving.label).array)


def test_verify_dispatches_to_the_registration_checker(pairs_dataset):
    report = check_dataset(pairs_dataset)
    assert (report.kind, report.ok, report.num_cases) == ("registration", True, 3)


def test_verify_reports_missing_moving_image_and_wrong_grid(pairs_dataset):
    (pairs_dataset / "imagesTr" / "sub_1_0001.nii.gz").unlink()
    label = pairs_dataset / "labelsTr" / "sub_0_0000.nii.gz"
    image = read_image(label)
    write_image(Image(image.array[:, :, :-1], image.geometry), label)
    report = check_dataset(pairs_dataset)
    found = [(p.path, p.what) for p in report.problems]
    assert (
        str((pairs_dataset / "imagesTr" / "sub_1_0001.nii.gz").resolve()),
        "listed in dataset.json but missing",
    ) in found
    assert any(
        path == str(label.resolve()) and what.startswith("shape (8, 9, 6) differs from sub_0_0000.nii.gz's (8, 9, 7)")
        for path, what in found
    )


def test_count_mismatch_in_dataset_json_is_a_problem(pairs_dataset):
    path = pairs_dataset / "dataset.json"
    data = json.loads(path.read_text())
    data["numPairedTraining"] = 9
    path.write_text(json.dumps(data))
    report = check_dataset(pairs_dataset)
    assert [p.what for p in report.problems] == ["numPairedTraining is 9 but 'training_paired_images' lists 2 pair(s)"]
