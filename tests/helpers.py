"""Shared test helpers: tolerances per dtype and seeded input builders."""

from __future__ import annotations

import torch

#: (rtol, atol) against a float64 reference, per input dtype; bf16/fp16 carry input rounding (8/11 mantissa bits)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}


def generator(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator."""
    return torch.Generator().manual_seed(seed)
