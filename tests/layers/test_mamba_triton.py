"""MambaLayer on the Triton backend: the same results as on the torch backend, and no permuted copy of the
feature map anywhere on its path (under TRITON_INTERPRET=1 on the CPU; at a real size on the GPU)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import medmamba.kernels.conv as kconv
from medmamba.kernels import RASTER, REVERSED, SLICE, use_backend
from medmamba.layers import MambaLayer
from tests.helpers import layer_output_and_grads as run

SEGMAMBA = (RASTER, REVERSED, SLICE)


def test_layer_on_triton_matches_torch_backend():
    torch.manual_seed(0)
    layer = MambaLayer(8, orders=SEGMAMBA, d_state=4, residual=True)
    x = torch.randn(1, 8, 2, 3, 5)
    got, g_got = run(layer, x, "triton")
    want, g_want = run(layer, x, "torch")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(b.abs().max().item(), 1.0))


def _memory_order(t: torch.Tensor) -> tuple[int, ...]:
    """The axes of ``t`` from the slowest to the fastest in memory (axes of size one left out)."""
    axes = [d for d in range(t.ndim) if t.shape[d] > 1]
    return tuple(sorted(axes, key=lambda d: -t.stride(d)))


class PermutedCopies(TorchDispatchMode):
    """Records the shapes of copies (clone, copy_, _to_copy) whose source lies in another axis order than their
    output: a transposed or permuted copy, forward or backward (autograd's C++ included)."""

    def __init__(self, min_numel: int) -> None:
        super().__init__()
        self.min_numel, self.shapes = min_numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        packet = func.overloadpacket
        src = args[1] if packet is torch.ops.aten.copy_ else args[0] if args else None
        if (
            packet in (torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy)
            and isinstance(src, torch.Tensor)
            and src.numel() >= self.min_numel
            and src.shape == out.shape
            and _memory_order(src) != _memory_order(out)
        ):
            self.shapes.append(tuple(out.shape))
        return out


def test_layer_path_makes_no_permuted_copies(monkeypatch):
    # On the triton path nothing reorders the map: no order-sequence layout, permute or flip, and no copy in another
    # axis order (a transpose made contiguous), forward or backward. GEMMs take transposed views of their operands.
    def forbidden(*args, **kwargs):
        raise AssertionError("a permuted copy was made on the triton path")

    layer = MambaLayer(8, orders=SEGMAMBA, d_state=4)
    x = torch.randn(1, 8, 2, 3, 4, requires_grad=True)
    monkeypatch.setattr(kconv, "to_sequence", forbidden)
    for name in ("permute", "flip", "movedim"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "flip", forbidden)
    with use_backend("triton"), PermutedCopies(min_numel=x.numel()) as copies:
        layer(x).sum().backward()
    assert copies.shapes == []
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_permuted_copies_are_seen():
    # the detector of the test above: a transposed map made contiguous is caught, a row slice's copy is not
    x = torch.randn(2, 8, 24)
    with PermutedCopies(min_numel=x.numel()) as copies:
        x.transpose(1, 2).contiguous()
        torch.empty(2, 8, 30)[:, :, :24].copy_(x)
    assert copies.shapes == [(2, 24, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("orders", "spatial", "ssm_fp32"),
    [
        (SEGMAMBA, (12, 16, 20), True),
        (SEGMAMBA, (12, 16, 20), False),
        # 32³ reaches PassConfig.split_min_length: the orders run as groups (grouped_backward)
        (SEGMAMBA, (32, 32, 32), False),
        # one order (U-Mamba, MambaMorph): the squeezed (B, 1, ...) path
        ((RASTER,), (12, 16, 20), True),
    ],
    ids=["segmamba-fp32", "segmamba-bf16", "segmamba-groups-bf16", "one-order-fp32"],
)
def test_gpu_layer_triton_matches_torch_backend(orders, spatial, ssm_fp32):
    torch.manual_seed(0)
    layer = MambaLayer(48, orders=orders, residual=True, ssm_fp32=ssm_fp32).cuda()
    x = torch.randn(2, 48, *spatial, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, g_got = run(layer, x, "triton")
        want, g_want = run(layer, x, "torch")
    tol = 2e-2 if ssm_fp32 else 5e-2  # in/out projections run in bf16 either way
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol * want.abs().max().item())
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(b.abs().max().item(), 1e-3))


@pytest.mark.gpu
def test_gpu_layer_runs_as_cuda_graphs_under_make_graphed_callables():
    # the small stages are host-bound: capturing a layer's forward and backward as CUDA graphs
    # (torch.cuda.make_graphed_callables) replays its kernels with no Python between them; same results as eager
    import copy

    torch.manual_seed(0)
    eager = MambaLayer(32, orders=SEGMAMBA, residual=True).cuda()
    layer = copy.deepcopy(eager)
    sample = torch.randn(2, 32, 8, 12, 16, device="cuda", requires_grad=True)
    with use_backend("triton"):
        graphed = torch.cuda.make_graphed_callables(layer, (sample,))
        for _ in range(2):
            # grads set to None each step, as with an optimizer (a graphed backward's gradients live in the graph's
            # memory, so accumulating over replays is not what it does)
            layer.zero_grad(set_to_none=True)
            eager.zero_grad(set_to_none=True)
            x, gy = torch.randn_like(sample), torch.randn_like(sample)
            a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
            out = graphed(a)
            out.backward(gy)
            want = eager(b)
            want.backward(gy)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
            for p, q in zip(layer.parameters(), eager.parameters(), strict=True):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * max(q.grad.abs().max().item(), 1.0))


def test_single_order_layer_backward_fills_and_copies_no_map():
    # a one-order layer (U-Mamba, MambaMorph) hands the scan its (B, 1, ...) tensors squeezed: indexing them ([:, 0])
    # made autograd fill a zero map and copy the gradient into it for u, Δ, B and C in every backward
    from tests.helpers import OpOutputs

    torch.manual_seed(0)
    layer = MambaLayer(8, d_state=4, residual=True)
    x = torch.randn(2, 8, 4, 4, 6, requires_grad=True)
    ops = (torch.ops.aten.select_backward, torch.ops.aten.zeros, torch.ops.aten.zero_, torch.ops.aten.copy_)
    with use_backend("triton"):
        out = layer(x)
        with OpOutputs(ops) as made:
            out.square().sum().backward()
    map_numel = 2 * layer.d_inner * 4 * 4 * 6  # u's and Δ's size
    assert [s for s in made.shapes if len(s) > 1 and math.prod(s) >= map_numel] == []
    # B's and C's gradients neither (only their rows of x_proj's output gradient, copied there when the scan's dB
    # and dC are its fp32 partials: one channel block here)
    assert {s for s in made.shapes if len(s) > 1 and math.prod(s) >= 2 * 4 * 96} <= {(2, 1, 4, 96)}
    assert x.grad is not None and torch.isfinite(x.grad).all()
