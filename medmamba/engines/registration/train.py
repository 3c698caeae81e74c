"""MambaMorph training on a Learn2Reg-style pair dataset (``medmamba.io.datasets.registration``).

MambaMorph (Guo et al., arXiv:2401.13934; ``networks.md`` §6.6-6.7) trains on fixed/moving pairs on one grid,
min-max normalised, one pair per step, with Adam 1e-4 and no schedule. The loss is a weighted sum of named terms
(the recipe's ``loss_weights``; 0 turns a term off), each MONAI's where MONAI has it:

=============  ====================================================================================  ==============
term           what                                                                                  paper default
=============  ====================================================================================  ==============
``dice``       weakly supervised soft Dice of the bilinearly warped one-hot moving labels against     1
               the fixed labels, background excluded (MONAI ``DiceLoss``)
``lncc``       local normalised cross-correlation, window 9³ (MONAI; mono-modal pairs)                0
``mi``         global mutual information, 23 bins (MONAI; MR-CT pairs)                                0
``mse``        mean squared intensity difference                                                      0
``smoothness`` gradient L2 of the stationary velocity: mean squared forward differences, averaged     0.1
               over the axes, × 2 (VoxelMorph's ``Grad('l2', loss_mult=2)`` as MambaMorph calls it)
``bending``    bending energy of the displacement (MONAI ``BendingEnergyLoss``)                       0
``contrastive`` MambaMorphFeat's prototype contrastive loss on the read-out embeddings                0.001 (feat)
=============  ====================================================================================  ==============

The epoch loop, checkpoints, resume, AMP, curves and DDP are :class:`medmamba.engines.training.EpochLoop`'s. The run
folder (``<results>/<dataset>/<network>/``) holds ``checkpoint_{latest,best,final}.pth``, ``model.json`` (what
``medmamba register`` needs: network, its arguments, the training grid, the label values), ``recipe.json``,
``train.log`` and ``progress.png``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

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
from medmamba.io.datasets.registration import RegistrationDataset, RegistrationPair, open_registration_dataset
from medmamba.io.image import read_header, read_image
from medmamba.metrics.registration import jacobian_determinant

if TYPE_CHECKING:
    from medmamba.networks.mambamorph import MambaMorph, MambaMorphFeat

__all__ = [
    "LOSS_TERMS",
    "MODEL_FILE",
    "RegistrationObjective",
    "contrastive_loss",
    "gradient_l2",
    "label_indices",
    "minmax",
    "train",
]

logger = logging.getLogger(__name__)

#: the named loss terms a registration recipe may weight
LOSS_TERMS = ("dice", "lncc", "mi", "mse", "smoothness", "bending", "contrastive")
#: the run folder's description of the trained model (read by ``medmamba register``)
MODEL_FILE = "model.json"
_LABEL_TERMS = ("dice", "contrastive")
_CACHE_BYTES = 2 * 1024**3


def train(
    dataset: str | os.PathLike[str],
    results: str | os.PathLike[str],
    *,
    network: str = "mambamorph",
    overrides: Mapping[str, Any] | None = None,
    network_kwargs: Mapping[str, Any] | None = None,
    output: str | os.PathLike[str] | None = None,
    device: str | torch.device = "auto",
    resume: bool = False,
    overwrite: bool = False,
) -> Path:
    """Train a registration network on a pair dataset; returns the run folder.

    Args:
        dataset: the dataset folder (``dataset.json`` with ``training_paired_images``; ``registration_val`` pairs
            are validated every epoch).
        results: results root; the run goes to ``results/<dataset folder name>/<network>/``.
        network: ``mambamorph`` or ``mambamorph_feat``.
        overrides: recipe fields to change (None values ignored; ``loss_weights`` merged per term).
        network_kwargs: constructor arguments besides dims and channels (default: the paper's network).
        output: the run folder itself, instead of the one under ``results``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        resume: continue from the run's last checkpoint (its recipe and network arguments).
        overwrite: start afresh in a folder that holds checkpoints.

    Raises:
        DatasetError: no training pairs, missing files, pairs on different grids, or labels missing for a term
            that needs them.
        UsageError: an invalid recipe override, a folder with checkpoints and neither resume nor overwrite.
        CheckpointError: the checkpoint to resume from is unusable.
    """
    from medmamba.networks import build, spec

    if spec(network).task != "registration":
        raise UsageError(f"--network {network}: not a registration network (it is a {spec(network).task} network)")
    dist_env = DistributedEnv.from_env()
    device = resolve_device(device)
    if dist_env.active:
        device = init_distributed(dist_env, device)
    try:
        recipe = merge_overrides(recipe_for(network), overrides or {})
    except ValueError as err:
        raise UsageError(str(err)) from None
    data = open_registration_dataset(dataset)
    folder = Path(output) if output is not None else Path(results) / data.root.name / network
    folder.mkdir(parents=True, exist_ok=True)
    with run_log(folder) if dist_env.rank == 0 else contextlib.nullcontext():
        found = prepare_run_folder(folder, resume=resume, overwrite=overwrite)
        checkpoint = load_checkpoint(found, map_location=device, network=network) if found is not None else None
        kwargs = dict(network_kwargs or {})
        if checkpoint is not None:
            check_resume_recipe(checkpoint["recipe"], recipe.to_dict(), found or folder)
            recipe = TrainRecipe.from_dict(checkpoint["recipe"])
            kwargs = dict(checkpoint["model"]["network_kwargs"])
        _check_recipe(recipe)
        pairs, val_pairs = data.pairs_of("train"), data.pairs_of("val")
        grid = _check_pairs(data, pairs, val_pairs, needs_labels=_needs_labels(recipe))
        values = _label_values(data, pairs)
        model: dict[str, Any] = {
            "task": "registration",
            "network": network,
            "network_kwargs": kwargs,
            "in_channels": 1,
            "out_channels": 3,
            "grid_shape": list(grid.shape),
            "grid_spacing": list(grid.geometry.spacing),
            "normalization": "minmax",
            "label_values": list(values),
            "labels": {str(k): v for k, v in data.labels.get(0, {}).items()},
            "dataset": str(data.root),
        }
        if recipe.seed is not None:
            seed_everything(recipe.seed + dist_env.rank)
        net = build(network, spatial_dims=3, in_channels=1, out_channels=3, **kwargs).to(device)
        objective = RegistrationObjective(cast("MambaMorph", net), recipe.loss_weights, num_classes=len(values)).to(
            device
        )
        source = PairSource(values, device)
        batch_size = recipe.batch_size or 1
        iterations = recipe.iterations_per_epoch or max(1, math.ceil(len(pairs) / (batch_size * dist_env.world_size)))
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
        seed = recipe.seed or 0  # one permutation on every rank: the ranks take disjoint shares of it
        loop = EpochLoop(
            network=net,
            step_module=objective,
            compute_loss=_compute_loss,
            batches=source.batches(pairs, batch_size, seed=seed, rank=dist_env.rank, world=dist_env.world_size),
            validate=_validator(objective, source, val_pairs[: recipe.val_iterations_per_epoch]) if val_pairs else None,
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
                "in_channels": 1,
                "out_channels": 3,
                "recipe": recipe.to_dict(),
                "model": model,
                "medmamba_version": __version__,
            },
            select=("val_loss", "min"),
            find_unused_parameters=True,
            dist_env=dist_env,
            title=f"{network} · {data.root.name}",
        )
        state = loop.restore(checkpoint, found or folder) if checkpoint is not None else None
        if dist_env.rank == 0:
            write_json(folder / MODEL_FILE, model)
            write_json(folder / "recipe.json", recipe.to_dict())
        logger.info(
            "training %s on %s: %d train / %d validation pairs of %s voxels, %d epochs × %d iterations, batch %d, "
            "%s, loss %s",
            network,
            data.root.name,
            len(pairs),
            len(val_pairs),
            "×".join(map(str, grid.shape)),
            recipe.num_epochs,
            iterations,
            batch_size,
            loop.amp.name,
            dict(recipe.loss_weights),
        )
        if state is not None:
            logger.info("resuming %s from %s at epoch %d", folder, (found or folder).name, state.epoch)
        loop.run(state)
    if dist_env.active:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return folder


class RegistrationObjective(nn.Module):
    """The weighted registration loss of one batch (a module, so that DDP sees the whole step in ``forward``).

    Args:
        network: a :class:`~medmamba.networks.mambamorph.MambaMorph` (or ``MambaMorphFeat`` for ``contrastive``).
        weights: term name → weight (:data:`LOSS_TERMS`); zero or absent terms are not computed.
        num_classes: label classes incl. background (for the one-hot Dice and the contrastive prototypes).

    Shapes:
        ``forward((moving, fixed, moving_labels, fixed_labels))`` with images ``(B, 1, D, H, W)`` in [0, 1] and
        labels ``(B, 1, D, H, W)`` class indices (or None); returns ``(loss, {term: unweighted value})``.
    """

    def __init__(self, network: MambaMorph, weights: Mapping[str, float], *, num_classes: int) -> None:
        super().__init__()
        from monai.losses import (
            BendingEnergyLoss,
            DiceLoss,
            GlobalMutualInformationLoss,
            LocalNormalizedCrossCorrelationLoss,
        )

        self.network = network
        self.weights = {k: float(v) for k, v in weights.items() if float(v) > 0}
        self.num_classes = num_classes
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=3, kernel_size=9)
        self.mi = GlobalMutualInformationLoss(num_bins=23)
        self.dice = DiceLoss(include_background=False)
        self.bending = BendingEnergyLoss()

    def forward(self, batch: Sequence[Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total weighted loss and each term's value."""
        moving, fixed, moving_labels, fixed_labels = batch
        velocity = self.network.predict_velocity(moving, fixed)  # (B, 3, D, H, W)
        ddf = self.network.integrate_velocity(velocity)
        warped = self.network.warp_image(moving, ddf).float()
        fixed = fixed.float()
        terms: dict[str, torch.Tensor] = {}
        w = self.weights
        if "lncc" in w:
            terms["lncc"] = self.lncc(warped, fixed)
        if "mi" in w:
            terms["mi"] = self.mi(warped, fixed)
        if "mse" in w:
            terms["mse"] = F.mse_loss(warped, fixed)
        if "dice" in w:
            moved = self.network.warp_image(_one_hot(moving_labels, self.num_classes, ddf.dtype), ddf).float()
            terms["dice"] = self.dice(moved, _one_hot(fixed_labels, self.num_classes, torch.float32))
        if "smoothness" in w:
            terms["smoothness"] = gradient_l2(velocity.float())
        if "bending" in w:
            terms["bending"] = self.bending(ddf.float())
        if "contrastive" in w:
            embed = cast("MambaMorphFeat", self.network).embed  # the feature variant's read-out
            terms["contrastive"] = contrastive_loss(
                embed(moving).float(), embed(fixed).float(), moving_labels, fixed_labels
            )
        loss = sum((w[k] * v for k, v in terms.items()), torch.zeros((), device=fixed.device))
        return loss, {k: v.detach() for k, v in terms.items()}


def gradient_l2(field: torch.Tensor) -> torch.Tensor:
    """VoxelMorph's ``Grad('l2', loss_mult=2)``: mean squared forward differences, averaged over the axes, × 2.

    Args:
        field: ``(B, C, D, H, W)`` (MambaMorph regularises the velocity).
    """
    spatial = range(2, field.ndim)
    means = [torch.diff(field, dim=d).pow(2).mean() for d in spatial]
    return 2.0 * sum(means, torch.zeros((), device=field.device, dtype=field.dtype)) / len(means)


def contrastive_loss(
    moving_embedding: torch.Tensor,
    fixed_embedding: torch.Tensor,
    moving_labels: torch.Tensor | None,
    fixed_labels: torch.Tensor | None,
    *,
    max_samples: int = 10_000,
    temperature: float = 0.25,
) -> torch.Tensor:
    """MambaMorphFeat's prototype contrastive loss (upstream ``ContrastiveSem``; ``networks.md`` §6.6).

    Embeddings are L2-normalised per voxel; a class prototype is the normalised mean of the moving and fixed
    images' mean embeddings of that label (labels down-sampled by nearest interpolation to the embeddings' grid).
    Up to ``max_samples`` foreground voxels of each image are drawn; each voxel's logits are
    ``[⟨f, own prototype⟩, ⟨f, every prototype⟩] / temperature`` and the target is index 0 (upstream's quirk: the own
    prototype is among the negatives as well).

    Args:
        moving_embedding: ``(B, E, d, h, w)`` read-out embeddings of the moving image.
        fixed_embedding: those of the fixed image.
        moving_labels: ``(B, 1, D, H, W)`` class indices of the moving image (0 = background).
        fixed_labels: those of the fixed image.
        max_samples: foreground voxels drawn per image.
        temperature: divides the cosine similarities.
    """
    if moving_labels is None or fixed_labels is None:
        raise ValueError("the contrastive loss needs the label maps of both images")
    size = moving_embedding.shape[2:]
    embeddings = [F.normalize(e, dim=1).movedim(1, -1).flatten(0, -2) for e in (moving_embedding, fixed_embedding)]
    labels = [
        F.interpolate(lab.float(), size=size, mode="nearest").long().flatten() for lab in (moving_labels, fixed_labels)
    ]
    classes = torch.unique(torch.cat(labels))
    means = []
    for feats, labs in zip(embeddings, labels, strict=True):
        one_hot = (labs[:, None] == classes[None]).to(feats.dtype)  # (N, K)
        counts = one_hot.sum(0)
        means.append((one_hot.T @ feats, counts))  # (K, E), (K,)
    (sum_m, n_m), (sum_f, n_f) = means
    mean_m = sum_m / n_m.clamp_min(1)[:, None]
    mean_f = sum_f / n_f.clamp_min(1)[:, None]
    both = (n_m > 0) & (n_f > 0)
    prototype = torch.where(both[:, None], (mean_m + mean_f) / 2, torch.where((n_m > 0)[:, None], mean_m, mean_f))
    prototype = F.normalize(prototype, dim=1)  # (K, E)
    losses = []
    for feats, labs in zip(embeddings, labels, strict=True):
        foreground = torch.nonzero(labs > 0).flatten()
        if foreground.numel() == 0:
            continue
        if foreground.numel() > max_samples:
            foreground = foreground[torch.randperm(foreground.numel(), device=foreground.device)[:max_samples]]
        f = feats[foreground]  # (S, E)
        own = torch.searchsorted(classes, labs[foreground])
        logits = torch.cat([(f * prototype[own]).sum(1, keepdim=True), f @ prototype.T], dim=1) / temperature
        losses.append(F.cross_entropy(logits, torch.zeros(len(f), dtype=torch.long, device=f.device)))
    if not losses:
        return moving_embedding.sum() * 0.0
    return torch.stack(losses).mean()


def minmax(array: np.ndarray) -> np.ndarray:
    """Min-max normalisation to [0, 1] per image (MambaMorph's); a constant image becomes zeros."""
    array = np.asarray(array, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)


def label_indices(labels: np.ndarray, values: Sequence[int], path: str | os.PathLike[str]) -> np.ndarray:
    """Label values → class indices ``0 … len(values) − 1`` (``values`` sorted, background first).

    Raises:
        DatasetError: a value that is not declared.
    """
    values_arr = np.asarray(values)
    labels = np.rint(np.asarray(labels)).astype(np.int64)
    index = np.searchsorted(values_arr, labels).clip(0, len(values_arr) - 1)
    bad = values_arr[index] != labels
    if bad.any():
        found = sorted(set(np.unique(labels[bad]).tolist()))[:5]
        raise DatasetError(
            [Problem(str(path), f"holds label value(s) {found} not declared in dataset.json", "Declare them in labels")]
        )
    return index.astype(np.uint8 if len(values) < 256 else np.int16)


@dataclass(frozen=True, slots=True)
class _Grid:
    shape: tuple[int, ...]
    geometry: Any


class PairSource:
    """Reads pairs (min-max images, label class indices), caches them within a memory budget, yields batches."""

    def __init__(self, values: Sequence[int], device: torch.device) -> None:
        self.values, self.device = tuple(values), device
        self._cache: dict[Path, np.ndarray] = {}
        self._cached_bytes = 0

    def image(self, path: Path) -> np.ndarray:
        """A min-max normalised image ``(X, Y, Z)`` float32."""
        return self._cached(path, lambda: minmax(read_image(path).array))

    def labels(self, path: Path) -> np.ndarray:
        """A label map as class indices ``(X, Y, Z)``."""
        return self._cached(path, lambda: label_indices(read_image(path).array, self.values, path))

    def pair(self, pairs: Sequence[RegistrationPair]) -> tuple[torch.Tensor | None, ...]:
        """``(moving, fixed, moving_labels, fixed_labels)`` of a batch of pairs, ``(B, 1, X, Y, Z)`` on the device."""
        moving = self._stack([self.image(p.moving.image) for p in pairs], torch.float32)
        fixed = self._stack([self.image(p.fixed.image) for p in pairs], torch.float32)
        if all(p.moving.label is not None and p.fixed.label is not None for p in pairs):
            moving_labels = self._stack([self.labels(p.moving.label) for p in pairs], torch.long)  # type: ignore[arg-type]
            fixed_labels = self._stack([self.labels(p.fixed.label) for p in pairs], torch.long)  # type: ignore[arg-type]
            return moving, fixed, moving_labels, fixed_labels
        return moving, fixed, None, None

    def batches(
        self, pairs: Sequence[RegistrationPair], batch_size: int, *, seed: int, rank: int = 0, world: int = 1
    ) -> Iterator[tuple[torch.Tensor | None, ...]]:
        """Endless batches: each epoch a fresh permutation of the pairs, this rank's share of it."""
        rng = np.random.default_rng(seed)
        while True:
            order = rng.permutation(len(pairs))
            share = order[rank::world] if world > 1 else order
            for start in range(0, max(len(share) - batch_size + 1, 1), batch_size):
                chosen = share[start : start + batch_size]
                if len(chosen):
                    yield self.pair([pairs[i] for i in chosen])

    def _stack(self, arrays: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)[:, None]).to(self.device, dtype)

    def _cached(self, path: Path, load: Any) -> np.ndarray:
        if path in self._cache:
            return self._cache[path]
        array = load()
        if self._cached_bytes + array.nbytes <= _CACHE_BYTES:
            self._cache[path] = array
            self._cached_bytes += array.nbytes
        return array


def _compute_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, float]]:
    loss, terms = model(batch)
    return loss, {k: float(v) for k, v in terms.items()}


def _validator(objective: RegistrationObjective, source: PairSource, pairs: Sequence[RegistrationPair]) -> Any:
    """Validation: mean loss, mean Dice of the nearest-warped labels (when labelled) and mean folding fraction."""

    def validate(network: nn.Module) -> dict[str, float]:
        net = objective.network  # the bare network (validation runs outside DDP)
        losses, dices, folding = [], [], []
        for pair in pairs:
            batch = source.pair([pair])
            losses.append(float(objective(batch)[0]))
            moving, fixed, moving_labels, fixed_labels = batch
            _, ddf = net(moving, fixed)
            det = jacobian_determinant(ddf[0].float().cpu().numpy())
            folding.append(float(np.mean(det <= 0)))
            if moving_labels is not None and fixed_labels is not None:
                warped = net.warp_image(moving_labels, ddf, mode="nearest")
                dices.append(_mean_dice(warped, fixed_labels, objective.num_classes))
        values = {"val_loss": float(np.mean(losses)), "val_folding": float(np.mean(folding))}
        if dices:
            values["val_dice"] = float(np.nanmean(dices))
        return values

    return validate


def _mean_dice(prediction: torch.Tensor, reference: torch.Tensor, num_classes: int) -> float:
    """Mean Dice over the foreground classes present in either map (NaN when none is)."""
    scores = []
    for c in range(1, num_classes):
        p, r = prediction == c, reference == c
        total = int(p.sum() + r.sum())
        if total:
            scores.append(2.0 * int((p & r).sum()) / total)
    return float(np.mean(scores)) if scores else float("nan")


def _one_hot(labels: torch.Tensor | None, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    if labels is None:
        raise ValueError("this loss term needs label maps")
    return F.one_hot(labels[:, 0].long(), num_classes).movedim(-1, 1).to(dtype)


def _check_recipe(recipe: TrainRecipe) -> None:
    if recipe.loss != "registration":
        raise UsageError(f"loss {recipe.loss!r} is not a registration loss; registration trains with 'registration'")
    unknown = sorted(set(recipe.loss_weights) - set(LOSS_TERMS))
    if unknown:
        raise UsageError(f"unknown registration loss term(s) {unknown}; known: {', '.join(LOSS_TERMS)}")
    if not any(float(v) > 0 for k, v in recipe.loss_weights.items() if k not in ("smoothness", "bending")):
        raise UsageError(
            f"the loss {dict(recipe.loss_weights)} has no similarity or label term; give --similarity lncc|mi|mse "
            "or a positive --dice-weight"
        )


def _needs_labels(recipe: TrainRecipe) -> bool:
    return any(float(recipe.loss_weights.get(k, 0)) > 0 for k in _LABEL_TERMS)


def _check_pairs(
    data: RegistrationDataset,
    pairs: Sequence[RegistrationPair],
    val_pairs: Sequence[RegistrationPair],
    *,
    needs_labels: bool,
) -> _Grid:
    """Every file exists, every image lies on the first one's grid; labels where the loss needs them."""
    path = data.root / "dataset.json"
    if not pairs:
        raise DatasetError([Problem(str(path), "lists no training pairs", "Add training_paired_images")])
    problems: list[Problem] = []
    first = read_header(pairs[0].fixed.image)
    for pair in [*pairs, *val_pairs]:
        for entry in (pair.fixed, pair.moving):
            files = [entry.image] + ([entry.label] if entry.label is not None else [])
            for file in files:
                if not file.is_file():
                    problems.append(Problem(str(file), "listed in dataset.json but missing", "Fix the path"))
                elif read_header(file).shape != first.shape:
                    problems.append(
                        Problem(
                            str(file),
                            f"shape {read_header(file).shape} differs from {first.shape} of {pairs[0].fixed.image}",
                            "Resample every image onto one grid (MambaMorph registers pairs on a common grid)",
                        )
                    )
            if needs_labels and entry.label is None and pair in pairs:
                problems.append(
                    Problem(
                        str(entry.image),
                        "has no label map, but the loss weights warped-label Dice / the contrastive term",
                        "Add labels to dataset.json's 'training' list, or train unsupervised with --similarity lncc "
                        "(one modality) or --similarity mi (MR-CT) and --dice-weight 0 --contrastive-weight 0",
                    )
                )
    if problems:
        raise DatasetError(problems, header=f"{data.root}: cannot train on these pairs")
    return _Grid(first.shape, first.geometry)


def _label_values(data: RegistrationDataset, pairs: Sequence[RegistrationPair]) -> tuple[int, ...]:
    """Declared label values of the modalities the pairs use (background first)."""
    declared = {0}
    for labels in data.labels.values():
        declared |= set(labels)
    return tuple(sorted(declared))
