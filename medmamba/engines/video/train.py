"""Vivim training on a video dataset (``medmamba.io.datasets.video``): clips of T frames centred on a target frame.

Vivim's recipe (Yang, Xing, Zhu, arXiv:2401.14168; ``networks.md`` §5.6): every frame of every training video is a
sample; its clip is the T = 5 frames centred on it (indices clamped at the video's ends), resized to 256 × 256; the
loss is PraNet's *structure loss* on the centre frame only — weighted BCE + weighted IoU with the weight map
``1 + 5 · |avgpool31(mask) − mask|`` — with Adam 1e-4, cosine annealing to 1e-6 over 200 epochs, batch 8, fp32,
seed 1234. Augmentation draws once per clip: horizontal and vertical flips and a 180° rotation (p 0.5 each),
brightness and contrast factors in [0.5, 1.5].

Deliberate differences: several foreground labels are trained one-vs-rest (one sigmoid channel each, the structure
loss per channel; prediction takes the most probable channel above 0.5); frames of one channel are normalised per
clip (z-score) and three-channel frames with ImageNet's mean and std, as upstream; upstream's salt-and-pepper noise
on the training masks (a quirk, ``networks.md`` §5.6) and its colour/sharpness enhancement are not reproduced.

The epoch loop, checkpoints, resume and curves are :class:`medmamba.engines.training.EpochLoop`'s. The run folder
holds ``checkpoint_{latest,best,final}.pth`` (best by validation Dice of the centre frames), ``model.json`` (what
``medmamba predict`` needs: network, arguments, clip length, frame size, normalisation, labels), ``recipe.json``,
``train.log`` and ``progress.png``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medmamba import __version__
from medmamba.engines.checkpoint import load_checkpoint
from medmamba.engines.recipes import TrainRecipe, merge_overrides, recipe_for
from medmamba.engines.training import (
    DistributedEnv,
    EpochLoop,
    amp_policy,
    check_resume_recipe,
    init_distributed,
    make_lr_schedule,
    make_optimizer,
    prepare_run_folder,
    resolve_device,
    run_log,
    seed_everything,
)
from medmamba.errors import DatasetError, Problem, UsageError
from medmamba.io.atomic import write_json
from medmamba.io.datasets.video import VideoDataset, open_video_dataset, read_clip

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_FILE",
    "clip_indices",
    "normalize_clip",
    "scale_frames",
    "structure_loss",
    "train",
]

logger = logging.getLogger(__name__)

MODEL_FILE = "model.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train(
    dataset: str | os.PathLike[str],
    results: str | os.PathLike[str],
    *,
    network: str = "vivim",
    overrides: Mapping[str, Any] | None = None,
    network_kwargs: Mapping[str, Any] | None = None,
    output: str | os.PathLike[str] | None = None,
    clip_length: int | None = None,
    frame_size: Sequence[int] | None = None,
    val_cases: Sequence[str] | None = None,
    device: str | torch.device = "auto",
    resume: bool = False,
    overwrite: bool = False,
    num_workers: int | None = None,
) -> Path:
    """Train a video segmentation network on a video dataset; returns the run folder.

    Args:
        dataset: the dataset folder (``dataset.json`` with ``"format": "medmamba-video"``).
        results: results root; the run goes to ``results/<dataset folder name>/<network>/``.
        network: ``vivim``.
        overrides: recipe fields to change (None values ignored).
        network_kwargs: constructor arguments besides dims and channels (default: Vivim's MiT-B3 network).
        output: the run folder itself, instead of the one under ``results``.
        clip_length: frames per clip (5).
        frame_size: ``(H, W)`` the frames are resized to (256, 256); each side ≥ 32.
        val_cases: training cases held out for validation; default: the last 20 % of the sorted case ids (none
            when there is a single case).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume: continue from the run's last checkpoint (its recipe, arguments, clip length and frame size).
        overwrite: start afresh in a folder that holds checkpoints.
        num_workers: unused (clips are held in memory); accepted for the CLI's common option.

    Raises:
        DatasetError: no labelled training clip, or a mask missing.
        UsageError: invalid overrides or sizes; a folder with checkpoints and neither resume nor overwrite.
        CheckpointError: the checkpoint to resume from is unusable.
    """
    from medmamba.networks import build, spec

    del num_workers
    if spec(network).task != "video":
        raise UsageError(f"--network {network}: not a video network (it is a {spec(network).task} network)")
    dist_env = DistributedEnv.from_env()
    device = resolve_device(device)
    if dist_env.active:
        device = init_distributed(dist_env, device)
    try:
        recipe = merge_overrides(recipe_for(network), overrides or {})
    except ValueError as err:
        raise UsageError(str(err)) from None
    data = open_video_dataset(dataset)
    folder = Path(output) if output is not None else Path(results) / data.root.name / network
    folder.mkdir(parents=True, exist_ok=True)
    with run_log(folder) if dist_env.rank == 0 else contextlib.nullcontext():
        found = prepare_run_folder(folder, resume=resume, overwrite=overwrite)
        checkpoint = load_checkpoint(found, map_location=device, network=network) if found is not None else None
        kwargs = dict(network_kwargs or {})
        if checkpoint is not None:
            check_resume_recipe(checkpoint["recipe"], recipe.to_dict(), found or folder)
            recipe = TrainRecipe.from_dict(checkpoint["recipe"])
            saved = checkpoint["model"]
            kwargs, clip_length, frame_size = dict(saved["network_kwargs"]), saved["clip_length"], saved["frame_size"]
            val_cases = saved["val_cases"]
        if recipe.loss != "structure":
            raise UsageError(f"loss {recipe.loss!r} is not a video loss; Vivim trains with 'structure'")
        clip_length = int(clip_length or 5)
        size = tuple(int(s) for s in (frame_size or (256, 256)))
        if clip_length < 1 or len(size) != 2 or min(size) < 32:
            raise UsageError(f"need clip_length ≥ 1 and a frame size (H, W) ≥ 32, got {clip_length}, {size}")
        clips = _load_clips(data, size)
        ids = sorted(clips)
        if val_cases is None:
            val_cases = ids[len(ids) - math.ceil(0.2 * len(ids)) :] if len(ids) > 1 else []
        unknown = sorted(set(val_cases) - set(ids))
        if unknown:
            raise UsageError(f"val_cases {unknown} are not training cases of {data.root} (have {ids[:10]})")
        train_ids = [i for i in ids if i not in set(val_cases)]
        values = data.label_values
        channels = len(data.channel_names)
        model: dict[str, Any] = {
            "task": "video",
            "network": network,
            "network_kwargs": kwargs,
            "in_channels": channels,
            "out_channels": max(1, len(values) - 1),
            "label_values": list(values),
            "labels": {str(k): v for k, v in data.labels.items()},
            "clip_length": clip_length,
            "frame_size": list(size),
            "normalization": "imagenet" if channels == 3 else "zscore",
            "val_cases": list(val_cases),
            "dataset": str(data.root),
        }
        if recipe.seed is not None:
            seed_everything(recipe.seed + dist_env.rank)
        net = build(network, spatial_dims=2, in_channels=channels, out_channels=model["out_channels"], **kwargs)
        net = net.to(device)
        source = ClipSource(clips, values, clip_length, model["normalization"], device)
        batch_size = recipe.batch_size or 8
        frames = sum(len(clips[i][0]) for i in train_ids)
        iterations = recipe.iterations_per_epoch or max(1, math.ceil(frames / (batch_size * dist_env.world_size)))
        optimizer = make_optimizer(
            recipe.optimizer, net.parameters(), lr=recipe.initial_lr, weight_decay=recipe.weight_decay
        )
        schedule = make_lr_schedule(
            recipe.lr_schedule,
            optimizer,
            initial_lr=recipe.initial_lr,
            num_epochs=recipe.num_epochs,
            iterations_per_epoch=iterations,
            per_iteration=recipe.lr_step == "iteration",
            exponent=recipe.poly_exponent,
            min_lr=recipe.min_lr,
        )
        samples = [(case, t) for case in train_ids for t in range(len(clips[case][0]))]
        seed = recipe.seed or 0  # one permutation on every rank: the ranks take disjoint shares of it
        val_samples = _spread(
            [(c, t) for c in val_cases for t in range(len(clips[c][0]))], recipe.val_iterations_per_epoch * batch_size
        )
        loop = EpochLoop(
            network=net,
            compute_loss=_loss_fn(clip_length),
            batches=source.batches(samples, batch_size, seed=seed, rank=dist_env.rank, world=dist_env.world_size),
            validate=_validator(source, val_samples, batch_size, clip_length) if val_samples else None,
            optimizer=optimizer,
            schedule=schedule,
            per_iteration=recipe.lr_step == "iteration",
            num_epochs=recipe.num_epochs,
            iterations_per_epoch=iterations,
            amp=amp_policy(device, recipe.amp_dtype),
            device=device,
            folder=folder,
            static={
                "network": network,
                "in_channels": channels,
                "out_channels": model["out_channels"],
                "recipe": recipe.to_dict(),
                "model": model,
                "medmamba_version": __version__,
            },
            select=("val_dice", "max"),
            dist_env=dist_env,
            title=f"{network} · {data.root.name}",
        )
        state = loop.restore(checkpoint, found or folder) if checkpoint is not None else None
        if dist_env.rank == 0:
            write_json(folder / MODEL_FILE, model)
            write_json(folder / "recipe.json", recipe.to_dict())
        logger.info(
            "training %s on %s: %d training clips (%d frames), %d validation clips, clips of %d frames at %s, "
            "%d epochs × %d iterations, batch %d, %s",
            network,
            data.root.name,
            len(train_ids),
            frames,
            len(val_cases),
            clip_length,
            "×".join(map(str, size)),
            recipe.num_epochs,
            iterations,
            batch_size,
            loop.amp.name,
        )
        if state is not None:
            logger.info("resuming %s from %s at epoch %d", folder, (found or folder).name, state.epoch)
        loop.run(state)
    if dist_env.active:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return folder


def structure_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PraNet's structure loss (Vivim's): weighted BCE + weighted IoU, weights ``1 + 5 · |avgpool31(m) − m|``.

    Args:
        logits: ``(B, K, H, W)`` raw logits, one channel per foreground label.
        mask: ``(B, K, H, W)`` binary targets.

    Returns:
        the mean over batch and channels.
    """
    mask = mask.float()
    weight = 1 + 5 * torch.abs(F.avg_pool2d(mask, kernel_size=31, stride=1, padding=15) - mask)
    bce = F.binary_cross_entropy_with_logits(logits.float(), mask, reduction="none")
    bce = (weight * bce).sum((2, 3)) / weight.sum((2, 3))
    prob = torch.sigmoid(logits.float())
    inter = (prob * mask * weight).sum((2, 3))
    union = ((prob + mask) * weight).sum((2, 3))
    iou = 1 - (inter + 1) / (union - inter + 1)
    return (bce + iou).mean()


def clip_indices(t: int, num_frames: int, clip_length: int) -> list[int]:
    """The frames of the clip centred on frame ``t`` (centre at index ``clip_length // 2``), clamped to the video."""
    start = t - clip_length // 2
    return [min(max(i, 0), num_frames - 1) for i in range(start, start + clip_length)]


def scale_frames(frames: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1]: ÷ 255 for 8-bit-range videos, ÷ 65535 for 16-bit, else the case's min-max."""
    frames = np.asarray(frames, dtype=np.float32)
    low, high = float(frames.min()), float(frames.max())
    if low >= 0 and high <= 255 and high > 1:
        return frames / 255.0
    if low >= 0 and high <= 65535 and high > 255:
        return frames / 65535.0
    return (frames - low) / (high - low) if high > low else np.zeros_like(frames)


def normalize_clip(clip: torch.Tensor, normalization: str) -> torch.Tensor:
    """``(…, T, C, H, W)`` in [0, 1] → network input: ImageNet mean/std per channel, or z-score over the clip."""
    if normalization == "imagenet":
        mean = clip.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = clip.new_tensor(IMAGENET_STD).view(3, 1, 1)
        return (clip - mean) / std
    dims = tuple(range(-4, 0))
    return (clip - clip.mean(dims, keepdim=True)) / clip.std(dims, keepdim=True).clamp_min(1e-6)


class ClipSource:
    """Clips in memory (frames in [0, 1] at the training size, label maps): batches and augmentation."""

    def __init__(
        self,
        clips: Mapping[str, tuple[np.ndarray, np.ndarray]],
        values: Sequence[int],
        clip_length: int,
        normalization: str,
        device: torch.device,
    ) -> None:
        self.clips, self.clip_length, self.normalization, self.device = clips, clip_length, normalization, device
        self.foreground = [v for v in values if v != 0] or [1]

    def batch(
        self, samples: Sequence[tuple[str, int]], rng: np.random.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(clips (B, T, C, H, W) normalised, centre masks (B, K, H, W))``; augmented when ``rng`` is given."""
        clips, masks = [], []
        for case, t in samples:
            frames, labels = self.clips[case]
            index = clip_indices(t, len(frames), self.clip_length)
            clip, mask = frames[index], labels[t]
            if rng is not None:
                clip, mask = _augment(clip, mask, rng)
            clips.append(clip)
            masks.append(np.stack([mask == v for v in self.foreground]))
        x = torch.from_numpy(np.stack(clips)).to(self.device, torch.float32)
        y = torch.from_numpy(np.stack(masks)).to(self.device, torch.float32)
        return normalize_clip(x, self.normalization), y

    def batches(
        self, samples: Sequence[tuple[str, int]], batch_size: int, *, seed: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Endless augmented batches: each epoch a fresh permutation of the samples, this rank's share of it."""
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(samples))[rank::world]
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                if len(chosen) == batch_size or len(order) < batch_size:
                    yield self.batch([samples[i] for i in chosen], rng)


def _augment(clip: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One draw for the whole clip ``(T, C, H, W)`` and its centre mask ``(H, W)``."""
    if rng.random() < 0.5:
        clip, mask = clip[..., ::-1, :], mask[::-1, :]
    if rng.random() < 0.5:
        clip, mask = clip[..., ::-1], mask[:, ::-1]
    if rng.random() < 0.5:
        clip, mask = clip[..., ::-1, ::-1], mask[::-1, ::-1]
    brightness, contrast = rng.uniform(0.5, 1.5, 2)
    mean = clip.mean()
    clip = np.clip(((clip - mean) * contrast + mean) * brightness, 0.0, 1.0)
    return np.ascontiguousarray(clip, dtype=np.float32), np.ascontiguousarray(mask)


def _loss_fn(clip_length: int) -> Any:
    def compute_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        clips, masks = batch
        logits = _centre(model(clips), clips.shape[0], clip_length)
        return structure_loss(logits, masks), {}

    return compute_loss


def _centre(logits: Any, batch: int, clip_length: int) -> torch.Tensor:
    """The centre frame's logits ``(B, K, H, W)`` of the network's ``(B·T, K, H, W)`` output."""
    if isinstance(logits, tuple):  # with_edge: (logits, edge logits)
        logits = logits[0]
    return logits.unflatten(0, (batch, clip_length))[:, clip_length // 2]


def _validator(source: ClipSource, samples: Sequence[tuple[str, int]], batch_size: int, clip_length: int) -> Any:
    """Validation on centre frames: mean structure loss and Dice of the thresholded predictions (all labels pooled)."""

    def validate(network: nn.Module) -> dict[str, float]:
        losses, inter, total = [], 0.0, 0.0
        for start in range(0, len(samples), batch_size):
            clips, masks = source.batch(samples[start : start + batch_size])
            logits = _centre(network(clips), clips.shape[0], clip_length)
            losses.append(float(structure_loss(logits, masks)))
            pred = (torch.sigmoid(logits.float()) > 0.5).float()
            inter += float((pred * masks).sum())
            total += float(pred.sum() + masks.sum())
        return {"val_loss": float(np.mean(losses)), "val_dice": 2 * inter / total if total else float("nan")}

    return validate


def _spread(samples: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    """At most ``limit`` samples, evenly spread (deterministic validation)."""
    if len(samples) <= limit:
        return samples
    picks = np.linspace(0, len(samples) - 1, limit).round().astype(int)
    return [samples[i] for i in picks]


def _load_clips(data: VideoDataset, size: tuple[int, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every training clip: frames ``(T, C, H, W)`` in [0, 1] resized to ``size``, label maps ``(T, H, W)``."""
    if not data.training:
        raise DatasetError([Problem(str(data.root / "videosTr"), "holds no training clip", "Add videos and masks")])
    clips = {}
    for case in data.training:
        frames, masks = read_clip(data, case)
        if masks is None:
            raise DatasetError(
                [Problem(str(data.root / "masksTr" / case.case_id), "missing", "Every training clip needs its masks")]
            )
        x = F.interpolate(torch.from_numpy(scale_frames(frames)), size=size, mode="bilinear", align_corners=False)
        y = F.interpolate(torch.from_numpy(masks.astype(np.float32))[:, None], size=size, mode="nearest")[:, 0]
        clips[case.case_id] = (x.numpy(), y.numpy().astype(np.int64))
    return clips
