"""Preprocessing: nnU-Net's arrays in nnU-Net's folders, resumable case by case, rebuilt when the plan changes."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medmamba.io.datasets import open_dataset
from medmamba.plans import preprocess as preprocess_module
from medmamba.plans.preprocess import case_files, preprocess

CASES = ["toy_000", "toy_001", "toy_002", "toy_003"]


@pytest.fixture
def copy(planned, tmp_path):
    """A private copy of the shared preprocessed dataset folder and its plans file."""
    folder = tmp_path / planned.plans_file.parent.name
    shutil.copytree(planned.plans_file.parent, folder)
    return folder / planned.plans_file.name


def test_data_folders_hold_nnunets_files_readable_by_its_dataset_class(planned, raw_dataset):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    manager = PlansManager(str(planned.plans_file))
    assert [r.configuration for r in planned.preprocessed] == ["2d", "3d_fullres"]
    for result in planned.preprocessed:
        assert sorted(result.written) == CASES and result.skipped == ()
        names = sorted(p.name for p in result.folder.iterdir())
        assert names == sorted(p.name for c in CASES for p in case_files(result.folder, c))
        config = manager.get_configuration(result.configuration)
        data, seg, _, properties = infer_dataset_class(str(result.folder))(str(result.folder)).load_case("toy_001")
        # nnU-Net's own preprocessor on the same case gives the same arrays
        preprocessor = config.preprocessor_class(verbose=False)
        dataset_json = json.loads((planned.plans_file.parent / "dataset.json").read_text())
        case = next(c for c in open_dataset(raw_dataset).training if c.case_id == "toy_001")
        ref_data, ref_seg, ref_properties = preprocessor.run_case(
            [str(p) for p in case.images], str(case.label), manager, config, dataset_json
        )
        np.testing.assert_array_equal(np.asarray(data), ref_data)
        np.testing.assert_array_equal(np.asarray(seg), ref_seg)
        assert (
            properties["shape_after_cropping_and_before_resampling"]
            == ref_properties["shape_after_cropping_and_before_resampling"]
        )
    gt = planned.plans_file.parent / "gt_segmentations"
    assert sorted(p.name for p in gt.iterdir()) == [f"{c}.nii.gz" for c in CASES]


def test_a_second_run_skips_done_cases_and_redoes_missing_or_partial_ones(copy, raw_dataset):
    folder = copy.parent / "medmambaPlans_3d_fullres"
    for path in case_files(folder, "toy_001"):
        path.unlink()
    case_files(folder, "toy_002")[2].unlink()  # data written, properties not: an interrupted case
    untouched = {p: p.stat().st_mtime_ns for c in ("toy_000", "toy_003") for p in case_files(folder, c)}
    (result,) = preprocess(open_dataset(raw_dataset), copy, ["3d_fullres_umamba_bot"], num_workers=1)
    assert result.configuration == "3d_fullres_umamba_bot" and result.folder == folder
    assert result.written == ("toy_001", "toy_002")
    assert result.skipped == ("toy_000", "toy_003")
    assert all(p.stat().st_mtime_ns == t for p, t in untouched.items())
    assert all(p.is_file() for c in CASES for p in case_files(folder, c))


def test_configurations_sharing_data_are_preprocessed_once(copy, raw_dataset):
    results = preprocess(open_dataset(raw_dataset), copy, ["3d_fullres", "3d_fullres_umamba_enc", "2d_umamba_bot"])
    assert [r.folder.name for r in results] == ["medmambaPlans_3d_fullres", "medmambaPlans_2d"]
    assert all(r.written == () for r in results)


def test_an_interrupted_run_keeps_finished_cases_and_leaves_no_stray_file(copy, raw_dataset, monkeypatch):
    folder = copy.parent / "medmambaPlans_2d"
    shutil.rmtree(folder)
    real = preprocess_module._run_case_save
    calls = []

    def crash_on_third(*args):
        calls.append(args[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(preprocess_module, "_run_case_save", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        preprocess(open_dataset(raw_dataset), copy, ["2d"], num_workers=1)
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for c in CASES[:2] for p in case_files(folder, c))
    assert not any(p.name.startswith(".") for p in copy.parent.iterdir())
    monkeypatch.setattr(preprocess_module, "_run_case_save", real)
    (result,) = preprocess(open_dataset(raw_dataset), copy, ["2d"], num_workers=1)
    assert result.written == tuple(CASES[2:]) and result.skipped == tuple(CASES[:2])


def test_a_changed_plan_rebuilds_the_data_folder(copy, raw_dataset):
    plans = json.loads(copy.read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = [3.0, 1.2, 1.2]
    copy.write_text(json.dumps(plans))
    (result,) = preprocess(open_dataset(raw_dataset), copy, ["3d_fullres"], num_workers=1)
    assert sorted(result.written) == CASES
    record = json.loads((copy.parent / "medmambaPlans_3d_fullres.medmamba.json").read_text())
    assert record["settings"]["spacing"] == [3.0, 1.2, 1.2]


def test_an_unknown_configuration_is_a_plan_error(copy, raw_dataset):
    from medmamba.errors import PlanError

    with pytest.raises(PlanError, match=r"no configuration 3d_lowres.*Choose from"):
        preprocess(open_dataset(raw_dataset), copy, ["3d_lowres"])
