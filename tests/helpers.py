"""Shared test helpers: tolerances per dtype, seeded input builders and a recorder of the ATen ops a block runs."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class OpOutputs(TorchDispatchMode):
    """``with OpOutputs(ops) as rec:`` records the output shape of every call of the given ATen overload packets
    (e.g. ``torch.ops.aten.sum``) inside the block, autograd's backward included, in ``rec.shapes``."""

    def __init__(self, ops) -> None:
        super().__init__()
        self.ops = tuple(ops)
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in self.ops:
            self.shapes.append(tuple(out.shape))
        return out


def layer_output_and_grads(layer: torch.nn.Module, x: torch.Tensor, backend: str) -> tuple[torch.Tensor, tuple]:
    """``layer(x)`` on a scan backend and the gradients of ``Σ out²`` for x and every parameter."""
    from medmamba.kernels import use_backend

    x = x.detach().requires_grad_()
    with use_backend(backend):
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    return out, grads
