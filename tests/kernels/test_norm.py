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


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_out_dtype_is_the_fp32_result_rounded_once_and_its_gradient_flows_back(backend):
    # MambaLayer under autocast asks for the autocast dtype: the same values as the fp32 output cast afterwards,
    # and the gradient of a bf16 output comes back to an fp32 input as that of the cast fp32 output does
    g = generator(7)
    x = (2 * torch.randn(2, 12, 5, 7, generator=g) + 1).requires_grad_()
    w = (1 + 0.3 * torch.randn(12, generator=g)).requires_grad_()
    b = (0.2 * torch.randn(12, generator=g)).requires_grad_()
    dy = torch.randn(x.shape, generator=g).bfloat16()
    got = channel_layer_norm(x, w, b, 1e-5, out_dtype=torch.bfloat16, backend=backend)
    ref = channel_layer_norm(x, w, b, 1e-5, backend=backend)
    assert got.dtype == torch.bfloat16 and ref.dtype == torch.float32
    # within one bf16 step (Triton's interpreter truncates to bf16, the GPU rounds to nearest: the GPU test checks
    # that the values are ref's rounded)
    torch.testing.assert_close(got.float(), ref.detach(), rtol=2**-7, atol=1e-6)
    g_got = torch.autograd.grad((got * dy).float().sum(), (x, w, b))
    g_ref = torch.autograd.grad((ref.bfloat16() * dy).float().sum(), (x, w, b))
    assert g_got[0].dtype == torch.float32
    for a, e in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    with pytest.raises(ScanInputError, match="out_dtype"):
        channel_layer_norm(x, w, b, out_dtype=torch.int32, backend=backend)


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
    # the autocast dtype written directly: the fp32 output rounded, and the same gradients (the two specialisations'
    # fp32 values may differ in their last bits, which moves a rare value to the neighbouring bf16)
    y = channel_layer_norm(x, w, b, 1e-5, out_dtype=torch.bfloat16, backend="triton")
    y32 = channel_layer_norm(x, w, b, 1e-5, backend="triton")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y32.detach(), rtol=2**-7, atol=1e-6)
    assert (y != y32.bfloat16()).float().mean().item() < 1e-3
    dyb = dy.bfloat16()
    for a, e in zip(torch.autograd.grad((y * dyb).float().sum(), (x, w, b)),
                    torch.autograd.grad((y32.bfloat16() * dyb).float().sum(), (x, w, b)), strict=True):  # fmt: skip
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4 * max(e.abs().max().item(), 1.0))
