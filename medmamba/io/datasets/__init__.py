"""Dataset formats: nnU-Net raw (native), registration pairs (Learn2Reg-style), video; converters; demo datasets."""

from __future__ import annotations

from medmamba.io.datasets.nnunet_raw import (
    DatasetJson,
    RawCase,
    RawDataset,
    RawDatasetWriter,
    dataset_folder_name,
    find_dataset,
    load_dataset_json,
    open_dataset,
)
from medmamba.io.datasets.registration import (
    RegistrationDataset,
    RegistrationDatasetWriter,
    RegistrationImage,
    RegistrationPair,
    open_registration_dataset,
)
from medmamba.io.datasets.video import VideoCase, VideoDataset, VideoDatasetWriter, open_video_dataset, read_clip

__all__ = [
    "DatasetJson",
    "RawCase",
    "RawDataset",
    "RawDatasetWriter",
    "RegistrationDataset",
    "RegistrationDatasetWriter",
    "RegistrationImage",
    "RegistrationPair",
    "VideoCase",
    "VideoDataset",
    "VideoDatasetWriter",
    "dataset_folder_name",
    "find_dataset",
    "load_dataset_json",
    "open_dataset",
    "open_registration_dataset",
    "open_video_dataset",
    "read_clip",
]
