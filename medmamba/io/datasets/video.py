"""Video dataset format (Vivim and other clip models): frame folders or 2D+t volumes, masks per frame.

Two layouts, named in dataset.json's ``"layout"``; everything else mirrors nnU-Net's raw format so the same
habits (``_0000`` channel suffixes, ``labels`` with ``background: 0``, ``file_ending``) carry over::

    DatasetXXX_Name/
      dataset.json
        "format": "medmamba-video", "layout": "frames" | "volume",
        "channel_names": {"0": "US"}, "labels": {"background": 0, "polyp": 1},
        "file_ending": ".png" (frames) or ".nii.gz" (volume), "numTraining": N,
        optional "frame_interval_ms": 40
      layout "frames":
        videosTr/CASE/FFFF_0000.png   frame FFFF (four digits, from 0000, no gaps), channel 0000
        masksTr/CASE/FFFF.png         that frame's mask: every frame has one
        videosTs/CASE/FFFF_0000.png
      layout "volume":
        videosTr/CASE_0000.nii.gz     one 2D+t volume (X, Y, T) per channel: the third axis is time
        masksTr/CASE.nii.gz           (X, Y, T): the mask of each frame
        videosTs/CASE_0000.nii.gz

``read_clip`` returns ``frames (T, C, X, Y)`` and ``masks (T, X, Y)`` either way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import numpy as np

from medmamba.errors import DatasetError, Problem
from medmamba.io.atomic import atomic_dir, write_json
from medmamba.io.datasets.nnunet_raw import _parse_labels, dataset_folder_name
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, read_image, write_image

__all__ = [
    "VIDEO_FORMAT",
    "VideoCase",
    "VideoDataset",
    "VideoDatasetWriter",
    "check_video_dataset",
    "is_video_json",
    "open_video_dataset",
    "read_clip",
]

VIDEO_FORMAT = "medmamba-video"
_FRAME = re.compile(r"^(\d{4})_(\d{4})(\..+)$")


@dataclass(frozen=True, slots=True)
class VideoCase:
    """One clip: per frame, its channel files (frames layout) or per channel one volume (volume layout)."""

    case_id: str
    frames: tuple[tuple[Path, ...], ...]
    masks: tuple[Path, ...]
    volumes: tuple[Path, ...] = ()
    mask_volume: Path | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class VideoDataset:
    """A video dataset on disk."""

    root: Path
    layout: Literal["frames", "volume"]
    channel_names: dict[str, str]
    labels: dict[str, int | tuple[int, ...]]
    file_ending: str
    training: tuple[VideoCase, ...]
    test: tuple[VideoCase, ...]
    raw: dict[str, Any]

    @property
    def label_values(self) -> tuple[int, ...]:
        """Declared label values, sorted."""
        return tuple(sorted({x for v in self.labels.values() for x in (v if isinstance(v, tuple) else (v,))}))


def is_video_json(data: Mapping[str, Any]) -> bool:
    """True when a dataset.json describes a video dataset."""
    return data.get("format") == VIDEO_FORMAT


def open_video_dataset(root: str | os.PathLike[str]) -> VideoDataset:
    """Read a video dataset's dataset.json and list its clips.

    Raises:
        DatasetError: dataset.json missing or malformed.
    """
    dataset, problems = _parse(Path(root))
    if dataset is None or problems:
        raise DatasetError(problems, header=f"{root}: not a valid video dataset")
    return dataset


def _parse(root: Path) -> tuple[VideoDataset | None, list[Problem]]:
    path = root / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, [Problem(str(path), "missing", "Create it (see medmamba.io.datasets.video)")]
    except (OSError, ValueError) as err:
        return None, [Problem(str(path), f"cannot be read as JSON ({err})", "Fix the syntax")]
    problems: list[Problem] = []
    layout = data.get("layout")
    if layout not in ("frames", "volume"):
        problems.append(Problem(str(path), f"layout {layout!r} is not 'frames' or 'volume'", 'Set "layout"'))
    problems += [
        Problem(str(path), f"required key {key} missing", "Add it (as in nnU-Net's dataset.json)")
        for key in ("channel_names", "labels", "file_ending", "numTraining")
        if key not in data
    ]
    labels = _parse_labels(data.get("labels"), data, str(path), problems)
    if problems or labels is None:
        return None, problems
    ending = str(data["file_ending"])
    if layout == "frames":
        training = _frame_cases(root / "videosTr", root / "masksTr", ending)
        test = _frame_cases(root / "videosTs", None, ending)
    else:
        training = _volume_cases(root / "videosTr", root / "masksTr", ending)
        test = _volume_cases(root / "videosTs", None, ending)
    if data["numTraining"] != len(training):
        problems.append(
            Problem(
                str(path),
                f"numTraining is {data['numTraining']} but {len(training)} clip(s) were found",
                "Make them match",
            )
        )
    dataset = VideoDataset(
        root=root,
        layout=layout,
        channel_names={str(k): str(v) for k, v in data["channel_names"].items()},
        labels=labels,
        file_ending=ending,
        training=tuple(training),
        test=tuple(test),
        raw=data,
    )
    return dataset, problems


def _frame_cases(videos: Path, masks: Path | None, ending: str) -> list[VideoCase]:
    if not videos.is_dir():
        return []
    cases = []
    for folder in sorted(p for p in videos.iterdir() if p.is_dir() and not p.name.startswith(".")):
        by_frame: dict[int, list[Path]] = {}
        for file in sorted(folder.iterdir()):
            match = _FRAME.match(file.name)
            if match and match.group(3) == ending:
                by_frame.setdefault(int(match.group(1)), []).append(file)
        frames = tuple(tuple(by_frame[i]) for i in sorted(by_frame))
        mask_dir = masks / folder.name if masks is not None else None
        mask_files = tuple(mask_dir / f"{i:04d}{ending}" for i in sorted(by_frame)) if mask_dir is not None else ()
        cases.append(VideoCase(folder.name, frames, mask_files))
    return cases


def _volume_cases(videos: Path, masks: Path | None, ending: str) -> list[VideoCase]:
    if not videos.is_dir():
        return []
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    grouped: dict[str, list[Path]] = {}
    for file in sorted(videos.iterdir()):
        match = pattern.match(file.name)
        if match:
            grouped.setdefault(match.group(1), []).append(file)
    return [
        VideoCase(case, (), (), tuple(files), masks / f"{case}{ending}" if masks is not None else None)
        for case, files in grouped.items()
    ]


def read_clip(dataset: VideoDataset, case: VideoCase) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a clip: ``frames (T, C, X, Y)`` float32 and ``masks (T, X, Y)`` uint8 (None when unlabelled)."""
    if dataset.layout == "frames":
        frames = np.stack([np.stack([_plane(read_image(f)) for f in channels]) for channels in case.frames])
        masks = np.stack([_plane(read_image(m)) for m in case.masks]).astype(np.uint8) if case.masks else None
        return frames.astype(np.float32), masks
    volumes = np.stack([read_image(v).array for v in case.volumes])  # (C, X, Y, T)
    frames = np.moveaxis(volumes, -1, 0).astype(np.float32)
    masks = None
    if case.mask_volume is not None and case.mask_volume.is_file():
        masks = np.moveaxis(read_image(case.mask_volume).array, -1, 0).astype(np.uint8)
    return frames, masks


def _plane(image: Image) -> np.ndarray:
    array = image.array
    return array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array


def check_video_dataset(
    root: str | os.PathLike[str], *, allow_empty_foreground: bool = False, num_workers: int = 1
) -> Any:
    """Check a video dataset: frames, channels and masks present, readable and consistent.

    Frames must be numbered without gaps, every frame needs every channel and a mask on its grid holding declared
    values; clips whose masks are all background are reported.
    """
    from medmamba.io.verify import (
        CaseFindings,
        VerifyReport,
        check_image_file,
        check_label_file,
        compare_geometry,
        run_cases,
    )

    root = Path(root)
    dataset, problems = _parse(root)
    if dataset is None:
        return VerifyReport(root=root, kind="video", num_cases=0, problems=tuple(problems))
    channels = len(dataset.channel_names)
    values = dataset.label_values

    def one(job: tuple[VideoCase, bool]) -> CaseFindings:
        case, labelled = job
        found = CaseFindings()
        if dataset.layout == "volume":
            pairs = [(v, case.mask_volume if labelled else None) for v in case.volumes[:1]]
            if len(case.volumes) != channels:
                found.problems.append(
                    Problem(
                        str(root / "videosTr" / case.case_id),
                        f"{len(case.volumes)} channel volume(s), {channels} declared",
                        "Add the missing channel files",
                    )
                )
        else:
            if not case.frames:
                found.problems.append(
                    Problem(
                        str(root / "videosTr" / case.case_id),
                        "has no frames",
                        "Add FFFF_0000 frames or remove the folder",
                    )
                )
            for index, files in enumerate(case.frames):
                if len(files) != channels:
                    found.problems.append(
                        Problem(
                            str(files[0].parent / f"{index:04d}_*"),
                            f"frame {index} has {len(files)} channel file(s), {channels} declared",
                            "Add the missing channel files",
                        )
                    )
            numbers = sorted(int(f[0].name[:4]) for f in case.frames)
            if numbers and numbers != list(range(len(numbers))):
                found.problems.append(
                    Problem(
                        str(root / "videosTr" / case.case_id),
                        f"frame numbers {numbers[:8]}… are not 0000, 0001, … without gaps",
                        "Renumber the frames",
                    )
                )
            pairs = [
                (files[0], case.masks[i] if labelled and case.masks else None) for i, files in enumerate(case.frames)
            ]
        foreground = False
        for frame, mask in pairs:
            image = check_image_file(frame, found.problems)
            if not labelled:
                continue
            if mask is None or not mask.is_file():
                found.problems.append(
                    Problem(str(mask or frame), f"mask of {frame.name} missing", "Every frame needs a mask")
                )
                continue
            mask_problems: list[Problem] = []
            label = check_label_file(mask, values, mask_problems, [], allow_empty_foreground=True)
            found.problems.extend(mask_problems)
            if label is not None:
                foreground = foreground or bool(np.any(label.array))
                if image is not None:
                    compare_geometry((frame, image), (mask, label), found.problems, what="frame and mask")
        if labelled and pairs and not foreground:
            where = Problem(
                str(root / "masksTr" / case.case_id),
                "every mask of the clip is background only",
                "Check the masks" + ("" if allow_empty_foreground else "; if intended, pass --allow-empty-labels"),
            )
            (found.warnings if allow_empty_foreground else found.problems).append(where)
        return found

    jobs = [(c, True) for c in dataset.training] + [(c, False) for c in dataset.test]
    warnings: list[Problem] = []
    for found in run_cases(one, jobs, num_workers=num_workers, desc="verify"):
        problems += found.problems
        warnings += found.warnings
    return VerifyReport(
        root=root,
        kind="video",
        num_cases=len(dataset.training),
        num_test=len(dataset.test),
        problems=tuple(problems),
        warnings=tuple(warnings),
    )


class VideoDatasetWriter:
    """Write a video dataset atomically.

    Args:
        raw_root: folder that receives ``DatasetXXX_Name``.
        dataset_id: 1…999.
        name: one word.
        channel_names: e.g. ``["US"]``.
        labels: name → value, ``background: 0``.
        layout: ``"frames"`` (PNG per frame; uint8/uint16 intensities) or ``"volume"`` (one NIfTI (X, Y, T)).
        overwrite: replace an existing folder.
        **metadata: extra dataset.json keys (``frame_interval_ms``, description, …).
    """

    def __init__(
        self,
        raw_root: str | os.PathLike[str],
        dataset_id: int,
        name: str,
        *,
        channel_names: Sequence[str],
        labels: Mapping[str, int],
        layout: Literal["frames", "volume"] = "frames",
        overwrite: bool = False,
        **metadata: Any,
    ) -> None:
        if layout not in ("frames", "volume"):
            raise ValueError(f"layout must be 'frames' or 'volume', got {layout!r}")
        self.path = Path(raw_root) / dataset_folder_name(dataset_id, name)
        self.name, self.layout, self.overwrite, self.metadata = name, layout, overwrite, metadata
        self.channel_names = {str(i): c for i, c in enumerate(channel_names)}
        self.labels = dict(labels)
        self.file_ending = ".png" if layout == "frames" else ".nii.gz"
        self.num_training = 0
        self._tmp: Path | None = None
        self._context: Any = None

    def __enter__(self) -> VideoDatasetWriter:
        if self.path.exists() and not self.overwrite:
            raise DatasetError(
                [Problem(str(self.path), "already exists", "Choose another id/name, remove it, or pass overwrite")],
                header="not writing the dataset",
            )
        self._context = atomic_dir(self.path, overwrite=self.overwrite)
        self._tmp = self._context.__enter__()
        for sub in ("videosTr", "masksTr", "videosTs"):
            (self._tmp / sub).mkdir()
        return self

    def add_clip(
        self,
        case_id: str,
        frames: np.ndarray,
        masks: np.ndarray | None = None,
        *,
        spacing: tuple[float, float] = (1.0, 1.0),
        test: bool = False,
    ) -> None:
        """Write a clip: ``frames (T, C, X, Y)`` and per-frame ``masks (T, X, Y)`` (required unless ``test``)."""
        if self._tmp is None:
            raise RuntimeError("use VideoDatasetWriter as a context manager")
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[1] != len(self.channel_names):
            raise ValueError(f"frames must be (T, {len(self.channel_names)}, X, Y), got {frames.shape}")
        if not test and (masks is None or np.asarray(masks).shape != (frames.shape[0], *frames.shape[2:])):
            raise ValueError(
                f"training clip {case_id} needs masks of shape (T, X, Y) = {(frames.shape[0], *frames.shape[2:])}"
            )
        videos = self._tmp / ("videosTs" if test else "videosTr")
        if self.layout == "frames":
            geometry = Geometry(spacing, (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
            (videos / case_id).mkdir()
            for t, frame in enumerate(frames):
                for c, plane in enumerate(frame):
                    write_image(Image(plane, geometry), videos / case_id / f"{t:04d}_{c:04d}.png")
            if not test:
                (self._tmp / "masksTr" / case_id).mkdir()
                for t, mask in enumerate(np.asarray(masks)):
                    write_image(Image(mask, geometry), self._tmp / "masksTr" / case_id / f"{t:04d}.png", dtype=np.uint8)
        else:
            interval = float(self.metadata.get("frame_interval_ms", 1.0))
            geometry = Geometry((*spacing, interval), (0.0, 0.0, 0.0), np.eye(3).ravel())
            for c in range(frames.shape[1]):
                write_image(Image(np.moveaxis(frames[:, c], 0, -1), geometry), videos / f"{case_id}_{c:04d}.nii.gz")
            if not test:
                write_image(
                    Image(np.moveaxis(np.asarray(masks), 0, -1), geometry),
                    self._tmp / "masksTr" / f"{case_id}.nii.gz",
                    dtype=np.uint8,
                )
        if not test:
            self.num_training += 1

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if exc_type is None and self._tmp is not None:
            data = {
                "format": VIDEO_FORMAT,
                "layout": self.layout,
                "name": self.name,
                "channel_names": self.channel_names,
                "labels": self.labels,
                "file_ending": self.file_ending,
                "numTraining": self.num_training,
                **self.metadata,
            }
            write_json(self._tmp / "dataset.json", data)
        self._context.__exit__(exc_type, exc, traceback)
        self._tmp = None
