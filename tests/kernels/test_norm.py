"""channel_layer_norm: LayerNorm over the channel axis of a channels-first map, against nn.LayerNorm in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medmamba.kernels import ScanInputError, channel_layer_norm
from tests.helpers import generator


def reference(x, weight, bias, eps):
    """nn.LayerNorm over the channels of a transposed float64 copy, transposed back."""
    norm = nn.LayerNorm(x.shape[1], eps=eps, elementwise_affine=weight is not None, dtype=torch.float64)
    with torch.no_grad():
        if weight is not None:
            norm.weight.copy_(weight)
            norm.bias.copy_(bias)
    return norm(x.movedim(1, -1)).movedim(-1, 1), norm


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize(
    ("shape", "affine", "dtype"),
    [
        ((2, 12, 5, 7, 9), True, torch.float32),  # 315 voxels: two tiles of 256
        ((3, 5, 40), True, torch.float32),  # 5 channels: padded to 8
        ((2, 6, 4, 4), False, torch.float32),
        ((2, 8, 33), True, torch.bfloat16),
    ],
    ids=["3d-two-tiles", "1d-odd-channels", "no-affine", "bf16"],
)
def test_channel_layer_norm_matches_nn_layer_norm(backend, shape, affine, dtype):
    g = generator(31)
    x64 = (3 * torch.randn(shape, generator=g, dtype=torch.float64) + 1).requires_grad_()
    w64 = (1 + 0.3 * torch.randn(shape[1], generator=g, dtype=torch.float64)).requires_grad_() if affine else None
    b64 = (0.2 * torch.randn(shape[1], generator=g, dtype=torch.float64)).requires_grad_() if affine else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    xin = x64.detach().to(dtype).requires_grad_()
    win = w64.detach().float().requires_grad_() if affine else None
    bin_ = b64.detach().float().requires_grad_() if affine else None
    got = channel_layer_norm(xin, win, bin_, 1e-5, backend=backend)
    assert got.shape == shape and got.dtype == torch.float32
    # against nn.LayerNorm on the same (rounded) input
    x_ref = x64.detach().to(dtype).double().requires_grad_()
    want, norm = reference(x_ref, w64.detach() if affine else None, b64.detach() if affine else None, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 1e-4
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    ref_leaves = [x_ref] + ([norm.weight, norm.bias] if affine else [])
    g_want = torch.autograd.grad((want * dy).sum(), ref_leaves)
    got_leaves = [xin] + ([win, bin_] if affine else [])
    g_got = torch.autograd.grad((got * dy.float()).sum(), got_leaves)
    assert g_got[0].dtype == dtype
    for a, e in zip(g_got, g_want, strict=True):
        gtol = 10 * tol if a.dtype == torch.float32 else 1.6e-2  # dx is rounded to the input's dtype
        torch.testing.assert_close(a.double(), e, rtol=gtol, atol=gtol * max(e.abs().max().item(), 1.0))


def test_channel_layer_norm_names_a_bad_argument():
    x = torch.randn(2, 6, 5)
    with pytest.raises(ScanInputError, match="weight must be \\(6,\\)"):
        channel_layer_norm(x, torch.ones(5), None)
    with pytest.raises(ScanInputError, match="x must be"):
        channel_layer_norm(torch.randn(6), None, None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_channel_layer_norm_matches_torch_path(dtype):
    # SegMamba's stage-0 norm at a real size: 48 channels, 32³ voxels
    g = torch.Generator(device="cuda").manual_seed(32)
    x = (2 * torch.randn(2, 48, 32, 32, 32, device="cuda", generator=g) + 1).to(dtype).requires_grad_()
    w = (1 + 0.3 * torch.randn(48, device="cuda", generator=g)).requires_grad_()
    b = (0.2 * torch.randn(48, device="cuda", generator=g)).requires_grad_()
    dy = torch.randn(x.shape, device="cuda", generator=g)
    out = {}
    for backend in ("torch", "triton"):
        y = channel_layer_norm(x, w, b, 1e-5, backend=backend)
        out[backend] = (y, *torch.autograd.grad((y * dy).sum(), (x, w, b)))
    for got, want in zip(out["triton"], out["torch"], strict=True):
        tol = 1e-4 if got.dtype == torch.float32 else 1.6e-2
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * max(want.abs().max().item(), 1.0))
