"""The Triton causal conv along each scan order's sequence against F.conv1d (the torch backend) in float64 under
TRITON_INTERPRET=1, and its input checks."""

from __future__ import annotations

import math

import pytest
import torch

from medmamba.kernels import RASTER, REVERSED, SLICE, ScanInputError, ScanOrder, causal_conv, cross_scan
from tests.helpers import OpOutputs, generator


def _check_against_conv1d(x, w, b, orders, g) -> torch.Tensor:
    """The triton conv in fp32 against the torch backend (to_sequence + F.conv1d) in float64: y and the gradient of
    every leaf under random output weights drawn from ``g``. Returns the triton y."""
    leaves = [t for t in (x, w, b) if t is not None]
    want = causal_conv(x, w, b, orders=orders, backend="torch")
    weight = torch.randn(want.shape, generator=g, dtype=torch.float64)
    g_want = torch.autograd.grad((want * weight).sum(), leaves)
    low = [t.detach().float().requires_grad_() for t in leaves]
    got = causal_conv(low[0], low[1], low[2] if b is not None else None, orders=orders, backend="triton")
    g_got = torch.autograd.grad((got * weight.float()).sum(), low)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for a, c in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5 * max(c.abs().max().item(), 1.0))
    return got


@pytest.mark.parametrize(
    ("spatial", "orders"),
    [
        ((9,), (RASTER, REVERSED)),
        ((3, 4, 5), (RASTER, REVERSED, SLICE)),
        ((3, 5), cross_scan(2)),
        ((1,), (RASTER,)),
        ((5, 6, 7), (RASTER, REVERSED, SLICE, ScanOrder((2, 0, 1)))),  # 210 offsets: two tiles; 20 channels: two blocks
        ((2, 6, 5), (SLICE, ScanOrder((2, 1, 0), reverse=True))),  # lines of 2 tokens: the conv's general mode
    ],
    ids=["1d", "3d-segmamba", "2d-cross", "L1", "two-tiles", "short-lines"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_causal_conv_matches_conv1d_on_each_orders_sequence(spatial, orders, bias):
    g = generator(21)
    K = len(orders)
    channels = 20 if math.prod(spatial) > 128 else 3
    x = torch.randn(2, channels, *spatial, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(K, channels, 4, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(K, channels, generator=g, dtype=torch.float64).requires_grad_() if bias else None
    got = _check_against_conv1d(x, w, b, orders, g)
    assert got.shape == (2, K, channels, *spatial) and got.dtype == torch.float32


@pytest.mark.parametrize("width", [2, 5])  # widths other than every Mamba's 4
def test_causal_conv_of_other_widths_matches_conv1d(width):
    g = generator(22)
    orders = (RASTER, REVERSED, SLICE, ScanOrder((0, 2, 1)))
    x = torch.randn(2, 3, 3, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(len(orders), 3, width, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(len(orders), 3, generator=g, dtype=torch.float64).requires_grad_()
    _check_against_conv1d(x, w, b, orders, g)


def test_causal_conv_rejects_bad_shapes():
    x = torch.randn(1, 3, 5)
    with pytest.raises(ScanInputError, match="weight must be"):
        causal_conv(x, torch.randn(3, 4), orders=(RASTER,))
    with pytest.raises(ScanInputError, match="x must be"):
        causal_conv(torch.randn(1, 2, 5), torch.randn(1, 3, 4), orders=(RASTER,))
    with pytest.raises(ScanInputError, match="bias must be"):
        causal_conv(x, torch.randn(1, 3, 4), torch.randn(3), orders=(RASTER,))


def test_triton_conv_sums_the_gradient_of_x_over_the_orders_in_its_backward_kernel():
    # x is read by every order; its gradient comes out of the backward kernel summed over them (in fp32), not as a
    # (B, K, C, *S) tensor that autograd's expand backward then sums in another pass: the only sums left are the
    # weight's and the bias's over the kernel's partials
    g = generator(23)
    orders = (RASTER, REVERSED, SLICE)
    x = torch.randn(2, 3, 3, 4, 5, generator=g).requires_grad_()
    w = torch.randn(3, 3, 4, generator=g).requires_grad_()
    b = torch.randn(3, 3, generator=g).requires_grad_()
    y = causal_conv(x, w, b, orders=orders, backend="triton")
    with OpOutputs((torch.ops.aten.sum, torch.ops.aten.add)) as sums:
        dx, dw, db = torch.autograd.grad(y, (x, w, b), torch.randn(y.shape, generator=g))
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    assert sums.shapes and set(sums.shapes) <= {tuple(w.shape), tuple(b.shape)}, sums.shapes


@pytest.mark.parametrize(
    "orders", [(RASTER, REVERSED, SLICE, ScanOrder((2, 0, 1))), (SLICE,), cross_scan(3)], ids=["K4", "K1", "K6"]
)
def test_causal_conv_programs_of_several_tiles_match_conv1d(orders):
    # tiles of 16 offsets, 3 per program: 210 offsets make 5 programs along each row, the last with one tile and a
    # partial one; 5 channels in blocks of 2. The gradient of x is summed over the orders in registers, by a second
    # backward pass that holds every order's weights and table row (with K = 6 up to the limit of conv._dx_channels).
    from medmamba.kernels.backends.triton_scan import configs

    g = generator(24)
    K = len(orders)
    x = torch.randn(2, 5, 5, 6, 7, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(K, 5, 4, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(K, 5, generator=g, dtype=torch.float64).requires_grad_()
    tile = configs.ConvTile(sub=2, block_p=16, num_warps=1, steps=3)
    with configs.override(conv_forward=tile, conv_backward=tile):
        _check_against_conv1d(x, w, b, orders, g)


def test_divisions_by_multiplication_are_exact_for_every_31_bit_numerator():
    # layout.divisor: the conv's divisions by an order's runtime strides and sizes as a multiply-high and a shift.
    # Checked in 64-bit integers against // at both ends of the range, around every multiple of d near 2³¹, and at
    # random numerators, for the sizes and strides of real volumes and for awkward divisors
    from medmamba.kernels.backends.triton_scan.layout import divisor

    g = generator(25)
    top = 2**31
    for d in (1, 2, 3, 7, 64, 96, 210, 4096, 4097, 262144, 2**20 + 1, 3 * 5 * 7 * 11 * 13, top - 1):
        magic, shift = divisor(d)
        unsigned = magic % 2**32
        multiples = torch.linspace(0, (top - 1) // d, 1000, dtype=torch.float64).long() * d
        near = torch.cat([multiples - 1, multiples, multiples + 1])
        randoms = torch.randint(0, top, (100000,), generator=g)
        n = torch.cat([torch.arange(0, 4096), torch.arange(top - 4096, top), near, randoms])
        n = n[(n >= 0) & (n < top)]
        got = n if d == 1 else ((n * unsigned) >> 32) >> shift
        assert torch.equal(got, n // d), d
    with pytest.raises(ValueError, match="positive"):
        divisor(0)
