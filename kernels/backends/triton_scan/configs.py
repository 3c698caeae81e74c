"""Block sizes and launch settings of the Triton scan, per pass.

``BLOCK_T`` tokens per chunk (the tokens a thread holds at once; the backward works in halves of it), ``SUB``
channels per program (one thread each; they share the B/C loads, and the backward sums dB/dC over them),
``num_warps``, ``fill`` (programs in flight). Values were picked on an H100/H200 with ``benchmarks/scan_gpu.py``;
tests shrink them through :func:`override` to exercise chunking, segments and sub-blocks on tiny inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["PassConfig", "backward_config", "forward_config", "override", "target_programs"]


@dataclass(frozen=True)
class PassConfig:
    """Launch settings of one pass (forward or backward).

    Attributes:
        block_t: tokens per chunk, a power of two; lowered to the next power of two ≥ L for short sequences,
            never below 16. The backward uses the forward's value (it restarts from the forward's chunk states).
        sub: channels per program (one thread each), a power of two; rounded down to one that divides the
            channels per group.
        num_warps: warps per program.
        segments: force this many segments per row (``None``: choose from the GPU's size).
        fill: cut segments until about ``fill`` × :func:`target_programs` programs run (small programs need
            more of them in flight to hide memory latency).
        maxnreg: cap on registers per thread (``None``: the compiler's choice).
    """

    block_t: int = 128
    sub: int = 2
    num_warps: int = 8
    segments: int | None = None
    fill: int = 1
    maxnreg: int | None = None


_FORWARD = PassConfig(block_t=16, sub=32, num_warps=1, fill=8)
_BACKWARD = PassConfig(block_t=16, sub=32, num_warps=1, fill=8)
_overrides: list[dict[str, PassConfig]] = []


def _pick(kind: str, default: PassConfig, L: int) -> PassConfig:
    cfg = default
    for o in reversed(_overrides):
        if kind in o:
            cfg = o[kind]
            break
    block_t = max(16, min(cfg.block_t, 1 << max(0, (L - 1).bit_length())))
    return dataclasses.replace(cfg, block_t=block_t)


def forward_config(L: int) -> PassConfig:
    """Settings of the forward passes for sequences of length ``L``."""
    return _pick("forward", _FORWARD, L)


def backward_config(L: int) -> PassConfig:
    """Settings of the backward passes for sequences of length ``L``."""
    return _pick("backward", _BACKWARD, L)


@contextlib.contextmanager
def override(forward: PassConfig | None = None, backward: PassConfig | None = None) -> Iterator[None]:
    """Use other settings inside the block (tests, benchmark sweeps)."""
    entry = {k: v for k, v in (("forward", forward), ("backward", backward)) if v is not None}
    _overrides.append(entry)
    try:
        yield
    finally:
        _overrides.remove(entry)


def target_programs(device: torch.device) -> int:
    """Programs that fill the device about once: two resident 8-warp programs per SM."""
    if device.type != "cuda":
        return 8
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count
