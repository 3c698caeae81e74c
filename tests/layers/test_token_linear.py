"""channel_linear / order_linear: MambaLayer's four linears, their weight gradient summed over pieces of the tokens."""

from __future__ import annotations

import math

import pytest
import torch

from medmamba.layers import token_linear
from medmamba.layers.token_linear import channel_linear, order_projections
from tests.helpers import OpOutputs


def _grads(y, leaves, seed=0):
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad((y.double() * weight).sum(), leaves)


@pytest.mark.parametrize("length", [7, 8, 13, 16])  # one product; two whole pieces; pieces and a tail; four pieces
def test_channel_linear_matches_float64_einsum_whole_and_in_pieces(monkeypatch, length):
    monkeypatch.setattr(token_linear, "PIECE", 4)
    g = torch.Generator().manual_seed(length)
    linear = torch.nn.Linear(5, 7).double()
    x = torch.randn(3, 5, length, generator=g, dtype=torch.float64, requires_grad=True)
    y = channel_linear(linear, x)
    want = torch.einsum("oi,bil->bol", linear.weight, x) + linear.bias[:, None]
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    got, expected = _grads(y, [x, linear.weight, linear.bias]), _grads(want, [x, linear.weight, linear.bias])
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _projections_float64(u, x_weight, dt_weight):
    R, O = dt_weight.shape[-1], x_weight.shape[1]
    N = (O - R) // 2
    x_dbl = torch.einsum("koi,bkil->bkol", x_weight, u)
    return u, torch.einsum("kdr,bkrl->bkdl", dt_weight, x_dbl[:, :, :R]), x_dbl[:, :, R : R + N], x_dbl[:, :, R + N :]


@pytest.mark.parametrize(
    ("K", "R", "N", "length"),
    [(3, 3, 4, 16), (1, 3, 4, 13), (2, 8, 2, 7), (3, 3, 1, 16)],  # padded to 8, 8, none, all 5 rows of x_proj
)
def test_order_projections_match_float64_einsum(monkeypatch, K, R, N, length):
    monkeypatch.setattr(token_linear, "PIECE", 4)
    g = torch.Generator().manual_seed(length + K)
    I = 6
    x_weight = torch.randn(K, R + 2 * N, I, generator=g, dtype=torch.float64, requires_grad=True)
    dt_weight = torch.randn(K, I, R, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, K, I, length, generator=g, dtype=torch.float64, requires_grad=True)
    leaves = [u, x_weight, dt_weight]
    got, want = order_projections(u, x_weight, dt_weight), _projections_float64(u, x_weight, dt_weight)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # u's alias carries the scan's gradient: x_proj's input gradient is added to it
    def loss(outs):
        return sum((o * torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view(o.shape) * (i + 1)).sum()
                   for i, o in enumerate(outs))  # fmt: skip

    for a, b in zip(torch.autograd.grad(loss(got), leaves), torch.autograd.grad(loss(want), leaves), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_order_projections_with_unused_outputs_and_a_strided_scan_gradient():
    # outputs the loss does not use get no gradient (None, not materialised zeros); a non-contiguous gradient of
    # u's alias is added, not written into
    g = torch.Generator().manual_seed(3)
    x_weight = torch.randn(2, 3 + 2 * 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    dt_weight = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 2, 5, 9, generator=g, dtype=torch.float64, requires_grad=True)
    leaves = [u, x_weight, dt_weight]
    for pick in ((1,), (2,), (0, 3), (0, 1, 2)):
        outs = [order_projections(u, x_weight, dt_weight), _projections_float64(u, x_weight, dt_weight)]
        grads = []
        for o in outs:
            parts = [o[i] for i in pick]
            if 0 in pick:
                parts[0] = parts[0].transpose(-1, -2)  # a strided gradient flows back into u's alias
            total = sum((p * torch.linspace(-1, 1, p.numel(), dtype=p.dtype).view(p.shape)).sum() for p in parts)
            grads.append(torch.autograd.grad(total, leaves, allow_unused=True))
        for a, b in zip(*grads, strict=True):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_order_projections_accumulate_into_the_scan_gradient_in_place():
    # x_proj's input gradient is added inside the GEMM to the gradient buffer of u's alias: no second u-sized
    # tensor and no separate add
    g = torch.Generator().manual_seed(4)
    x_weight = torch.randn(3, 11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    dt_weight = torch.randn(3, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 3, 6, 40, generator=g, dtype=torch.float64, requires_grad=True)
    alias, delta, B, C = order_projections(u, x_weight, dt_weight)
    loss = (alias * 2).sum() + delta.square().sum() + B.sum() + C.sum()
    with OpOutputs((torch.ops.aten.add, torch.ops.aten.bmm, torch.ops.aten.empty)) as rec:
        loss.backward()
    # of u's size (2·3·6·40): only the gradient of (alias * 2); none from a bmm or an add
    assert sum(math.prod(shape) == u.numel() for shape in rec.shapes) <= 1


def test_weight_gradient_in_pieces_sums_every_token_once(monkeypatch):
    # a one-hot gradient per token: the weight gradient must be Σ_b,l g x^T exactly, with a tail after the pieces
    monkeypatch.setattr(token_linear, "PIECE", 4)
    x = torch.arange(2 * 1 * 11, dtype=torch.float64).view(2, 1, 11)
    g = torch.ones(2, 1, 11, dtype=torch.float64)
    assert token_linear._weight_grad(g, x).item() == x.sum().item()


def test_half_inputs_under_autocast_run_the_product_in_the_autocast_dtype():
    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4, bias=True)
    x = torch.randn(2, 6, 10, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = channel_linear(linear, x)
    assert y.dtype == torch.bfloat16  # as nn.Linear's under autocast, the bias added in bf16
    y.float().square().sum().backward()
    assert linear.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref_x, ref_w = x.detach().double().requires_grad_(), linear.weight.detach().double().requires_grad_()
    ref = torch.einsum("oi,bil->bol", ref_w, ref_x) + linear.bias.detach().double()[:, None]
    ref.square().sum().backward()
    torch.testing.assert_close(y.double(), ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(linear.weight.grad.double(), ref_w.grad, rtol=3e-2, atol=3e-2)


def test_float64_under_autocast_stays_float64():
    linear = torch.nn.Linear(3, 2, bias=False).double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert channel_linear(linear, torch.randn(1, 3, 5, dtype=torch.float64)).dtype == torch.float64


def test_no_copy_of_a_feature_map_forward_or_backward(monkeypatch):
    # the pieces are strided views: only the weights' (small) copies and the gradient's own buffers are made
    monkeypatch.setattr(token_linear, "PIECE", 4)
    weight = torch.randn(3, 11, 6, dtype=torch.float64, requires_grad=True)
    dt_weight = torch.randn(3, 6, 3, dtype=torch.float64, requires_grad=True)
    u = torch.randn(2, 3, 6, 40, dtype=torch.float64, requires_grad=True)
    linear = torch.nn.Linear(6, 8).double()
    x = torch.randn(2, 6, 200, dtype=torch.float64, requires_grad=True)
    with OpOutputs((torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy)) as copies:
        outs = order_projections(u, weight, dt_weight)
        sum((o * torch.randn(o.shape, dtype=o.dtype)).sum() for o in outs).backward()
        channel_linear(linear, x).backward(torch.randn(2, 8, 200, dtype=torch.float64))
    # only B's and C's gradients are copied (into the rows of x_proj's output gradient: 2 x 3 x 4 rows x 40 tokens)
    assert max((math.prod(shape) for shape in copies.shapes), default=0) == 2 * 3 * 4 * 40 < u.numel()


def test_gradients_only_for_what_requires_them():
    # a frozen weight or an input that needs no gradient gets none computed (None back to autograd)
    linear = torch.nn.Linear(4, 3, bias=False).double().requires_grad_(False)
    x = torch.randn(2, 4, 9, dtype=torch.float64, requires_grad=True)
    channel_linear(linear, x).sum().backward()
    assert linear.weight.grad is None
    torch.testing.assert_close(x.grad, linear.weight.sum(0)[None, :, None].expand(2, 4, 9))
    linear.requires_grad_(True)
    x = torch.randn(2, 4, 9, dtype=torch.float64)
    with OpOutputs((torch.ops.aten.bmm,)) as products:
        channel_linear(linear, x).sum().backward()
    assert products.shapes == [(2, 3, 9), (2, 3, 4)]  # the forward and the weight gradient, no input gradient
    torch.testing.assert_close(linear.weight.grad, x.sum((0, 2))[None, :].expand(3, 4))


def test_weight_gradients_of_several_pairs_take_one_reduction(monkeypatch):
    # x_proj's and dt_proj's K weight gradients: one GEMM per (pair, batch row) and per tail, every product into one
    # buffer, one sum (the host launched ~60 small kernels per SegMamba layer when each row was summed and added)
    monkeypatch.setattr(token_linear, "PIECE", 4)
    g = torch.Generator().manual_seed(9)
    pairs = [(torch.randn(2, 3, 13, generator=g, dtype=torch.float64),
              torch.randn(2, 5, 13, generator=g, dtype=torch.float64)) for _ in range(3)]  # fmt: skip
    with OpOutputs((torch.ops.aten.bmm, torch.ops.aten.sum, torch.ops.aten.add, torch.ops.aten.add_)) as ops:
        got = token_linear._weight_grads(pairs)
    # pieces (3 of 4 tokens) per pair and row, their tails (1 token), then the sum (its output is (3, 3, 5) too)
    assert ops.shapes.count((3, 3, 5)) == 3 * 2 + 1 and ops.shapes.count((1, 3, 5)) == 3 * 2
    assert ops.shapes[-1] == (3, 3, 5) and len(ops.shapes) == 3 * 2 * 2 + 1  # then the one sum, no adds
    want = torch.stack([torch.einsum("bol,bil->oi", a, b) for a, b in pairs])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
