"""A small realistic video dataset: frames are slices of real MRI (the MNI template), structures move between them.

Each case is one draw of the MNI demo transform (smooth deformation, bias field, Rician noise; real anatomy,
synthetic variation) on a 56×64×N grid at 3 mm; its frames are consecutive axial slices, so the white matter (the
structure to segment) moves and changes shape from frame to frame as in a sweep. Frames are 8-bit PNGs, masks the
white-matter label of the same draw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

#: a Vivim small enough for the CPU (the paper's is MiT-B3 with 2 ST-Mamba layers per stage)
TINY = {
    "features_per_stage": [16, 32, 48, 64],
    "mit_depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
    "depths": [1, 1, 1, 1],
    "decoder_size": 32,
}


def write_mri_video_dataset(root: Path, *, num_cases: int, frames: int, seed: int, dataset_id: int = 993) -> Path:
    """``DatasetXXX_MRISweep`` (frames layout): ``num_cases`` labelled clips of ``frames`` axial slices."""
    from medmamba.io.datasets.demo import sample_case_params, synthesize_case
    from medmamba.io.datasets.video import VideoDatasetWriter

    rng = np.random.default_rng(seed)
    with VideoDatasetWriter(
        root,
        dataset_id,
        "MRISweep",
        channel_names=["T1"],
        labels={"background": 0, "white_matter": 1},
        frame_interval_ms=40,
    ) as writer:
        for i in range(num_cases):
            image, label = synthesize_case(sample_case_params(rng, spacing=(3.0, 3.0, 3.0)), shape=(56, 64, 30))
            first = int(rng.integers(8, 30 - frames - 4))
            volume = image.array[..., first : first + frames]
            scaled = np.clip(volume / np.percentile(image.array, 99.5) * 255, 0, 255).astype(np.uint8)
            masks = (label.array[..., first : first + frames] == 2).astype(np.uint8)
            writer.add_clip(f"sweep_{i:03d}", np.moveaxis(scaled, -1, 0)[:, None], np.moveaxis(masks, -1, 0))
    return writer.path


@pytest.fixture(scope="session")
def mri_videos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``{"train": dataset of 6 clips, "test": dataset of 2 other clips}``, 10 frames each."""
    root = tmp_path_factory.mktemp("videos")
    return {
        "train": write_mri_video_dataset(root / "train", num_cases=6, frames=10, seed=0),
        "test": write_mri_video_dataset(root / "test", num_cases=2, frames=10, seed=1),
    }


@pytest.fixture(scope="session")
def video_model(mri_videos: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Vivim trained by the engine for one epoch on 64×64 frames (its run folder)."""
    from medmamba.engines.video.train import train

    return train(
        mri_videos["train"],
        tmp_path_factory.mktemp("video-results"),
        network_kwargs=TINY,
        frame_size=(64, 64),
        overrides={"num_epochs": 1, "batch_size": 4, "initial_lr": 1e-3},
        device="cpu",
    )
