"""Training machinery shared by every engine (segmentation now; registration and video in issue 7).

Nothing here knows about a task: devices and the mixed-precision policy, the poly learning-rate schedule, the
``torch.compile`` rule, resume look-up, the run log file, the training-curves PNG, the epoch progress bar, seeding
and the DDP helpers (``torchrun`` environment or ``torch.multiprocessing.spawn`` on one host).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from medmamba._progress import progress
from medmamba.errors import UsageError
from medmamba.io.atomic import atomic_write

__all__ = [
    "RESUME_CHECKPOINTS",
    "AmpPolicy",
    "ConstantLR",
    "CosineLR",
    "DistributedEnv",
    "EpochLoop",
    "LoopState",
    "PolyLR",
    "amp_policy",
    "check_resume_recipe",
    "compile_allowed",
    "default_autocast_dtype",
    "epoch_progress",
    "find_free_port",
    "find_resume_checkpoint",
    "format_seconds",
    "init_distributed",
    "make_lr_schedule",
    "make_optimizer",
    "plot_curves",
    "prepare_run_folder",
    "resolve_device",
    "run_log",
    "seed_everything",
    "spawn",
    "stdout_to_log",
]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when a GPU is visible, else ``cpu``; ``"cuda"``/``"cuda:N"``/``"cpu"`` as given.

    Raises:
        UsageError: CUDA asked for but not available, or an unknown device name.
    """
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: unknown device. Use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is visible here. Use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: only cpu and cuda are supported. Use auto, cpu, cuda or cuda:N")
    return device


@dataclass(frozen=True, slots=True)
class AmpPolicy:
    """What mixed precision does on a device.

    Attributes:
        enabled: autocast on (only on CUDA; the CPU trains in fp32).
        dtype: the autocast dtype (``float32`` when disabled).
        grad_scaler: a ``GradScaler`` is needed (fp16 only; bf16 has fp32's exponent range).
    """

    enabled: bool
    dtype: torch.dtype
    grad_scaler: bool

    @property
    def name(self) -> str:
        """``"bf16"``, ``"fp16"`` or ``"fp32"``."""
        return {v: k for k, v in _DTYPES.items()}[self.dtype]


def amp_policy(device: torch.device, amp_dtype: str = "bf16") -> AmpPolicy:
    """The mixed-precision policy for ``device``: bf16 on GPUs that have it (fp16 otherwise), fp32 on the CPU.

    The Mamba layers keep their scan and its projections in fp32 under autocast (``MambaLayer(ssm_fp32=True)``),
    so only convolutions, norms and the in/out projections run in the low-precision dtype.
    """
    if amp_dtype not in _DTYPES:
        raise UsageError(f"--amp {amp_dtype}: unknown; use one of {', '.join(_DTYPES)}")
    if device.type != "cuda" or amp_dtype == "fp32":
        return AmpPolicy(enabled=False, dtype=torch.float32, grad_scaler=False)
    if amp_dtype == "bf16" and not torch.cuda.is_bf16_supported():
        logger.warning("this GPU has no bfloat16; mixed precision falls back to float16 with a GradScaler")
        amp_dtype = "fp16"
    return AmpPolicy(enabled=True, dtype=_DTYPES[amp_dtype], grad_scaler=amp_dtype == "fp16")


@contextlib.contextmanager
def default_autocast_dtype(device_type: str, dtype: torch.dtype) -> Iterator[None]:
    """Make plain ``torch.autocast(device_type)`` calls inside the block (nnU-Net's) use ``dtype``.

    nnU-Net's train/validation steps and predictor open ``torch.autocast("cuda", enabled=True)`` without a dtype,
    which means fp16; this sets torch's default autocast dtype for the block instead of copying those methods.
    With ``float32`` autocast changes nothing (no op is cast down).
    """
    previous = torch.get_autocast_dtype(device_type)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_dtype(device_type, previous)


def compile_allowed(device: torch.device, requested: bool) -> bool:
    """Whether to wrap the network in ``torch.compile``: only when asked, on CUDA, and never over Triton scans.

    The Triton selective scan is a custom autograd Function launched from Python; it is not validated under
    ``torch.compile`` (graph breaks at best), so with the ``triton`` backend active compilation stays off.
    """
    if not requested:
        return False
    if device.type != "cuda":
        logger.warning("torch.compile is only used on CUDA; training without it on %s", device)
        return False
    from medmamba.kernels.dispatch import resolve_backend

    backend, _ = resolve_backend(None, device)
    if backend == "triton":
        logger.warning("torch.compile is off: the Triton scan backend is active (use --scan-backend torch to compile)")
        return False
    return True


class PolyLR:
    """Poly learning-rate schedule ``lr = initial_lr · (1 − t / T) ** exponent``, per epoch or per iteration.

    Stateless given ``(epoch, iteration)``, so a resumed run continues on exactly the same curve. ``step(epoch)``
    is what nnU-Net's trainer calls at each epoch start; per-iteration schedules also call
    ``step(epoch, iteration)`` before every optimiser step.

    Args:
        optimizer: its param groups' ``lr`` is set.
        initial_lr: lr at ``t = 0``.
        num_epochs: length of the run.
        iterations_per_epoch: used when ``per_iteration``.
        per_iteration: ``t = epoch · iterations_per_epoch + iteration`` instead of ``t = epoch``.
        exponent: the poly exponent (0.9 in nnU-Net and SegMamba).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        initial_lr: float,
        num_epochs: int,
        iterations_per_epoch: int = 1,
        *,
        per_iteration: bool = False,
        exponent: float = 0.9,
    ) -> None:
        self.optimizer, self.initial_lr, self.exponent = optimizer, initial_lr, exponent
        self.per_iteration, self.iterations_per_epoch = per_iteration, iterations_per_epoch
        self.total = num_epochs * (iterations_per_epoch if per_iteration else 1)

    def lr_at(self, epoch: int, iteration: int = 0) -> float:
        """The learning rate at ``(epoch, iteration)``."""
        t = epoch * self.iterations_per_epoch + iteration if self.per_iteration else epoch
        return self.initial_lr * max(0.0, 1.0 - t / self.total) ** self.exponent

    def step(self, epoch: int, iteration: int = 0) -> None:
        """Set every param group's lr to :meth:`lr_at`."""
        lr = self.lr_at(epoch, iteration)
        for group in self.optimizer.param_groups:
            group["lr"] = lr


def find_resume_checkpoint(folder: str | os.PathLike[str], names: Sequence[str]) -> Path | None:
    """The first of ``names`` that exists in ``folder`` (e.g. latest before final), or None."""
    for name in names:
        candidate = Path(folder) / name
        if candidate.is_file():
            return candidate
    return None


@contextlib.contextmanager
def run_log(
    folder: str | os.PathLike[str], filename: str = "train.log", *, logger_name: str = "medmamba"
) -> Iterator[Path]:
    """Append every record of ``logger_name`` (INFO and up) to ``folder/filename`` for the block; yields the path.

    The file is appended to, so a resumed run continues the same log. The logger's level is lowered to INFO for
    the block so the file always gets the epoch lines; what the console shows is its handler's level (set by the
    CLI).
    """
    path = Path(folder) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    target = logging.getLogger(logger_name)
    previous_level = target.level
    if target.getEffectiveLevel() > logging.INFO:
        target.setLevel(logging.INFO)
    target.addHandler(handler)
    try:
        yield path
    finally:
        target.removeHandler(handler)
        target.setLevel(previous_level)
        handler.close()


class _LogWriter(io.TextIOBase):
    """A text stream that sends each complete line to a logger (for libraries that ``print``)."""

    def __init__(self, target: logging.Logger, level: int) -> None:
        super().__init__()
        self._target, self._level, self._buffer = target, level, ""

    def write(self, text: str) -> int:
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.strip():
                self._target.log(self._level, "%s", line.rstrip())
        return len(text)

    def flush(self) -> None:
        if self._buffer.strip():
            self._target.log(self._level, "%s", self._buffer.rstrip())
        self._buffer = ""


@contextlib.contextmanager
def stdout_to_log(target: logging.Logger, level: int = logging.DEBUG) -> Iterator[None]:
    """Route ``print`` output of the block (nnU-Net prints progress to stdout) into ``target``.

    stdout carries results only (style.md §2.7); third-party chatter becomes log records.
    """
    writer = _LogWriter(target, level)
    with contextlib.redirect_stdout(writer):
        try:
            yield
        finally:
            writer.flush()


def format_seconds(seconds: float) -> str:
    """``3725`` → ``"1:02:05"``; ``"?"`` for NaN/inf."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def epoch_progress(
    iterable: Iterable[T], *, epoch: int, num_epochs: int, total: int, last_loss: float | None, eta_s: float
) -> Iterator[T]:
    """One progress bar per epoch (iterations, rate, epoch ETA) whose title carries the loss and the run's ETA."""
    loss = "-" if last_loss is None or not math.isfinite(last_loss) else f"{last_loss:.4f}"
    desc = f"epoch {epoch + 1}/{num_epochs} loss {loss} ETA {format_seconds(eta_s)}"
    return progress(iterable, desc=desc, total=total, leave=False)


def plot_curves(
    panels: Mapping[str, Mapping[str, Sequence[float]]], path: str | os.PathLike[str], *, title: str = ""
) -> Path:
    """Write a PNG with one panel per entry of ``panels`` (each a few named per-epoch series), atomically.

    Example: ``{"loss": {"train": [...], "validation": [...]}, "Dice": {"pseudo Dice": [...]}, "learning rate":
    {"lr": [...]}}``. Empty series are skipped; the x axis is the epoch (from 1).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    shown = {name: {k: v for k, v in series.items() if len(v)} for name, series in panels.items()}
    shown = {name: series for name, series in shown.items() if series}
    fig = Figure(figsize=(8, 2.6 * max(1, len(shown))), layout="constrained")
    axes = fig.subplots(max(1, len(shown)), 1, squeeze=False)[:, 0]
    for ax, (name, series) in zip(axes, shown.items(), strict=False):
        for label, values in series.items():
            ax.plot(range(1, len(values) + 1), [float("nan") if v is None else float(v) for v in values], label=label)
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("epoch")
    if title:
        fig.suptitle(title)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return path


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (data-augmentation workers are seeded by their library)."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - libraries (nnU-Net's augmentation) draw from the legacy global state
    torch.manual_seed(seed)


@dataclass(frozen=True, slots=True)
class DistributedEnv:
    """This process's place in a DDP job (``torchrun`` sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistributedEnv:
        """Read the ``torchrun`` variables (absent → a single process)."""
        env = os.environ if environ is None else environ
        world = int(env.get("WORLD_SIZE", "1"))
        return cls(rank=int(env.get("RANK", "0")), local_rank=int(env.get("LOCAL_RANK", "0")), world_size=world)


def init_distributed(env: DistributedEnv, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, Gloo on the CPU) and return this rank's device.

    ``MASTER_ADDR``/``MASTER_PORT`` come from ``torchrun`` or from :func:`spawn`.
    """
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return device


def find_free_port() -> int:
    """A free TCP port on this host (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(function: Callable[..., Any], world_size: int, args: tuple[Any, ...] = ()) -> None:
    """Run ``function(rank, *args)`` in ``world_size`` processes on this host with the DDP variables set.

    Each process sees ``RANK = LOCAL_RANK = rank`` and ``WORLD_SIZE``, so :meth:`DistributedEnv.from_env` and
    :func:`init_distributed` work the same as under ``torchrun``.
    """
    import torch.multiprocessing as mp

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(find_free_port()))
    mp.spawn(_spawned, args=(function, world_size, args), nprocs=world_size, join=True)


def _spawned(rank: int, function: Callable[..., Any], world_size: int, args: tuple[Any, ...]) -> None:
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size)})
    if rank != 0:  # one console: the other ranks only log warnings
        logging.getLogger("medmamba").setLevel(logging.WARNING)
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    function(rank, *args)


# --- a plain epoch loop for engines that own their data (registration, video) ---------------------------------------


class CosineLR:
    """Cosine annealing ``lr = min_lr + (initial_lr − min_lr) · (1 + cos(π t / T)) / 2`` over the run (Vivim's).

    PyTorch's ``CosineAnnealingLR`` with ``T_max`` = the run, but stateless like :class:`PolyLR`, so a resumed run
    continues on the same curve. Same arguments as :class:`PolyLR`, with ``min_lr`` instead of the exponent.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        initial_lr: float,
        num_epochs: int,
        iterations_per_epoch: int = 1,
        *,
        per_iteration: bool = False,
        min_lr: float = 0.0,
    ) -> None:
        self.optimizer, self.initial_lr, self.min_lr = optimizer, initial_lr, min_lr
        self.per_iteration, self.iterations_per_epoch = per_iteration, iterations_per_epoch
        self.total = num_epochs * (iterations_per_epoch if per_iteration else 1)

    def lr_at(self, epoch: int, iteration: int = 0) -> float:
        """The learning rate at ``(epoch, iteration)``."""
        t = epoch * self.iterations_per_epoch + iteration if self.per_iteration else epoch
        return (
            self.min_lr
            + (self.initial_lr - self.min_lr) * (1 + math.cos(math.pi * min(t, self.total) / self.total)) / 2
        )

    def step(self, epoch: int, iteration: int = 0) -> None:
        """Set every param group's lr to :meth:`lr_at`."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(epoch, iteration)


class ConstantLR(CosineLR):
    """A constant learning rate (MambaMorph's Adam without schedule), with the schedules' interface."""

    def lr_at(self, epoch: int, iteration: int = 0) -> float:
        """Always ``initial_lr``."""
        return self.initial_lr


def make_optimizer(
    name: str, params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.0, momentum: float = 0.99
) -> torch.optim.Optimizer:
    """``"sgd"`` (momentum, Nesterov; nnU-Net), ``"adamw"`` or ``"adam"`` (L2 weight decay; MambaMorph, Vivim)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr, momentum=momentum, nesterov=True, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'sgd', 'adamw' or 'adam', got {name!r}")


def make_lr_schedule(
    kind: str,
    optimizer: torch.optim.Optimizer,
    *,
    initial_lr: float,
    num_epochs: int,
    iterations_per_epoch: int = 1,
    per_iteration: bool = False,
    exponent: float = 0.9,
    min_lr: float = 0.0,
) -> PolyLR | CosineLR:
    """The schedule ``kind`` (``"poly"``, ``"cosine"`` or ``"constant"``); each has ``lr_at`` and ``step``."""
    if kind == "poly":
        return PolyLR(
            optimizer, initial_lr, num_epochs, iterations_per_epoch, per_iteration=per_iteration, exponent=exponent
        )
    cls = {"cosine": CosineLR, "constant": ConstantLR}.get(kind)
    if cls is None:
        raise ValueError(f"lr schedule must be 'poly', 'cosine' or 'constant', got {kind!r}")
    return cls(optimizer, initial_lr, num_epochs, iterations_per_epoch, per_iteration=per_iteration, min_lr=min_lr)


#: resume order: the last epoch's checkpoint, else the finished run's
RESUME_CHECKPOINTS = ("checkpoint_latest.pth", "checkpoint_final.pth")


def prepare_run_folder(
    folder: str | os.PathLike[str], *, resume: bool, overwrite: bool, names: Sequence[str] = RESUME_CHECKPOINTS
) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to start over a trained run by accident.

    Raises:
        UsageError: the folder holds a checkpoint and neither ``resume`` nor ``overwrite`` is set, or both are.
    """
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run, or start afresh")
    found = find_resume_checkpoint(folder, names)
    if not resume:
        if found is not None and not overwrite:
            raise UsageError(
                f"{folder}: holds a trained or running model ({found.name}). Pass --resume to continue it or "
                "--overwrite to start afresh"
            )
        return None
    if found is None:
        logger.warning("%s: no checkpoint to resume from; starting a new run", folder)
    return found


def check_resume_recipe(saved: Mapping[str, Any], wanted: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """A resumed run keeps its recipe: ``wanted`` (the recipe with this call's overrides) must equal ``saved``.

    Raises:
        UsageError: naming the fields that differ.
    """
    changed = {k: v for k, v in wanted.items() if saved.get(k) != v}
    if changed:
        raise UsageError(
            f"{path}: --resume continues the run with its own recipe, but {changed} differs from it "
            f"({ {k: saved.get(k) for k in changed} }). Drop those options, or start a new run with --overwrite"
        )


@dataclass(slots=True)
class LoopState:
    """Where a run of :func:`run_epochs` stands: epochs done, per-epoch history, best selection value."""

    epoch: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    best: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Checkpoint-friendly dict."""
        return {"epoch": self.epoch, "history": {k: list(v) for k, v in self.history.items()}, "best": self.best}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoopState:
        """Inverse of :meth:`to_dict`."""
        history = {str(k): [float(x) for x in v] for k, v in dict(data.get("history", {})).items()}
        best = data.get("best")
        return cls(epoch=int(data.get("epoch", 0)), history=history, best=None if best is None else float(best))


@dataclass(kw_only=True, slots=True)
class EpochLoop:
    """The epoch loop of the registration and video engines: step, AMP, validation, checkpoints, log, curves, DDP.

    The engine supplies the data and the loss; everything else is the same for every task:

    * per iteration: LR (per-iteration schedules), ``compute_loss(model, next(batches))`` under autocast, backward
      (through a ``GradScaler`` for fp16), optional gradient-norm clip, optimiser step; a non-finite loss skips the
      step with a warning;
    * per epoch: the means of the loss terms (``train_<term>``), ``validate(network)`` under ``no_grad`` and
      autocast (its values go into the history as given, e.g. ``val_loss``, ``val_dice``), the LR; one log line;
      ``checkpoint_latest.pth`` every epoch, ``checkpoint_best.pth`` when ``select`` improves, ``progress.png``;
    * at the end ``checkpoint_final.pth``. Checkpoints hold ``static`` (network name, channels, recipe, model
      description), the weights, the optimiser and scaler states and the :class:`LoopState`.

    Under DDP (:class:`DistributedEnv` active) the network is wrapped in ``DistributedDataParallel``; each rank draws
    its own batches, rank 0 validates, logs and writes.

    Args:
        network: the bare network (its ``state_dict`` is saved).
        step_module: the module ``compute_loss`` calls, when the loss needs more than ``network.forward`` (a module
            holding the network and computing the whole loss in its ``forward``, so DDP sees the step); default:
            the network.
        compute_loss: ``(model, batch) → (loss, {term: value})``; ``model`` is ``step_module`` (or the network),
            inside ``DistributedDataParallel`` when distributed.
        batches: an endless iterator of batches already on the device.
        validate: ``network → {name: value}`` or None.
        optimizer, schedule: from :func:`make_optimizer` / :func:`make_lr_schedule`.
        per_iteration: the schedule advances per iteration (else per epoch).
        num_epochs, iterations_per_epoch: the run's length.
        amp: the mixed-precision policy (:func:`amp_policy`).
        device: where the network lives.
        folder: the run folder (checkpoints, ``progress.png``).
        static: keys stored in every checkpoint (``network``, ``in_channels``, ``out_channels``, ``recipe`` …).
        select: ``(history key, "min" | "max")`` that picks ``checkpoint_best.pth``; falls back to ``train_loss``
            (min) while the key is absent (no validation data).
        grad_clip: max gradient norm, or None.
        find_unused_parameters: DDP's flag, for networks with parameters a step may not use.
        dist_env: this process's DDP place.
        title: the curves' title.
    """

    network: torch.nn.Module
    step_module: torch.nn.Module | None = None
    compute_loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, Mapping[str, float]]]
    batches: Iterator[Any]
    validate: Callable[[torch.nn.Module], Mapping[str, float]] | None
    optimizer: torch.optim.Optimizer
    schedule: PolyLR | CosineLR
    per_iteration: bool
    num_epochs: int
    iterations_per_epoch: int
    amp: AmpPolicy
    device: torch.device
    folder: Path
    static: Mapping[str, Any]
    select: tuple[str, str] = ("val_loss", "min")
    grad_clip: float | None = None
    find_unused_parameters: bool = False
    dist_env: DistributedEnv = field(default_factory=DistributedEnv)
    title: str = ""
    grad_scaler: torch.GradScaler | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.grad_scaler = torch.GradScaler("cuda") if self.amp.grad_scaler else None

    def restore(self, checkpoint: Mapping[str, Any], path: str | os.PathLike[str]) -> LoopState:
        """Load weights, optimiser and scaler states from a checkpoint of this loop; returns its state."""
        from medmamba.engines.checkpoint import load_weights

        load_weights(self.network, checkpoint["network_weights"], path)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        return LoopState.from_dict(checkpoint.get("loop_state", {}))

    def run(self, state: LoopState | None = None) -> LoopState:
        """Train from ``state`` (a fresh run when None) to ``num_epochs``; returns the final state."""
        state = state or LoopState()
        if self.dist_env.rank == 0:
            self.folder.mkdir(parents=True, exist_ok=True)
        model: torch.nn.Module = self.step_module if self.step_module is not None else self.network
        if self.dist_env.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            model = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=self.find_unused_parameters)
        durations: list[float] = []
        for epoch in range(state.epoch, self.num_epochs):
            started = time.perf_counter()
            if not self.per_iteration:
                self.schedule.step(epoch)
            lr = self.optimizer.param_groups[0]["lr"]
            terms = self._train_epoch(model, epoch, state, durations)
            values = {f"train_{k}": v for k, v in terms.items()}
            if self.validate is not None and self.dist_env.rank == 0:
                self.network.eval()
                with torch.no_grad(), self._autocast():
                    values.update({k: float(v) for k, v in self.validate(self.network).items()})
            values["lr"] = lr
            for key, value in values.items():
                state.history.setdefault(key, []).append(float(value))
            state.epoch = epoch + 1
            improved = self._improved(state, values)
            durations.append(time.perf_counter() - started)
            if self.dist_env.rank == 0:
                self._save("checkpoint_latest.pth", state)
                if improved:
                    self._save("checkpoint_best.pth", state)
                self._plot(state)
                self._log(epoch, values, durations, improved)
        if self.dist_env.rank == 0:
            self._save("checkpoint_final.pth", state)
            (self.folder / "checkpoint_latest.pth").unlink(missing_ok=True)
        return state

    def _train_epoch(
        self, model: torch.nn.Module, epoch: int, state: LoopState, durations: list[float]
    ) -> dict[str, float]:
        model.train()
        sums: dict[str, float] = {}
        count = 0
        losses = state.history.get("train_loss", [])
        eta = float(np.mean(durations)) * (self.num_epochs - epoch) if durations else float("nan")
        steps = epoch_progress(
            range(self.iterations_per_epoch),
            epoch=epoch,
            num_epochs=self.num_epochs,
            total=self.iterations_per_epoch,
            last_loss=losses[-1] if losses else None,
            eta_s=eta,
        )
        for iteration in steps:
            if self.per_iteration:
                self.schedule.step(epoch, iteration)
            self.optimizer.zero_grad(set_to_none=True)
            with self._autocast():
                loss, terms = self.compute_loss(model, next(self.batches))
            if not torch.isfinite(loss.detach()):
                logger.warning("epoch %d, iteration %d: non-finite loss %s; step skipped", epoch + 1, iteration, loss)
                continue
            if self.grad_scaler is not None:
                self.grad_scaler.scale(loss).backward()
                self.grad_scaler.unscale_(self.optimizer)
                self._clip()
                self.grad_scaler.step(self.optimizer)
                self.grad_scaler.update()
            else:
                loss.backward()
                self._clip()
                self.optimizer.step()
            for key, value in {"loss": float(loss.detach()), **terms}.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            count += 1
        return {k: v / max(count, 1) for k, v in sums.items()} if count else {"loss": float("nan")}

    def _clip(self) -> None:
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp.dtype)

    def _improved(self, state: LoopState, values: Mapping[str, float]) -> bool:
        key, mode = self.select if self.select[0] in values else ("train_loss", "min")
        value = values.get(key, float("nan"))
        if not math.isfinite(value):
            return False
        better = state.best is None or (value > state.best if mode == "max" else value < state.best)
        if better:
            state.best = value
        return better

    def _save(self, name: str, state: LoopState) -> None:
        from medmamba.engines.checkpoint import save_checkpoint

        save_checkpoint(
            self.folder / name,
            {
                **self.static,
                "network_weights": self.network.state_dict(),
                "optimizer_state": self.optimizer.state_dict(),
                "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
                "loop_state": state.to_dict(),
                "current_epoch": state.epoch,
            },
        )

    def _plot(self, state: LoopState) -> None:
        history = state.history
        losses = {k: v for k, v in history.items() if k.endswith("loss")}
        terms = {k: v for k, v in history.items() if k.startswith("train_") and k not in losses}
        validation = {k: v for k, v in history.items() if k.startswith("val_") and k not in losses}
        panels = {"loss": losses, "loss terms": terms, "validation": validation, "learning rate": {"lr": history["lr"]}}
        plot_curves(panels, self.folder / "progress.png", title=self.title)

    def _log(self, epoch: int, values: Mapping[str, float], durations: list[float], improved: bool) -> None:
        remaining = float(np.mean(durations)) * (self.num_epochs - epoch - 1)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "lr")
        logger.info(
            "epoch %d/%d: %s, lr %.2e, %.1f s, ETA %s%s",
            epoch + 1,
            self.num_epochs,
            shown,
            values["lr"],
            durations[-1],
            format_seconds(remaining),
            ", new best" if improved else "",
        )
