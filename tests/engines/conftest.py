"""A tiny preprocessed nnU-Net dataset whose plans name medmamba networks, built in-process in a few seconds.

Six 3D cases of 24×20×16 voxels (spacing 1.0/1.2/1.5 mm, an LPS-flipped direction and an offset origin, so a
geometry bug shows), two blob classes over noise; plans written by hand in nnU-Net's format with tiny
``3d_fullres_umamba_bot`` / ``2d_umamba_bot`` / ``3d_fullres_segmamba`` configurations inheriting one preprocessed
``3d_fullres`` folder, preprocessed by nnunetv2's ``DefaultPreprocessor`` in this process.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, write_image

SHAPE = (24, 20, 16)  # (x, y, z)
SPACING = (1.0, 1.2, 1.5)
DIRECTION = (-1, 0, 0, 0, -1, 0, 0, 0, 1)  # RAS-stored NIfTI ⇄ LPS: a real-world flip
ORIGIN = (12.5, -30.0, 7.25)
NUM_CASES = 6
DATASET = "Dataset901_Tiny"

_UMAMBA_BOT = {
    "network_class_name": "medmamba.networks.nnunet.UMambaBot",
    "arch_kwargs": {
        "n_stages": 3,
        "features_per_stage": [4, 8, 16],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [1, 1, 1],
        "n_conv_per_stage_decoder": [1, 1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
        "version": "2024.03",
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def _umamba_bot_2d() -> dict:
    block = json.loads(json.dumps(_UMAMBA_BOT))
    kwargs = block["arch_kwargs"]
    kwargs.update(
        conv_op="torch.nn.modules.conv.Conv2d",
        norm_op="torch.nn.modules.instancenorm.InstanceNorm2d",
        kernel_sizes=[[3, 3]] * 3,
        strides=[[1, 1], [2, 2], [2, 2]],
    )
    return block


_SEGMAMBA = {
    "network_class_name": "medmamba.networks.nnunet.SegMamba",
    "arch_kwargs": {
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "n_stages": 2,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "features_per_stage": [4, 8],
        "depths": [1, 1],
        "hidden_size": 16,
    },
    "_kw_requires_import": ["conv_op"],
}


def make_case(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An image (float32) and its label map (uint8: 0 background, 1 and 2 blobs) of ``SHAPE``."""
    grid = np.stack(np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij"), axis=-1).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    for value in (1, 2):
        centre = rng.uniform([6, 5, 4], [s - 6 for s in (24, 20, 16)])
        radius = rng.uniform(3.0, 4.5)
        label[np.linalg.norm((grid - centre) * np.array(SPACING), axis=-1) < radius * 1.2] = value
    image = rng.normal(0.0, 0.3, SHAPE).astype(np.float32) + np.array([0.0, 2.0, -2.0], np.float32)[label]
    return image + 5.0, label  # no zeros: nnU-Net's crop-to-nonzero keeps the whole grid


def geometry() -> Geometry:
    return Geometry(SPACING, ORIGIN, DIRECTION)


def write_raw(root: Path, num_cases: int = NUM_CASES, seed: int = 0) -> Path:
    """An nnU-Net raw dataset ``root/Dataset901_Tiny`` (imagesTr, labelsTr, dataset.json)."""
    raw = root / DATASET
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    rng = np.random.default_rng(seed)
    for i in range(num_cases):
        image, label = make_case(rng)
        write_image(Image(image, geometry()), raw / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")
        write_image(Image(label, geometry()), raw / "labelsTr" / f"tiny_{i:03d}.nii.gz")
    dataset_json = {
        "channel_names": {"0": "MR"},
        "labels": {"background": 0, "blob_a": 1, "blob_b": 2},
        "numTraining": num_cases,
        "file_ending": ".nii.gz",
    }
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    return raw


def plans_for(num_cases: int) -> dict:
    spacing = list(SPACING[::-1])
    shape = list(SHAPE[::-1])
    resampling = {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None}
    base = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [16, 16, 16],
        "median_image_size_in_voxels": shape,
        "spacing": spacing,
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": resampling,
        "resampling_fn_seg_kwargs": {**resampling, "is_seg": True, "order": 1},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {**resampling, "order": 1},
        "architecture": _UMAMBA_BOT,
        "batch_dice": False,
    }
    return {
        "dataset_name": DATASET,
        "plans_name": "medmambaPlans",
        "original_median_spacing_after_transp": spacing,
        "original_median_shape_after_transp": shape,
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {
            "3d_fullres": base,
            "3d_fullres_umamba_bot": {"inherits_from": "3d_fullres", "architecture": _UMAMBA_BOT},
            # same data (the spacing needs no resampling), 2D slices of it
            "2d_umamba_bot": {
                "inherits_from": "3d_fullres",
                "patch_size": [16, 16],
                "spacing": spacing[1:],
                "median_image_size_in_voxels": shape[1:],
                "batch_size": 4,
                "architecture": _umamba_bot_2d(),
            },
            "3d_fullres_segmamba": {"inherits_from": "3d_fullres", "architecture": _SEGMAMBA},
        },
        "experiment_planner_used": "handwritten test plans",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {"max": 9.0, "mean": 5.0, "median": 5.0, "min": 1.0, "percentile_00_5": 2.0, "percentile_99_5": 8.0}
        },
    }


def preprocess(raw: Path, preprocessed_root: Path) -> Path:
    """nnunetv2's DefaultPreprocessor, in-process, case by case; plus the files nnU-Net's trainer copies."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    dataset_json = json.loads((raw / "dataset.json").read_text())
    cases = sorted(p.name[: -len(".nii.gz")] for p in (raw / "labelsTr").iterdir())
    target = preprocessed_root / DATASET
    (target / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    plans = plans_for(len(cases))
    (target / "medmambaPlans.json").write_text(json.dumps(plans, indent=1))
    shutil.copy(raw / "dataset.json", target / "dataset.json")
    (target / "dataset_fingerprint.json").write_text(json.dumps({"spacings": [list(SPACING[::-1])] * len(cases)}))
    shutil.copytree(raw / "labelsTr", target / "gt_segmentations")
    splits = [{"train": cases[:4], "val": cases[4:]}]
    (target / "splits_final.json").write_text(json.dumps(splits))
    manager = PlansManager(plans)
    configuration = manager.get_configuration("3d_fullres")
    preprocessor = DefaultPreprocessor(verbose=False)
    for case in cases:
        preprocessor.run_case_save(
            str(target / "nnUNetPlans_3d_fullres" / case),
            [str(raw / "imagesTr" / f"{case}_0000.nii.gz")],
            str(raw / "labelsTr" / f"{case}.nii.gz"),
            manager,
            configuration,
            dataset_json,
        )
    return target


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"raw", "preprocessed", "preprocessed_root"}`` of the tiny dataset (built once per session; read-only)."""
    root = tmp_path_factory.mktemp("tiny")
    raw = write_raw(root / "raw")
    preprocessed = preprocess(raw, root / "preprocessed")
    return {"raw": raw, "preprocessed": preprocessed, "preprocessed_root": preprocessed.parent}


def train_tiny(
    tiny: dict[str, Path], results: Path, *, network: str = "umamba_bot", configuration: str = "3d_fullres", **kw
) -> Path:
    """Train on the tiny dataset for a few iterations on the CPU (no final validation); returns the fold folder."""
    from medmamba.engines.segmentation.trainer import train

    overrides = {"num_epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, **kw.pop("overrides", {})}
    return train(
        DATASET,
        configuration,
        kw.pop("fold", 0),
        network=network,
        preprocessed=tiny["preprocessed_root"],
        results=results,
        overrides=overrides,
        device="cpu",
        validate=kw.pop("validate", False),
        num_workers=0,
        **kw,
    )


@pytest.fixture(scope="session")
def trained_model(tiny_dataset: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-Mamba_Bot 3D model folder (``MedmambaTrainer__medmambaPlans__3d_fullres_umamba_bot``), fold 0, trained
    for two iterations: enough for inference tests, which check plumbing and geometry, not accuracy."""
    return train_tiny(tiny_dataset, tmp_path_factory.mktemp("results")).parent
