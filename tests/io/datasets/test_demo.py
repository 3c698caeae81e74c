from __future__ import annotations

import json

import numpy as np
import pytest

from medmamba.io.datasets.demo import (
    DEMO_LABELS,
    build_demo_registration,
    build_demo_segmentation,
    mni_template_files,
    sample_case_params,
    synthesize_case,
)
from medmamba.io.datasets.nnunet_raw import open_dataset
from medmamba.io.datasets.registration import open_registration_dataset
from medmamba.io.image import read_image
from medmamba.io.verify import verify_dataset


@pytest.fixture(scope="module")
def segmentation(tmp_path_factory):
    return build_demo_segmentation(tmp_path_factory.mktemp("raw"), num_cases=4, num_test=1, seed=3)


def test_template_comes_from_the_installed_nilearn_wheel():
    files = mni_template_files()
    assert set(files) == {"t1", "gm", "wm"}
    assert read_image(files["t1"]).shape == (197, 233, 189)


def test_demo_segmentation_is_a_valid_nnunet_dataset(segmentation):
    assert segmentation.name == "Dataset990_MNITissue"
    report = verify_dataset(segmentation)
    assert (report.num_cases, report.num_test, report.warnings) == (4, 1, ())
    data = json.loads((segmentation / "dataset.json").read_text())
    assert data["labels"] == DEMO_LABELS and data["channel_names"] == {"0": "T1"}
    assert "MNI ICBM152 2009a" in data["description"] and "Fonov" in data["reference"]


def test_cases_have_varied_anisotropic_spacing_and_small_grids(segmentation):
    spacings, shapes = [], []
    for case in open_dataset(segmentation).training:
        image = read_image(case.images[0])
        spacings.append(image.geometry.spacing)
        shapes.append(image.shape)
    assert len(set(spacings)) > 1  # the planner must choose a target spacing
    assert any(s[2] > s[0] for s in spacings)  # thicker slices than in-plane
    assert all(3.0 <= s <= 4.5 for spacing in spacings for s in spacing)
    assert all(35 <= n <= 70 for shape in shapes for n in shape)


def test_labels_follow_real_t1_contrast(segmentation):
    for case in open_dataset(segmentation).training:
        image, label = read_image(case.images[0]).array, read_image(case.label).array
        fractions = np.bincount(label.ravel(), minlength=3) / label.size
        assert fractions[1] > 0.1 and fractions[2] > 0.05  # grey and white matter both present
        means = [image[label == k].mean() for k in range(3)]
        assert means[2] > means[1] > means[0]  # T1: white matter brighter than grey matter, brighter than background


def test_cases_are_deterministic_and_really_deformed():
    grid = {"shape": (40, 48, 40)}
    params = [sample_case_params(np.random.default_rng(seed), spacing=(4.0, 4.0, 4.0)) for seed in (7, 7, 8)]
    (img_a, lab_a), (img_b, lab_b), (_, lab_c) = (synthesize_case(p, **grid) for p in params)
    np.testing.assert_array_equal(img_a.array, img_b.array)
    np.testing.assert_array_equal(lab_a.array, lab_b.array)
    brain_a, brain_c = lab_a.array > 0, lab_c.array > 0
    dice = 2 * np.count_nonzero(brain_a & brain_c) / (np.count_nonzero(brain_a) + np.count_nonzero(brain_c))
    assert 0.6 < dice < 0.97  # same anatomy, different deformation


def test_demo_registration_pairs_share_one_grid(tmp_path):
    root = build_demo_registration(tmp_path, num_subjects=3, num_val_pairs=1, seed=1, shape=(32, 40, 32), spacing=4.0)
    dataset = open_registration_dataset(root)
    assert (len(dataset.pairs_of("train")), len(dataset.pairs_of("val"))) == (1, 1)
    assert dataset.shape == (32, 40, 32)
    for pair in dataset.pairs:
        fixed, moving = read_image(pair.fixed.image), read_image(pair.moving.image)
        assert fixed.geometry.isclose(moving.geometry) and fixed.shape == moving.shape
        assert not np.array_equal(read_image(pair.fixed.label).array, read_image(pair.moving.label).array)
    assert verify_dataset(root).kind == "registration"
