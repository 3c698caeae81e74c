"""Segment videos with a trained Vivim: every frame from the clip centred on it, masks written per frame.

Inputs (``predict_videos``), each a *case*:

* a frame folder: the video dataset's ``FFFF_CCCC.png`` files (channels as separate files, as in training), or any
  image files (PNG, JPEG, BMP, TIFF) in name order, colour or grey;
* a 2D+t NIfTI ``(X, Y, T)`` (channel files ``CASE_0000.nii.gz``, ``CASE_0001.nii.gz`` … are grouped);
* an MP4/AVI/MOV/MKV file (read with imageio's ffmpeg plugin);
* a folder of any of these (one case per sub-folder or file).

Each frame ``t`` is segmented from the clip of ``clip_length`` frames centred on it (indices clamped at the ends),
as Vivim trains and tests: frames scaled to [0, 1] per video, resized to the model's frame size, normalised (ImageNet
mean/std for three channels, z-score per clip otherwise); the centre frame's logits are resized back to the frame's
own size. One foreground label: ``sigmoid > 0.5``; several: the most probable label above 0.5.

Outputs: a frame folder or video file gives ``OUT/<case>/FFFF.png`` (uint8 label values, the frames' own size); a
NIfTI gives ``OUT/<case>.nii.gz`` ``(X, Y, T)`` with exactly the input's geometry. Each case is written atomically.
"""

from __future__ import annotations

import logging
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medmamba._progress import progress
from medmamba.engines.checkpoint import load_checkpoint, load_weights
from medmamba.engines.training import resolve_device
from medmamba.engines.video.train import clip_indices, normalize_clip, scale_frames
from medmamba.errors import CheckpointError, DatasetError, ImageReadError, Problem
from medmamba.io.atomic import atomic_dir
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, image_ending, read_image, write_image

__all__ = ["VIDEO_ENDINGS", "VideoCaseInput", "find_video_cases", "load_video_model", "predict_videos", "segment_video"]

logger = logging.getLogger(__name__)

VIDEO_ENDINGS = (".mp4", ".avi", ".mov", ".mkv")
_FRAME_ENDINGS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_DATASET_FRAME = re.compile(r"^(\d{4})_(\d{4})\.png$")
_CHANNEL_FILE = re.compile(r"^(.+)_(\d{4})(\.nii\.gz|\.nii)$")


@dataclass(frozen=True, slots=True)
class VideoCaseInput:
    """One video to segment: its id, kind (``"frames"``, ``"nifti"``, ``"video"``) and files."""

    case_id: str
    kind: str
    files: tuple[Path, ...]


def load_video_model(
    model_dir: str | os.PathLike[str], *, checkpoint: str = "checkpoint_final.pth", device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained network (eval mode, on ``device``) and its description (``model.json``'s content).

    Raises:
        CheckpointError: no such checkpoint, not a video model, or weights that do not fit.
    """
    from medmamba.networks import build

    folder = Path(model_dir)
    path = folder / checkpoint
    if not path.is_file() and checkpoint == "checkpoint_final.pth" and (folder / "checkpoint_best.pth").is_file():
        logger.warning("%s: no checkpoint_final.pth yet; using checkpoint_best.pth", folder)
        path = folder / "checkpoint_best.pth"
    state = load_checkpoint(path, map_location="cpu")
    model = state.get("model")
    if not isinstance(model, dict) or model.get("task") != "video":
        raise CheckpointError(
            f"{path}: not a video model (network {state['network']!r}). Use a folder written by `medmamba train "
            "--network vivim` (it holds model.json)"
        )
    net = build(
        state["network"],
        spatial_dims=2,
        in_channels=model["in_channels"],
        out_channels=model["out_channels"],
        **model["network_kwargs"],
    )
    load_weights(net, state["network_weights"], path)
    return net.to(resolve_device(device)).eval(), model


def predict_videos(
    inputs: str | os.PathLike[str],
    output: str | os.PathLike[str],
    model_dir: str | os.PathLike[str],
    *,
    checkpoint: str = "checkpoint_final.pth",
    device: str | torch.device = "auto",
    batch_size: int = 4,
) -> list[Path]:
    """Segment every video case of ``inputs``; returns the mask folders / files written.

    Raises:
        CheckpointError: an unusable model folder.
        DatasetError: no video case found in ``inputs``.
        ImageReadError: an unreadable frame or video, or frames of different sizes.
    """
    device = resolve_device(device)
    network, model = load_video_model(model_dir, checkpoint=checkpoint, device=device)
    cases = find_video_cases(inputs)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for case in progress(cases, desc="predict", total=len(cases)):
        frames, geometry = _read_case(case, model["in_channels"])
        labels = segment_video(network, model, frames, device=device, batch_size=batch_size)
        if geometry is not None:  # a 2D+t NIfTI: one volume in the input's geometry
            target = output / f"{case.case_id}.nii.gz"
            write_image(Image(np.moveaxis(labels, 0, -1), geometry), target, dtype=np.uint8)
        else:
            target = output / case.case_id
            plane = Geometry((1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
            with atomic_dir(target, overwrite=True) as tmp:
                for t, mask in enumerate(labels):
                    write_image(Image(mask, plane), tmp / f"{t:04d}.png", dtype=np.uint8)
        written.append(target)
        logger.info("segmented %s (%d frames)", case.case_id, len(labels))
    return written


@torch.no_grad()
def segment_video(
    network: torch.nn.Module,
    model: dict[str, Any],
    frames: np.ndarray,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 4,
) -> np.ndarray:
    """Label maps ``(T, X, Y)`` (uint8 label values) of a video ``frames (T, C, X, Y)`` (any intensity range).

    Args:
        network: a trained video network (eval mode).
        model: its description (``model.json``): clip length, frame size, normalisation, label values.
        frames: the video, frames in file index order ``(x, y)``.
        device: where to run the network.
        batch_size: clips per forward pass.
    """
    device = torch.device(device)
    num_frames, size = len(frames), tuple(frames.shape[2:])
    clip_length = int(model["clip_length"])
    video = torch.from_numpy(scale_frames(frames)).to(device)
    video = F.interpolate(video, size=tuple(model["frame_size"]), mode="bilinear", align_corners=False)
    values = [v for v in model["label_values"] if v != 0] or [1]
    out = np.zeros((num_frames, *size), np.uint8)
    for start in range(0, num_frames, batch_size):
        centres = range(start, min(start + batch_size, num_frames))
        clips = torch.stack([video[clip_indices(t, num_frames, clip_length)] for t in centres])  # (B, T, C, H, W)
        logits = network(normalize_clip(clips, model["normalization"]))
        if isinstance(logits, tuple):
            logits = logits[0]
        centre = logits.unflatten(0, (len(centres), clip_length))[:, clip_length // 2].float()  # (B, K, h, w)
        prob = torch.sigmoid(F.interpolate(centre, size=size, mode="bilinear", align_corners=False))
        best, index = prob.max(dim=1)
        lut = torch.tensor(values, dtype=torch.uint8, device=prob.device)
        labels = torch.where(best > 0.5, lut[index], torch.zeros_like(index, dtype=torch.uint8))
        out[start : start + len(centres)] = labels.cpu().numpy()
    return out


def find_video_cases(inputs: str | os.PathLike[str]) -> list[VideoCaseInput]:
    """The video cases of ``inputs`` (see the module docstring), sorted by id.

    Raises:
        DatasetError: nothing that looks like a video.
    """
    path = Path(inputs)
    if path.is_file():
        case = _file_case(path, [path])
        if case is None:
            raise DatasetError([Problem(str(path), "is not a video (NIfTI 2D+t, MP4/AVI) file", _FIX)])
        return [case]
    if not path.is_dir():
        raise DatasetError(
            [Problem(str(path), "does not exist", "Give a frame folder, a video file or a folder of them")]
        )
    if _frame_files(path):
        return [VideoCaseInput(path.name, "frames", tuple(_frame_files(path)))]
    cases = []
    siblings = sorted(p for p in path.iterdir() if p.is_file())
    seen: set[str] = set()
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue
        case = VideoCaseInput(entry.name, "frames", tuple(_frame_files(entry))) if entry.is_dir() else None
        if entry.is_file():
            case = _file_case(entry, siblings)
        if case is not None and case.case_id not in seen and (case.kind != "frames" or case.files):
            seen.add(case.case_id)
            cases.append(case)
    if not cases:
        raise DatasetError([Problem(str(path), "holds no video case", _FIX)])
    return cases


_FIX = "Give a frame folder (FFFF_0000.png or image files), a 2D+t NIfTI, an MP4/AVI file, or a folder of them"


def _frame_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in _FRAME_ENDINGS)


def _file_case(path: Path, siblings: Sequence[Path]) -> VideoCaseInput | None:
    name = path.name
    if name.lower().endswith(VIDEO_ENDINGS):
        return VideoCaseInput(path.stem, "video", (path,))
    if image_ending(path) in (".nii.gz", ".nii"):
        match = _CHANNEL_FILE.match(name)
        if match is None:
            return VideoCaseInput(name[: -len(image_ending(path) or "")], "nifti", (path,))
        case = match.group(1)
        files = sorted(p for p in siblings if (m := _CHANNEL_FILE.match(p.name)) and m.group(1) == case)
        return VideoCaseInput(case, "nifti", tuple(files))
    return None


def _read_case(case: VideoCaseInput, channels: int) -> tuple[np.ndarray, Geometry | None]:
    """Frames ``(T, C, X, Y)`` with ``C = channels`` and, for NIfTI, the volume's geometry."""
    if case.kind == "nifti":
        images = [read_image(f) for f in case.files]
        if len(images) != channels:
            raise ImageReadError(
                f"{case.files[0]}: {len(images)} channel file(s) for a model of {channels} channel(s). Give "
                f"{case.case_id}_0000 … _{channels - 1:04d}"
            )
        if any(im.shape != images[0].shape or im.geometry.ndim != 3 for im in images):
            raise ImageReadError(f"{case.files[0]}: channel volumes of one case must share a 2D+t (X, Y, T) grid")
        return np.moveaxis(np.stack([im.array for im in images]), -1, 0), images[0].geometry
    if case.kind == "video":
        frames = _read_video_file(case.files[0])
    elif all(_DATASET_FRAME.match(f.name) for f in case.files):
        by_frame: dict[int, list[Path]] = {}
        for f in case.files:
            by_frame.setdefault(int(f.name[:4]), []).append(f)
        frames = [np.stack([_plane(read_image(f).array) for f in sorted(by_frame[t])], -1) for t in sorted(by_frame)]
    else:
        frames = [_read_picture(f) for f in case.files]
    shapes = {f.shape[:2] for f in frames}
    if len(shapes) != 1:
        raise ImageReadError(f"{case.files[0].parent}: frames of different sizes {sorted(shapes)}. Export them alike")
    stack = np.stack([_channels(f, channels, case.files[0]) for f in frames])  # (T, X, Y, C)
    return np.moveaxis(stack, -1, 1), None


def _plane(array: np.ndarray) -> np.ndarray:
    return array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array


def _read_picture(path: Path) -> np.ndarray:
    """An image file as ``(X, Y[, C])``: imageio reads rows first, so transpose to medmamba's ``(x, y)``."""
    import imageio.v3 as iio

    try:
        array = np.asarray(iio.imread(path))
    except Exception as err:  # imageio raises many types for a damaged file
        raise ImageReadError(f"{path}: cannot be read as an image ({type(err).__name__}). Export it again") from None
    return np.swapaxes(array, 0, 1)


def _read_video_file(path: Path) -> list[np.ndarray]:
    """Frames ``(X, Y, 3)`` of an MP4/AVI file through imageio's ffmpeg plugin."""
    try:
        import imageio.v2 as imageio

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = imageio.get_reader(path, "ffmpeg")
            frames = [np.swapaxes(np.asarray(frame), 0, 1) for frame in reader.iter_data()]
            reader.close()
    except ImportError:
        raise ImageReadError(
            f"{path}: reading video files needs imageio-ffmpeg. Run `pip install imageio-ffmpeg`"
        ) from None
    except Exception as err:
        raise ImageReadError(f"{path}: cannot be read as a video ({type(err).__name__}: {str(err)[:120]})") from None
    if not frames:
        raise ImageReadError(f"{path}: holds no frame")
    return frames


def _channels(frame: np.ndarray, channels: int, where: Path) -> np.ndarray:
    """``(X, Y)`` or ``(X, Y, C)`` → ``(X, Y, channels)``: grey ⇄ RGB as the model needs, alpha dropped."""
    frame = frame[..., None] if frame.ndim == 2 else frame
    if frame.shape[-1] == 4:
        frame = frame[..., :3]
    if frame.shape[-1] == channels:
        return frame.astype(np.float32)
    if channels == 1:
        return frame.astype(np.float32).mean(-1, keepdims=True)
    if frame.shape[-1] == 1:
        return np.repeat(frame.astype(np.float32), channels, axis=-1)
    raise ImageReadError(f"{where}: frames have {frame.shape[-1]} channels, the model takes {channels}")
