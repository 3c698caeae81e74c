"""Shared checks of the Triton scan tests (test_triton_*.py): inputs in float64 and rounded copies, and the
agreement of the triton backend's outputs and every gradient with another backend's."""

from __future__ import annotations

import torch

from medmamba.kernels import selective_scan
from medmamba.kernels.backends.triton_scan import configs, layout
from medmamba.kernels.backends.triton_scan import forward as triton_forward
from medmamba.kernels.canonical import canonical_views
from tests.helpers import TOLERANCES, generator

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
P = configs.PassConfig


def make_inputs(spatial, K, *, batch=1, channels=2, N=2, groups=1, dtype=torch.float32, seed=0, z=True, D=True,
                bias=True, device="cpu"):  # fmt: skip
    """Canonical-layout inputs (K > 1 layout even for K = 1 when ``K`` is given as a tuple length) in float64,
    with the low-precision copies handed to the backend."""
    g = generator(seed)
    per_order = (batch, K, channels, *spatial) if K > 1 else (batch, channels, *spatial)
    bc = (batch, K, groups, N, *spatial) if K > 1 else (batch, groups, N, *spatial)
    kc = (K, channels) if K > 1 else (channels,)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    args = [
        rand(*per_order),
        rand(*per_order, scale=0.5),
        -(torch.rand(*kc, N, generator=g, dtype=torch.float64) * 2 + 0.3),
        rand(*bc),
        rand(*bc),
        rand(*kc) if D else None,
        rand(batch, channels, *spatial) if z else None,
        rand(*kc, scale=0.3) if bias else None,
    ]
    low = [a.to(dtype).to(device).requires_grad_() if a is not None else None for a in args]
    # the reference sees the same rounded values, in float64
    ref = [a.detach().double().cpu().requires_grad_() if a is not None else None for a in low]
    return low, ref


def weighted_grads(result, args, seed=1):
    """Gradients of a random weighting of out and last_state (weights drawn in float64, then cast)."""
    g = generator(seed)
    out, last = result
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    loss = (out * w_out).sum()
    if last is not None:
        loss = loss + (last * torch.randn(last.shape, generator=g, dtype=torch.float64).to(last)).sum()
    return torch.autograd.grad(loss, [a for a in args if a is not None])


def assert_matches_reference(low, ref, orders, *, dtype, merge="sum", softplus=True, grads=True, other="reference"):
    got = selective_scan(*low, orders=orders, merge=merge, delta_softplus=softplus, return_last_state=True,
                         backend="triton")  # fmt: skip
    want = selective_scan(*ref, orders=orders, merge=merge, delta_softplus=softplus, return_last_state=True,
                          backend=other)  # fmt: skip
    assert got.out.dtype == low[0].dtype and got.out.shape == want.out.shape
    assert got.last_state.dtype == torch.float32
    rtol, atol = TOLERANCES[dtype]
    scale = want.out.abs().max().item()
    torch.testing.assert_close(got.out.double().cpu(), want.out.detach().double().cpu(), rtol=rtol, atol=atol * scale)
    torch.testing.assert_close(got.last_state.double().cpu(), want.last_state.detach().double().cpu(), rtol=rtol,
                               atol=atol * want.last_state.abs().max().item())  # fmt: skip
    if not grads:
        return
    g_got = weighted_grads(got, low)
    g_want = weighted_grads(want, ref)
    names = [n for n, a in zip(NAMES, low, strict=True) if a is not None]
    for name, a, b, x in zip(names, g_got, g_want, [a for a in low if a is not None], strict=True):
        assert a.dtype == x.dtype and a.shape == x.shape, name
        # atol scales with the gradient's size, never below the dtype's own (an exactly-zero reference gradient
        # must still allow rounding noise)
        bound = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=rtol, atol=atol * bound,
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")  # fmt: skip


def forward_launch(low, orders, *, save: bool, merge: str = "sum"):
    """The forward's launch settings for ``low`` under the current settings (configs.override), derived as a call
    would derive them (triton_scan.scan's inputs, forward._launch_settings) but without running a kernel: for tests
    of decisions alone."""
    u, delta, A, B, C, D, z, bias = canonical_views(*low, orders)
    u, delta, B, C, z = layout.natural_inputs(u, delta, B, C, z)
    return triton_forward._launch_settings(u, delta, A, B, C, D, z, bias, tuple(orders), True, merge, save,
                                           configs.forward_config(), None)  # fmt: skip
