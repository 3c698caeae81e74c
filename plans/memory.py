"""Mamba-aware GPU memory model of one training step: ``estimate(network, patch, batch)`` → bytes.

nnU-Net sizes patch and batch with a proxy — the number of convolution output elements of its plain U-Net
(``compute_conv_feature_map_size``) against a reference measured for that U-Net (``plans-and-pipeline.md``
§2.4). That proxy knows nothing of Mamba layers (a token sequence of the whole feature map, projections to
``2·expand·C`` channels, per-order copies, the scan's saved inputs), so it cannot size U-Mamba or SegMamba. Here
the network is built on *fake* CUDA tensors (``torch._subclasses.FakeTensorMode``: shapes, dtypes and devices, no
storage, no GPU needed), one forward pass plus nnU-Net's loss runs under the autocast policy of training, and
every tensor autograd keeps for the backward pass is counted once (by storage), through
``torch.autograd.graph.saved_tensors_hooks``. What a step holds at its peak is then

    weights + gradients + optimizer state + saved(batch) + batch · (input + targets + backward transients)

with ``saved(batch) = fixed + batch · per_sample`` from one pass at batch 1 (the fixed part is autocast's
low-precision weight copies, recognised by their parameter shape). The selective scan is accounted as the GPU
kernel keeps it (``kernels.md``: its inputs, the pre-gate output, fp32 chunk-boundary states and, for raster and
reversed orders, the chunks' fp32 middle states; the backward recomputes the rest) rather than as the CPU backend
would, which materialises chunk intermediates.

On the device, ``torch.cuda.max_memory_allocated`` is the model's ``allocated_bytes``; the caching allocator's
slack and the CUDA context come on top (:attr:`MemoryEstimate.device_bytes`). Anchors: ``networks.md`` §10
(official SegMamba and U-Mamba_Bot-3D on an H100); ``benchmarks/plan_memory_gpu.py`` checks ours.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal
from unittest import mock

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ALLOCATOR_SLACK",
    "CONTEXT_BYTES",
    "MemoryEstimate",
    "Precision",
    "estimate",
    "saved_tensor_bytes",
]

Precision = Literal["bf16", "fp16", "fp32"]
Optimizer = Literal["sgd", "adam", "none"]

#: fraction the caching allocator reserves beyond what is allocated (networks.md §10: reserved/allocated 1.08-1.22)
ALLOCATOR_SLACK = 0.15
#: CUDA context + cuBLAS/cuDNN handles, outside the allocator's statistics
CONTEXT_BYTES = 768 * 2**20
#: tokens per chunk whose fp32 start state the GPU scan keeps for its backward, ``(B, K, C, L / chunk, N)``: the
#: forward ``block_t`` of ``kernels/backends/triton_scan/configs.py`` (16; plans may not import a backend)
SCAN_CHUNK = 16
#: optimizer state per parameter, in parameter copies (nnU-Net: SGD with momentum; Adam(W): two moments)
_OPTIMIZER_COPIES = {"sgd": 1, "adam": 2, "none": 0}
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True, kw_only=True, slots=True)
class MemoryEstimate:
    """What one training step of a network holds on the GPU, in bytes.

    Attributes:
        patch_size: the spatial input size the estimate is for.
        batch_size: the batch it is for.
        parameters: number of trainable parameters.
        weight_bytes: fp32 weights. gradient_bytes: fp32 gradients. optimizer_bytes: optimizer state.
        saved_fixed_bytes: batch-independent tensors kept for backward (autocast's weight copies).
        saved_bytes_per_sample: tensors kept for backward, per sample (activations, the scan's saved set, loss).
        data_bytes_per_sample: the input patch and its deep-supervision targets on the device.
        transient_bytes_per_sample: gradient buffers alive at once during backward (twice the largest saved map).
    """

    patch_size: tuple[int, ...]
    batch_size: int
    parameters: int
    weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    saved_fixed_bytes: int
    saved_bytes_per_sample: int
    data_bytes_per_sample: int
    transient_bytes_per_sample: int

    @property
    def fixed_bytes(self) -> int:
        """Everything that does not grow with the batch."""
        return self.weight_bytes + self.gradient_bytes + self.optimizer_bytes + self.saved_fixed_bytes

    @property
    def bytes_per_sample(self) -> int:
        """What each sample of the batch adds."""
        return self.saved_bytes_per_sample + self.data_bytes_per_sample + self.transient_bytes_per_sample

    @property
    def allocated_bytes(self) -> int:
        """Peak of ``torch.cuda.max_memory_allocated`` over a training step at ``batch_size``."""
        return self.fixed_bytes + self.batch_size * self.bytes_per_sample

    @property
    def device_bytes(self) -> int:
        """GPU memory the step needs: allocated bytes plus allocator slack plus the CUDA context."""
        return device_bytes(self.allocated_bytes)

    def with_batch(self, batch_size: int) -> MemoryEstimate:
        """The same estimate at another batch size (the model is exactly linear in the batch)."""
        from dataclasses import replace

        return replace(self, batch_size=int(batch_size))

    def max_batch_size(self, budget_bytes: float) -> int:
        """The largest batch whose :attr:`device_bytes` fit ``budget_bytes`` (0 or less: not even one sample)."""
        usable = (budget_bytes - CONTEXT_BYTES) / (1 + ALLOCATOR_SLACK) - self.fixed_bytes
        batch = math.floor(usable / max(self.bytes_per_sample, 1))
        # settle float rounding against the exact integer rule of device_bytes
        while batch > 0 and self.with_batch(batch).device_bytes > budget_bytes:
            batch -= 1
        while self.with_batch(batch + 1).device_bytes <= budget_bytes:
            batch += 1
        return batch

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived totals."""
        return {
            "patch_size": list(self.patch_size),
            "batch_size": self.batch_size,
            "parameters": self.parameters,
            "weight_bytes": self.weight_bytes,
            "gradient_bytes": self.gradient_bytes,
            "optimizer_bytes": self.optimizer_bytes,
            "saved_fixed_bytes": self.saved_fixed_bytes,
            "saved_bytes_per_sample": self.saved_bytes_per_sample,
            "data_bytes_per_sample": self.data_bytes_per_sample,
            "transient_bytes_per_sample": self.transient_bytes_per_sample,
            "allocated_bytes": self.allocated_bytes,
            "device_bytes": self.device_bytes,
        }


def device_bytes(allocated_bytes: float) -> int:
    """GPU memory needed for ``allocated_bytes`` of tensors: allocator slack and CUDA context added."""
    return int(allocated_bytes * (1 + ALLOCATOR_SLACK) + CONTEXT_BYTES)


def estimate(
    network: str | Callable[[], nn.Module],
    patch_size: Sequence[int],
    batch_size: int = 2,
    *,
    in_channels: int,
    network_kwargs: Mapping[str, Any] | None = None,
    precision: Precision = "bf16",
    optimizer: Optimizer = "sgd",
    scan: Literal["kernel", "as_run"] = "kernel",
) -> MemoryEstimate:
    """Estimate the GPU memory of one training step (forward, nnU-Net's Dice+CE loss, backward, optimizer step).

    Pure: nothing is allocated (fake tensors), nothing is read or written; a few hundred ms per call.

    Args:
        network: a registry name (built with ``medmamba.networks.build(network, **network_kwargs)``) or a
            zero-argument factory returning the module (e.g. nnunetv2's ``get_network_from_plans`` partial).
            Build it as trained, i.e. with deep supervision on where the trainer uses it.
        patch_size: spatial input size, e.g. ``(128, 128, 128)``.
        batch_size: samples per step.
        in_channels: image channels of the input.
        network_kwargs: constructor arguments when ``network`` is a name.
        precision: ``"bf16"``/``"fp16"``: autocast as nnU-Net's trainer runs it; ``"fp32"``: no autocast.
        optimizer: ``"sgd"`` (nnU-Net: momentum, one state copy), ``"adam"`` (two) or ``"none"`` (inference-like).
        scan: ``"kernel"`` counts the selective scan as the GPU kernel keeps it; ``"as_run"`` counts whatever the
            backend that actually runs keeps (for validating the counting against a CPU measurement).

    Returns:
        the estimate; ``.allocated_bytes`` and ``.device_bytes`` are the totals.

    Raises:
        ValueError: a patch size that is not positive, or a batch size below 1.
    """
    patch = tuple(int(p) for p in patch_size)
    if not patch or min(patch) < 1 or batch_size < 1:
        raise ValueError(f"patch_size must be positive and batch_size >= 1, got {patch_size} and {batch_size}")
    if precision not in ("bf16", "fp16", "fp32"):
        raise ValueError(f"precision must be 'bf16', 'fp16' or 'fp32', got {precision!r}")
    factory = _factory(network, network_kwargs)
    from torch._subclasses.fake_tensor import FakeTensorMode

    from medmamba.kernels import use_backend

    # fake tensors carry no data for a Triton kernel to read: whatever the patched stand-ins do not cover runs on
    # the torch backend, whose saved tensors are then counted as they are
    with FakeTensorMode(), _quiet(), torch.device("cuda"), use_backend("torch"):
        model = factory()
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        one = saved_tensor_bytes(model, (1, in_channels, *patch), precision=precision, scan=scan)
    n_params = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    return MemoryEstimate(
        patch_size=patch,
        batch_size=int(batch_size),
        parameters=n_params,
        weight_bytes=weight_bytes,
        gradient_bytes=weight_bytes,
        optimizer_bytes=weight_bytes * _OPTIMIZER_COPIES[optimizer],
        saved_fixed_bytes=one.fixed,
        saved_bytes_per_sample=one.total - one.fixed,
        data_bytes_per_sample=one.data_bytes,
        transient_bytes_per_sample=2 * one.largest,
    )


@dataclass(frozen=True, slots=True)
class SavedTensors:
    """What one forward pass kept for backward (bytes).

    Attributes:
        total: every saved storage, once. fixed: the part that does not grow with the batch (weight copies).
        largest: the largest batch-dependent saved tensor, per sample. count: saved storages.
        data_bytes: input and deep-supervision targets, per sample.
    """

    total: int
    fixed: int
    largest: int
    count: int
    data_bytes: int


def saved_tensor_bytes(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    precision: Precision = "bf16",
    scan: Literal["kernel", "as_run"] = "kernel",
) -> SavedTensors:
    """Run ``model`` on an input of ``input_shape`` plus nnU-Net's loss, and count what autograd keeps.

    Runs on whatever device and mode the caller set up (fake CUDA tensors in :func:`estimate`; real CPU tensors
    when validating). Each storage counts once; parameters are not counted (they are weights).

    Args:
        model: the network, in train mode.
        input_shape: ``(B, C, *S)``.
        precision: autocast dtype (``"bf16"``/``"fp16"``) or ``"fp32"``.
        scan: see :func:`estimate`.
    """
    device = next(model.parameters()).device
    params = list(model.parameters())
    counter = _SavedCounter({_storage_key(p) for p in params}, {tuple(p.shape) for p in params})
    x = torch.zeros(tuple(input_shape), device=device)
    with (
        _autocast(device, precision),
        _scan_accounting(counter, enabled=scan == "kernel"),
        torch.autograd.graph.saved_tensors_hooks(counter.pack, _unpack),
    ):
        outputs = model(x)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        targets = [torch.zeros((o.shape[0], *o.shape[2:]), dtype=torch.long, device=device) for o in outputs]
        loss = sum(_dice_ce(o, t) for o, t in zip(outputs, targets, strict=True))
    del loss
    # nnU-Net keeps the input batch and one float target per deep-supervision output on the device
    data = x.numel() * 4 + sum(t.numel() * 4 for t in targets)
    batch = int(input_shape[0])
    return SavedTensors(
        total=counter.total,
        fixed=counter.fixed,
        largest=counter.largest // batch,
        count=counter.count,
        data_bytes=data // batch,
    )


def _dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """nnU-Net's Dice + CE on one output: CE keeps log-softmax, soft Dice keeps softmax and the one-hot target."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(1)
    onehot = torch.zeros_like(probs).scatter_(1, target.unsqueeze(1), 1.0)
    axes = tuple(range(2, probs.ndim))
    dice = (2 * (probs * onehot).sum(axes) + 1e-5) / (probs.sum(axes) + onehot.sum(axes) + 1e-5)
    return ce - dice.mean()


class _SavedCounter:
    """``saved_tensors_hooks`` pack function that sums each saved storage once."""

    def __init__(self, exclude: set[int], weight_shapes: set[tuple[int, ...]]) -> None:
        self.exclude = exclude
        self.weight_shapes = weight_shapes
        self.seen: set[int] = set()
        # counted tensors stay referenced for the pass: a freed storage's address may be reused by a new one
        self.kept: list[torch.Tensor] = []
        self.total = 0
        self.fixed = 0
        self.largest = 0
        self.count = 0

    def add(self, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key in self.exclude or key in self.seen:
            return
        self.seen.add(key)
        self.kept.append(t)
        nbytes = t.untyped_storage().nbytes()
        self.total += nbytes
        self.count += 1
        if t.dtype in (torch.float16, torch.bfloat16) and tuple(t.shape) in self.weight_shapes:
            self.fixed += nbytes  # autocast's cached low-precision copy of a weight: one per step, not per sample
        else:
            self.largest = max(self.largest, nbytes)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _storage_key(t: torch.Tensor) -> int:
    # views share a storage and must count once; a fake tensor's storage has no address, so use the StorageImpl
    return t.untyped_storage()._cdata


def _factory(network: str | Callable[[], nn.Module], kwargs: Mapping[str, Any] | None) -> Callable[[], nn.Module]:
    if callable(network):
        if kwargs:
            raise ValueError("network_kwargs are for a registry name; bind them into the factory instead")
        return network
    from medmamba.networks import build

    return lambda: build(network, **dict(kwargs or {}))


@contextmanager
def _autocast(device: torch.device, precision: Precision) -> Iterator[None]:
    """Autocast as on the GPU, also for fake CUDA tensors on a machine without one.

    ``torch.autocast("cuda")`` switches itself off when no CUDA device is present; the switches below are what it
    sets, without that check.
    """
    if precision == "fp32":
        yield
        return
    kind = device.type
    previous = torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), torch.is_autocast_cache_enabled()
    torch.set_autocast_enabled(kind, True)
    torch.set_autocast_dtype(kind, _DTYPES[precision])
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled(kind, previous[0])
        torch.set_autocast_dtype(kind, previous[1])
        torch.set_autocast_cache_enabled(previous[2])


@contextmanager
def _scan_accounting(counter: _SavedCounter, *, enabled: bool) -> Iterator[None]:
    """Replace the selective scan and the causal convolution by stand-ins that record what the GPU kernels save.

    ``medmamba.layers.mamba`` is the one caller of ``selective_scan`` (style.md §0 rule 2) and of ``causal_conv``,
    so patching the names there reaches every Mamba layer of every network. Saved sets, from the triton backend's
    autograd functions: the scan keeps its inputs, the chunk-start states (and the chunks' middle states for the
    orders read in memory order) and (with a gate) the pre-gate output;
    the convolution keeps its input map and weights (the per-order views are not copies).
    """
    if not enabled:
        yield
        return
    import medmamba.layers.mamba as mamba_module

    def kernel_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, *, orders=(), merge="sum", **_: Any):
        from medmamba.kernels import ScanResult

        for t in (u, delta, A, B, C, D, z, delta_bias):
            if t is not None:
                counter.add(t)
        K = max(len(orders), 1)
        batch, channels, spatial = u.shape[0], (u.shape[2] if K > 1 else u.shape[1]), u.shape[(3 if K > 1 else 2) :]
        length, n_state = math.prod(spatial), A.shape[-1]
        # fp32 state at the start of each chunk, per order
        chunks = math.ceil(length / SCAN_CHUNK)
        counter.add(torch.empty(batch, K, channels, chunks, n_state, device=u.device))
        # and at each chunk's middle for the orders whose tokens are neighbours in memory (raster, reversed), which
        # the GPU's per-token main pass runs (PassConfig.mid_states); counted for all of them, an upper bound
        identity = tuple(range(len(spatial)))
        neighbours = sum(1 for o in orders if o.resolve(len(spatial)) == identity) if orders else 1
        if neighbours:
            counter.add(torch.empty(batch, neighbours, channels, chunks, n_state, device=u.device))
        pre_gate = torch.empty((batch, channels, *spatial), dtype=u.dtype, device=u.device)
        if z is not None:
            counter.add(pre_gate)  # the backward of the gate needs the pre-gate output
        out = pre_gate if merge == "sum" else pre_gate.unsqueeze(1).expand(-1, K, *pre_gate.shape[1:])
        # connect the output to the inputs without saving anything (a product with a scalar saves no tensor)
        return ScanResult(out + 0.0 * u.sum() * delta.sum(), None)

    def kernel_conv(x, weight, bias=None, *, orders, **_: Any):
        for t in (x, weight, bias):
            if t is not None:
                counter.add(t)
        y = torch.empty((x.shape[0], len(orders), *x.shape[1:]), dtype=x.dtype, device=x.device)
        return y + 0.0 * x.sum()

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(mamba_module, "selective_scan", kernel_scan))
        if hasattr(mamba_module, "causal_conv"):
            stack.enter_context(mock.patch.object(mamba_module, "causal_conv", kernel_conv))
        yield


@contextmanager
def _quiet() -> Iterator[None]:
    # "CUDA is not available … Disabling autocast" from the Mamba layers' fp32 islands under fake CUDA tensors
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
        warnings.filterwarnings("ignore", message=".*[Aa]utocast.*")
        yield
