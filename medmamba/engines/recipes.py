"""Training recipes: each paper's defaults as a frozen dataclass, and the merge of user overrides.

* U-Mamba (Ma, Li, Wang, arXiv:2401.04722) trains with nnU-Net v2's defaults unchanged (``networks.md`` §3.6):
  SGD lr 1e-2, momentum 0.99 Nesterov, weight decay 3e-5, poly LR (exponent 0.9) stepped per epoch over
  1000 × 250 iterations, Dice + CE with deep supervision, 33 % foreground oversampling (and nnU-Net's grad-norm
  clip 12, which both papers keep).
* SegMamba (Xing et al., MICCAI 2024, arXiv:2401.13560; ``networks.md`` §4.6): the same optimiser and length,
  but cross-entropy only, no deep supervision, poly LR stepped **per iteration**.

Both papers train with mixed precision; here it is bf16 by default on the GPU (the Mamba scans stay fp32 inside
``MambaLayer``). CLI options default to ``None`` and only the options given replace recipe fields (timm's trick),
so a recipe default is never overridden by accident.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

__all__ = [
    "RECIPES",
    "AmpDtype",
    "LossName",
    "LrSchedule",
    "LrStep",
    "OptimizerName",
    "TrainRecipe",
    "merge_overrides",
    "recipe_for",
]

OptimizerName = Literal["sgd", "adamw", "adam"]
AmpDtype = Literal["bf16", "fp16", "fp32"]
#: ``registration``: MambaMorph's weighted sum of the terms in ``loss_weights``; ``structure``: Vivim's weighted BCE +
#: weighted IoU
LossName = Literal["dice_ce", "ce", "registration", "structure"]
LrStep = Literal["epoch", "iteration"]
LrSchedule = Literal["poly", "cosine", "constant"]


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainRecipe:
    """How a network is trained (optimiser, schedule, loss, precision); plans decide patch and architecture.

    Args:
        num_epochs: epochs of the whole run (the poly schedule decays to 0 over them).
        iterations_per_epoch: training iterations per epoch; 0 = one pass over the training samples (the
            registration and video engines only: MambaMorph's and Vivim's epochs).
        val_iterations_per_epoch: validation patches' batches per epoch (pseudo Dice for the best checkpoint).
        optimizer: ``"sgd"`` (momentum, Nesterov) or ``"adamw"``.
        initial_lr: learning rate at step 0.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        momentum: SGD momentum (ignored by AdamW).
        lr_step: the poly schedule advances per ``"epoch"`` (nnU-Net) or per ``"iteration"`` (SegMamba).
        poly_exponent: ``lr = initial_lr · (1 − t/T)^poly_exponent``.
        lr_schedule: ``"poly"`` (nnU-Net), ``"cosine"`` (annealing to ``min_lr`` over the run, Vivim) or
            ``"constant"`` (MambaMorph). The segmentation trainer uses poly.
        min_lr: the cosine schedule's floor.
        batch_size: images per step; None keeps the plans' batch size.
        loss: ``"dice_ce"`` (soft Dice + cross-entropy, nnU-Net's), ``"ce"`` (cross-entropy only), ``"registration"``
            (MambaMorph: the weighted terms of ``loss_weights``) or ``"structure"`` (Vivim: weighted BCE + IoU).
        loss_weights: weights of a composite loss's named terms (registration: ``dice``, ``lncc``, ``mi``, ``mse``,
            ``smoothness``, ``bending``, ``contrastive``; a weight of 0 turns a term off). Overrides merge per key.
        deep_supervision: train on every decoder resolution (nnU-Net's weights 1/2^i, lowest 0).
        amp_dtype: autocast dtype on the GPU, ``"fp32"`` = no mixed precision; the CPU always runs fp32.
        oversample_foreground: share of each batch forced to contain foreground.
        compile: wrap the network in ``torch.compile`` (never while the Triton scan backend runs).
        seed: seed for torch/numpy/random at the start of a run; None leaves them unseeded.
    """

    num_epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations_per_epoch: int = 50
    optimizer: OptimizerName = "sgd"
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    lr_step: LrStep = "epoch"
    poly_exponent: float = 0.9
    lr_schedule: LrSchedule = "poly"
    min_lr: float = 0.0
    batch_size: int | None = None
    loss: LossName = "dice_ce"
    loss_weights: Mapping[str, float] = field(default_factory=dict)
    deep_supervision: bool = True
    amp_dtype: AmpDtype = "bf16"
    oversample_foreground: float = 0.33
    compile: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, allowed in (
            ("optimizer", OptimizerName),
            ("amp_dtype", AmpDtype),
            ("loss", LossName),
            ("lr_step", LrStep),
            ("lr_schedule", LrSchedule),
        ):
            value, choices = getattr(self, name), get_args(allowed)
            if value not in choices:
                close = difflib.get_close_matches(str(value), choices, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}{hint}")
        if int(self.num_epochs) < 1 or int(self.iterations_per_epoch) < 0:
            raise ValueError(
                f"need num_epochs >= 1 and iterations_per_epoch >= 1 (0: one pass over the data), got "
                f"{self.num_epochs}, {self.iterations_per_epoch}"
            )
        if self.val_iterations_per_epoch < 1:
            raise ValueError(f"val_iterations_per_epoch must be at least 1, got {self.val_iterations_per_epoch}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if not self.initial_lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(
                f"need initial_lr > 0, weight_decay >= 0 and 0 <= momentum < 1; got {self.initial_lr}, "
                f"{self.weight_decay}, {self.momentum}"
            )
        if self.min_lr < 0 or any(not float(w) >= 0 for w in self.loss_weights.values()):
            raise ValueError(f"need min_lr >= 0 and loss weights >= 0; got {self.min_lr}, {dict(self.loss_weights)}")
        if not 0 <= self.oversample_foreground <= 1 or not self.poly_exponent > 0:
            raise ValueError(
                f"need 0 <= oversample_foreground <= 1 and poly_exponent > 0; got {self.oversample_foreground}, "
                f"{self.poly_exponent}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainRecipe:
        """Build from a dict (e.g. a checkpoint's); unknown keys are an error that lists the valid ones."""
        _check_keys(data)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON and checkpoint friendly)."""
        return dataclasses.asdict(self)

    def total_steps(self) -> int:
        """Length of the LR schedule in its own unit (epochs or iterations)."""
        return self.num_epochs * ((self.iterations_per_epoch or 1) if self.lr_step == "iteration" else 1)


#: MambaMorph (Guo et al., arXiv:2401.13934; ``networks.md`` §6.6-6.7): Adam 1e-4 without schedule, AMP, one pair per
#: step, 1500 epochs of one pass over the pairs; weakly supervised Dice of the warped labels plus 0.1 × the
#: gradient-L2 of the velocity field (``--image-loss dice``, ``--lambda 0.1``).
_MAMBAMORPH = TrainRecipe(
    num_epochs=1500,
    iterations_per_epoch=0,
    optimizer="adam",
    initial_lr=1e-4,
    weight_decay=0.0,
    lr_schedule="constant",
    batch_size=1,
    loss="registration",
    loss_weights={"dice": 1.0, "smoothness": 0.1},
    deep_supervision=False,
)

#: the papers' recipes by registry name
RECIPES: dict[str, TrainRecipe] = {
    "umamba_bot": TrainRecipe(),
    "umamba_enc": TrainRecipe(),
    "segmamba": TrainRecipe(loss="ce", deep_supervision=False, lr_step="iteration"),
    "mambamorph": _MAMBAMORPH,
    # the feature-extractor variant adds the contrastive term at the weight of upstream's early README (--cl 0.001)
    "mambamorph_feat": dataclasses.replace(
        _MAMBAMORPH, loss_weights={"dice": 1.0, "smoothness": 0.1, "contrastive": 0.001}
    ),
    # Vivim (Yang et al., arXiv:2401.14168; networks.md §5.6): Adam 1e-4, cosine annealing to 1e-6 over 200 epochs of
    # one pass over the frames, batch 8, fp32, seed 1234, structure loss on each clip's centre frame
    "vivim": TrainRecipe(
        num_epochs=200,
        iterations_per_epoch=0,
        optimizer="adam",
        initial_lr=1e-4,
        weight_decay=0.0,
        lr_schedule="cosine",
        min_lr=1e-6,
        batch_size=8,
        loss="structure",
        deep_supervision=False,
        amp_dtype="fp32",
        seed=1234,
    ),
}


def recipe_for(network: str) -> TrainRecipe:
    """The default recipe of ``network`` (its paper's); an unknown name raises ``ValueError`` with a did-you-mean."""
    try:
        return RECIPES[network]
    except KeyError:
        close = difflib.get_close_matches(network, RECIPES, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"no training recipe for network {network!r}; {hint}known: {', '.join(sorted(RECIPES))}"
        ) from None


def merge_overrides(recipe: TrainRecipe, overrides: Mapping[str, Any]) -> TrainRecipe:
    """``recipe`` with the fields in ``overrides`` replaced; ``None`` values are ignored (option not given).

    A mapping field (``loss_weights``) is merged key by key, so ``{"loss_weights": {"mi": 1.0}}`` adds a term.

    Raises:
        ValueError: an unknown field (with did-you-mean) or an invalid value.
    """
    given = {key: value for key, value in overrides.items() if value is not None}
    _check_keys(given)
    for key, value in given.items():
        if isinstance(value, Mapping):
            given[key] = {**getattr(recipe, key), **value}
    return dataclasses.replace(recipe, **given)


def _check_keys(data: Mapping[str, Any]) -> None:
    fields = [f.name for f in dataclasses.fields(TrainRecipe)]
    unknown = [key for key in data if key not in fields]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, fields, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(f"unknown recipe field(s) {', '.join(hints)}; valid: {', '.join(fields)}")
