"""channel_linear / order_linear: MambaLayer's four linears, their weight gradient summed over pieces of the tokens."""

from __future__ import annotations

import math

import pytest
import torch

from medmamba.layers import token_linear
from medmamba.layers.token_linear import channel_linear, order_linear
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


@pytest.mark.parametrize("length", [7, 13, 16])
def test_order_linear_matches_float64_einsum_on_a_row_slice(monkeypatch, length):
    # dt_proj multiplies the first rows of x_proj's output: x is a strided slice of a contiguous stack
    monkeypatch.setattr(token_linear, "PIECE", 4)
    g = torch.Generator().manual_seed(length)
    weight = torch.randn(3, 6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    stack = torch.randn(2, 3, 9, length, generator=g, dtype=torch.float64, requires_grad=True)
    x = stack[:, :, :4]
    y = order_linear(weight, x)
    want = torch.einsum("koi,bkil->bkol", weight, x)
    torch.testing.assert_close(y, want, rtol=0, atol=1e-12)
    for a, b in zip(_grads(y, [stack, weight]), _grads(want, [stack, weight]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


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
    weight = torch.randn(3, 8, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 5, 40, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(2, 3, 8, 40, dtype=torch.float64)
    with OpOutputs((torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy)) as copies:
        order_linear(weight, x).backward(gy)
    assert max((math.prod(shape) for shape in copies.shapes), default=0) <= weight.numel() * x.shape[0] < x.numel()
