"""The Triton scan backend against the float64 reference: under TRITON_INTERPRET=1 on the CPU (tiny shapes, small
tiles that force several chunks, segments, channel blocks and sub-blocks) and, marked ``gpu``, on CUDA at real
sizes, with random shape fuzzing and the torch backend as the second opinion."""

from __future__ import annotations

import math
import os

import pytest
import torch

from medmamba.kernels import (
    RASTER,
    REVERSED,
    SLICE,
    TEMPORAL,
    BackendUnavailableError,
    ScanInputError,
    ScanOrder,
    available_backends,
    causal_conv,
    channel_layer_norm,
    cross_scan,
    order_indices,
    selective_scan,
)
from medmamba.kernels.backends import triton_scan
from medmamba.kernels.backends.triton_scan import configs, layout
from medmamba.kernels.backends.triton_scan import forward as triton_forward
from tests.helpers import TOLERANCES, generator

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
P = configs.PassConfig
#: tiny tiles so that a few dozen tokens already span several chunks, sub-blocks and channel blocks
TINY = P(sub=1, num_warps=1)
TINY_SEGMENTS = P(sub=2, num_warps=1, segments=3)
CUDA = torch.cuda.is_available()


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


# (spatial shape, orders): every order kind, odd sizes, lengths not a multiple of the 16-token chunk, L = 1
CASES = {
    "1d-L1": ((1,), (RASTER,)),
    "1d-odd-K2": ((37,), (RASTER, REVERSED)),
    "2d-cross-K4": ((5, 7), cross_scan(2)),
    "3d-segmamba-K3": ((3, 4, 5), (RASTER, REVERSED, SLICE)),
    "3d-cross-K6": ((3, 2, 5), cross_scan(3)),
    "video-vivim-K3": ((3, 4, 4), (RASTER, REVERSED, TEMPORAL)),
    "3d-slice-K1": ((2, 3, 7), (SLICE,)),
    "2d-exact-chunks-K5": ((4, 8), (*cross_scan(2), ScanOrder((1, 0), False))),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_forward_and_gradients_match_the_float64_reference_for_every_order(case):
    spatial, orders = CASES[case]
    low, ref = make_inputs(spatial, len(orders), seed=len(case))
    with configs.override(TINY, TINY):
        assert_matches_reference(low, ref, orders, dtype=torch.float32)


@pytest.mark.parametrize("merge", ["sum", "stack"])
@pytest.mark.parametrize(
    ("z", "D", "bias", "softplus"),
    [(True, True, True, True), (False, False, False, True), (True, False, True, False), (False, True, False, False)],
    ids=["z-D-bias", "plain", "z-bias-nosoftplus", "D-nosoftplus"],
)
def test_optional_inputs_and_merges(merge, z, D, bias, softplus):
    orders = (RASTER, SLICE)
    low, ref = make_inputs((2, 3, 5), 2, z=z, D=D, bias=bias, seed=3)
    if not softplus:  # keep Δ positive, as a real Δ would be
        for args in (low, ref):
            args[1] = args[1].detach().abs().requires_grad_()
    with configs.override(TINY, TINY_SEGMENTS):
        assert_matches_reference(low, ref, orders, dtype=torch.float32, merge=merge, softplus=softplus)


def test_segments_groups_and_channel_blocks():
    # 4 channels in 2 groups: programs of 1 channel, 3 segments of chunks, two dB/dC partial blocks per group
    # summed on the host; 6 channels in 2 groups: SUB 2 rounds down to 1, the divisor of 3
    orders = (REVERSED, SLICE)
    low, ref = make_inputs((2, 2, 9), 2, batch=1, channels=4, groups=2, N=3, seed=5)
    cfg = P(sub=1, num_warps=1, segments=3)
    with configs.override(cfg, cfg):
        assert_matches_reference(low, ref, orders, dtype=torch.float32)
    low, ref = make_inputs((2, 3, 3), 2, batch=1, channels=6, groups=2, N=3, seed=6)
    cfg = P(sub=2, num_warps=1, segments=3)
    with configs.override(cfg, cfg):
        assert_matches_reference(low, ref, orders, dtype=torch.float32)


@pytest.mark.parametrize("block_s, tile, N, blocks", [(4, 512, 2, (4, 2)), (4, 8, 3, (4, 2))])
def test_carry_passes_chain_segments_block_by_block(monkeypatch, block_s, tile, N, blocks):
    # 6 segments (5 boundaries) chained 4 at a time by the carry passes' associative scan: the state and the
    # adjoint must cross block boundaries into a partial last block. With a tile of 8, a program takes 2 of the 3
    # states (a partial last block of states): the grid's state blocks must cover every state of every channel
    from medmamba.kernels.backends.triton_scan import backward, forward

    monkeypatch.setattr(forward, "CARRY_SEGMENTS", block_s)
    monkeypatch.setattr(forward, "CARRY_TILE", tile)
    monkeypatch.setattr(forward, "_LAUNCHES", {})  # the carry grids are remembered per signature
    monkeypatch.setattr(backward, "_LAUNCHES", {})
    assert forward.carry_blocks(6, 1 << (N - 1).bit_length()) == blocks  # BLOCK_N: N's next power of 2
    low, ref = make_inputs((4, 6, 8), 2, batch=2, channels=4, N=N, seed=3)  # 12 chunks of 16 tokens
    cfg = P(sub=2, num_warps=1, segments=6)
    with configs.override(cfg, cfg):
        assert_matches_reference(low, ref, (RASTER, SLICE), dtype=torch.float32)


@pytest.mark.parametrize("rows, cols", [(8, 2)])
def test_finish_pass_sums_partials_tile_by_tile(monkeypatch, rows, cols):
    # dA, dD and d(delta_bias) are summed over 2 batches × 6 segments = 12 partial rows, `rows` at a time (the last
    # tile partial), and over column blocks of `cols` (C·N = 8 and C = 4 columns, two orders: 4 and 2 blocks)
    from medmamba.kernels.backends.triton_scan import backward

    monkeypatch.setattr(backward, "FINISH_ROWS", rows)
    monkeypatch.setattr(backward, "FINISH_COLS", cols)
    low, ref = make_inputs((4, 6, 8), 2, batch=2, channels=4, seed=4)
    cfg = P(sub=2, num_warps=1, segments=6)
    with configs.override(cfg, cfg):
        assert_matches_reference(low, ref, (RASTER, SLICE), dtype=torch.float32)


def test_channels_per_group_not_a_power_of_two_with_default_blocking():
    # 3 channels per group: one channel per step; found by the GPU shape fuzzing (channels 3 and 6 were left
    # unwritten when the forward grid counted channel blocks of the backward's size)
    orders = (RASTER, ScanOrder((1, 0), True))
    low, ref = make_inputs((4, 5), 2, channels=6, groups=2, N=3, seed=19)
    assert_matches_reference(low, ref, orders, dtype=torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs(dtype):
    orders = (RASTER, REVERSED, SLICE)
    low, ref = make_inputs((2, 3, 6), 3, dtype=dtype, seed=7)
    with configs.override(TINY_SEGMENTS, TINY):
        assert_matches_reference(low, ref, orders, dtype=dtype)


def test_shared_input_expanded_over_orders_and_constant_bc():
    # u shared by the orders as a stride-0 expand (never copied); constant (K, C, N) B and C
    g = generator(11)
    K, ch, N, spatial = 2, 2, 3, (3, 5)
    u = torch.randn(1, ch, *spatial, generator=g).requires_grad_()
    delta = torch.randn(1, K, ch, *spatial, generator=g).requires_grad_()
    A = (-torch.rand(K, ch, N, generator=g) - 0.5).requires_grad_()
    B = torch.randn(K, ch, N, generator=g).requires_grad_()
    C = torch.randn(K, ch, N, generator=g).requires_grad_()
    orders = (RASTER, ScanOrder((1, 0), True))
    args = (u.unsqueeze(1).expand(-1, K, -1, -1, -1), delta, A, B, C)
    with configs.override(TINY, TINY):
        got = selective_scan(*args, orders=orders, backend="triton")
        g_got = torch.autograd.grad(got.out.square().sum(), (u, delta, A, B, C))
    ref_args = [x.detach().double().requires_grad_() for x in (u, delta, A, B, C)]
    want = selective_scan(ref_args[0].unsqueeze(1).expand(-1, K, -1, -1, -1), *ref_args[1:], orders=orders,
                          backend="reference")  # fmt: skip
    g_want = torch.autograd.grad(want.out.square().sum(), ref_args)
    torch.testing.assert_close(got.out.double(), want.out, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_autograd_sees_one_node_whose_gradients_have_the_arguments_shapes():
    # one order: selective_scan adds an axis to u, delta, A, B, C, D and delta_bias. Those views are not recorded:
    # the Function's inputs are the arguments as given, and its gradients come back in their shapes
    low, ref = make_inputs((3, 5), 1, channels=4, N=3, groups=2, seed=19)
    with configs.override(TINY, TINY_SEGMENTS):
        got = selective_scan(*low, backend="triton", return_last_state=True)
        edges = [f for f, _ in got.out.grad_fn.next_functions]
        assert [type(f).__name__ for f in edges] == ["AccumulateGrad"] * len(low)
        assert [f.variable for f in edges] == low
        grads = weighted_grads(got, low)
    want = selective_scan(*ref, backend="reference", return_last_state=True)
    for name, a, b, x in zip(NAMES, grads, weighted_grads(want, ref), low, strict=True):
        assert a.shape == x.shape, name
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1.0),
                                   msg=lambda m, name=name: f"gradient of {name}: {m}")  # fmt: skip


def test_one_order_constant_bc_and_either_output_alone_get_the_reference_gradients():
    # constant (C, N) B and C of one order: their gradients are sums over batch and space. Each output alone:
    # the unused one's gradient is never materialised (a zero adjoint kept per shape stands in for the last state's)
    g = generator(23)
    ch, N, spatial = 3, 2, (4, 5)
    args = [torch.randn(2, ch, *spatial, generator=g, dtype=torch.float64),
            torch.randn(2, ch, *spatial, generator=g, dtype=torch.float64) * 0.5,
            -(torch.rand(ch, N, generator=g, dtype=torch.float64) + 0.5),
            torch.randn(ch, N, generator=g, dtype=torch.float64), torch.randn(ch, N, generator=g, dtype=torch.float64),
            torch.randn(ch, generator=g, dtype=torch.float64)]  # fmt: skip
    low = [a.float().requires_grad_() for a in args]
    ref = [a.clone().requires_grad_() for a in args]
    for use in ("out", "last_state"):
        with configs.override(TINY_SEGMENTS, TINY):
            got = selective_scan(*low, backend="triton", return_last_state=True)._asdict()[use]
            g_got = torch.autograd.grad(got.square().sum(), low, materialize_grads=True)
        want = selective_scan(*ref, backend="reference", return_last_state=True)._asdict()[use]
        g_want = torch.autograd.grad(want.square().sum(), ref, materialize_grads=True)  # C and D: zero for last
        for name, a, b, x in zip(NAMES, g_got, g_want, low, strict=False):
            assert a.shape == x.shape, name
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1e-3),
                                       msg=lambda m, name=name, use=use: f"{use}: gradient of {name}: {m}")  # fmt: skip


def test_inference_path_saves_nothing_and_agrees_with_training_path():
    orders = (RASTER, REVERSED, SLICE)
    low, _ = make_inputs((3, 3, 5), 3, seed=13)
    with configs.override(TINY_SEGMENTS, TINY):
        train = selective_scan(*low, orders=orders, backend="triton", return_last_state=True)
        with torch.no_grad():
            infer = selective_scan(*low, orders=orders, backend="triton", return_last_state=True)
    assert infer.out.grad_fn is None and train.out.grad_fn is not None
    torch.testing.assert_close(infer.out, train.out.detach(), rtol=0, atol=0)  # same kernels, deterministic
    torch.testing.assert_close(infer.last_state, train.last_state.detach(), rtol=0, atol=0)


def test_backward_is_deterministic():
    orders = (RASTER, SLICE)
    low, _ = make_inputs((2, 3, 5), 2, batch=1, channels=4, seed=17)
    with configs.override(TINY, TINY_SEGMENTS):
        runs = [weighted_grads(selective_scan(*low, orders=orders, backend="triton", return_last_state=True), low)
                for _ in range(2)]  # fmt: skip
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("orders", "spatial"),
    [
        ((RASTER, REVERSED, SLICE, TEMPORAL), (3, 4, 5)),
        (cross_scan(3), (2, 3, 4)),
        (cross_scan(2), (5, 3)),
        ((RASTER, REVERSED), (7,)),
        ((ScanOrder((0, 2, 1)), ScanOrder((2, 0, 1), True)), (4, 1, 3)),
    ],
)
def test_stride_table_visits_tokens_in_the_order_of_order_indices(orders, spatial):
    # the kernels' mixed-radix addressing (layout.py), evaluated on the host for every token
    L = math.prod(spatial)
    for order, (fast, mid, st_fast, st_mid, st_slow, rev) in zip(orders, layout.order_rows(orders, spatial),
                                                                  strict=True):  # fmt: skip
        offsets = []
        for q in range(L):
            p = L - 1 - q if rev else q
            r = p // fast
            offsets.append((r // mid) * st_slow + (r % mid) * st_mid + (p % fast) * st_fast)
        assert offsets == order_indices(order, spatial).tolist()


def test_channel_blocking_and_segments():
    assert layout.channel_blocking(channels=96, groups=1, sub=32) == 32
    assert layout.channel_blocking(channels=96, groups=1, sub=128) == 32  # 96 = 3·32
    assert layout.channel_blocking(channels=768, groups=1, sub=128) == 128
    assert layout.channel_blocking(channels=6, groups=2, sub=2) == 1  # 3 per group
    assert layout.channel_blocking(channels=4, groups=4, sub=2) == 1  # constant B/C
    assert layout.segments(nchunks=100, rows=1000, target_programs=264) == (1, 100)
    nsplit, per = layout.segments(nchunks=2048, rows=6, target_programs=264)
    assert nsplit * per >= 2048 > (nsplit - 1) * per and nsplit >= 64


def test_strided_orders_get_more_segments():
    # an order whose consecutive tokens are not neighbours in memory gets the pass's fill_strided
    assert not layout.strided((RASTER, REVERSED), (8, 8, 8))
    assert layout.strided((RASTER, SLICE), (8, 8, 8))  # depth fastest: H·W elements between tokens
    assert not layout.strided((SLICE,), (1, 8, 8)) and not layout.strided((ScanOrder((1, 0)),), (5, 1))
    assert layout.strided((ScanOrder((1, 0)),), (5, 3))  # column-major 2D
    from medmamba.kernels.backends.triton_scan.forward import Plan, split

    p = Plan(batch=2, K=3, channels=96, groups=1, N=16, L=64**3, spatial=(64, 64, 64), block_t=16, block_n=16,
             nchunks=64**3 // 16)  # fmt: skip
    cfg = P(sub=32, num_warps=1, fill=2, fill_strided=8, line_segments=False)
    cpu = torch.device("cpu")  # target_programs: 8
    raster, three = (RASTER, REVERSED), (RASTER, REVERSED, SLICE)
    assert split(p, cfg, cpu, three)[1] > split(p, cfg, cpu, raster)[1]
    assert split(p, P(sub=32, num_warps=1, fill=2, line_segments=False), cpu, three) == split(p, cfg, cpu, raster)


def test_strided_calls_are_cut_into_segments_of_whole_lines():
    # every segment starts at the same place along the strided order's lines (64 tokens = 4 chunks at 64³)
    three = (RASTER, REVERSED, SLICE)
    assert layout.line_chunks(three, (64, 64, 64), chunk=16) == 4
    assert layout.line_chunks(three, (32, 32, 32), chunk=16) == 2
    assert layout.line_chunks(three, (8, 8, 8), chunk=16) == 1  # two lines per chunk
    assert layout.line_chunks(three, (24, 5, 5), chunk=16) == 3  # 48 tokens: two lines of 24
    assert layout.line_chunks(three, (100, 4, 4), chunk=16) == 0  # 25 chunks: more than 8
    assert layout.line_chunks((RASTER, REVERSED), (64, 64, 64), chunk=16) == 1  # nothing strided
    vivim = (ScanOrder((1, 2, 0)),)  # time fastest, T = 12 frames: 3 chunks = 4 lines
    assert layout.line_chunks(vivim, (12, 16, 16), chunk=16) == 3
    assert layout.line_chunks((SLICE, ScanOrder((0, 2, 1))), (3, 24, 32), chunk=16) == 3  # lcm(3, 24 / 8)
    assert layout.line_chunks((SLICE, ScanOrder((1, 0, 2))), (3, 24, 32), chunk=16) == 6  # W fastest, D mid: lcm(3, 2)
    assert layout.segments(nchunks=16384, rows=18, target_programs=8448, align=4) == (4096, 4)
    assert layout.segments(nchunks=256, rows=18, target_programs=8448, align=1) == (128, 2)  # at least 2 chunks
    assert layout.segments(nchunks=300, rows=18, target_programs=8448, align=3) == (100, 3)
    assert layout.segments(nchunks=1, rows=18, target_programs=8448, align=4) == (1, 1)
    assert layout.segments(nchunks=16384, rows=9000, target_programs=8448, align=4) == (1, 16384)  # rows fill it
    from medmamba.kernels.backends.triton_scan.forward import Plan, split

    p = Plan(batch=2, K=3, channels=96, groups=1, N=16, L=64**3, spatial=(64, 64, 64), block_t=16, block_n=16,
             nchunks=64**3 // 16)  # fmt: skip
    cpu = torch.device("cpu")
    assert split(p, P(sub=32, num_warps=1, fill=8, fill_strided=32), cpu, three) == (32, 4096, 4)
    assert split(p, P(sub=32, num_warps=1, fill=8, fill_strided=32), cpu, (RASTER,)) == split(
        p, P(sub=32, num_warps=1, fill=8, fill_strided=32, line_segments=False), cpu, (RASTER,)
    )


def test_raster_calls_qualify_for_16_byte_chunk_moves():
    # the GPU's vector path needs token t at offset t (any number of axes, size-1 axes ignored), whole chunks and
    # 16-byte aligned rows
    assert layout.directions((RASTER,), (4, 5, 6)) == [1] and layout.directions((RASTER,), (7,)) == [1]
    assert layout.directions((SLICE,), (1, 8, 8)) == [1]  # depth fastest over one slice is the raster order
    assert layout.directions((REVERSED,), (64,)) == [-1] and layout.directions((RASTER, SLICE), (4, 4, 4)) == [1, 0]
    assert layout.directions((ScanOrder((1, 0)),), (5, 3)) == [0]
    u = torch.zeros(2, 1, 64, 4, 8)
    B = torch.zeros(2, 1, 1, 16, 4, 8)
    assert layout.vector_mode((RASTER,), (4, 8), u, B) == 1
    assert layout.vector_mode((RASTER,), (4, 6), u[..., :6], B[..., :6]) == 0  # 24 tokens: a partial chunk
    shifted = torch.zeros(u.numel() + 1)[1:].view(u.shape)  # every row 4 bytes off a 16-byte boundary
    assert layout.vector_mode((RASTER,), (4, 8), shifted, B) == 0
    odd = torch.zeros(2, 1, 64, 36)[..., :32]  # rows 36 elements apart: 144 bytes, 16-byte aligned
    assert layout.vector_mode((RASTER,), (32,), odd) == 1
    cube = torch.zeros(1, 3, 32, 4, 4, 4)
    assert layout.vector_mode((RASTER, REVERSED, SLICE), (4, 4, 4), cube) == 2  # decided per order
    assert layout.vector_mode((SLICE,), (4, 4, 4), cube[:, :1]) == 0
    # by default the per-order path runs for raster and reversed orders only; with a strided order, on request
    pair = cube[:, :2]
    assert P().vector_mode(True, (RASTER, REVERSED), (4, 4, 4), pair) == 3  # raster and reversed only
    assert P().vector_mode(True, (RASTER, REVERSED, SLICE), (4, 4, 4), cube) == 0
    assert P(mixed_vectors=True).vector_mode(True, (RASTER, REVERSED, SLICE), (4, 4, 4), cube) == 2
    assert P().vector_mode(False, (RASTER,), (4, 4, 4), cube[:, :1]) == 0  # off the inline-PTX path
    assert layout.vector_mode((RASTER,), (32,), torch.zeros(2, 1, 64, 36, dtype=torch.bfloat16)[..., :32]) == 0  # 72 B


@pytest.mark.parametrize(
    ("spatial", "orders", "dtype", "mode"),
    [
        ((48,), (RASTER,), torch.float32, 1),  # 3 chunks over 2 segments
        ((48,), (RASTER,), torch.bfloat16, 1),
        ((2, 4, 4), (REVERSED,), torch.float16, 3),
        ((4, 2, 4), (RASTER, REVERSED), torch.bfloat16, 3),  # each program reads its order's way
        ((4, 4, 4), (RASTER, REVERSED, SLICE), torch.float32, 2),  # neighbours forwards, backwards, gathered
    ],
    ids=["raster-fp32", "raster-bf16", "reversed-fp16", "bidirectional-bf16", "segmamba-fp32"],
)
def test_gpu_path_logic_matches_the_float64_reference_under_the_interpreter(spatial, orders, dtype, mode, monkeypatch):
    # the GPU path (16-byte chunk moves, the per-token forward, the warp reduce-scatter of dB/dC, per-order
    # decisions of a mixed call) with its inline PTX emulated (ptx.INTERPRETING): its logic, not its speed
    from medmamba.kernels.backends.triton_scan import backward as triton_backward

    low, ref = make_inputs(spatial, len(orders), channels=32, N=16, dtype=dtype, seed=11)
    cfg = P(sub=32, num_warps=1, segments=2, emulate_ptx=True, mixed_vectors=True)
    canonical = [x.unsqueeze(1) if len(orders) == 1 else x for x in (low[0], low[3])]
    assert cfg.vector_mode(cfg.ptx(low[0].device, 32, 1), orders, spatial, *canonical) == mode
    monkeypatch.setattr(triton_backward, "_LAUNCHES", {})
    with configs.override(forward=cfg, backward=cfg):
        assert_matches_reference(low, ref, orders, dtype=dtype)
    # the backward runs the forward's mode too (raster and reversed orders: no token offsets either)
    assert {launch.vec_mode for launch in triton_backward._LAUNCHES.values()} == {mode}


@pytest.mark.parametrize(
    ("spatial", "orders", "dtype", "expected"),
    [
        ((16, 2, 8), (RASTER, REVERSED, SLICE), torch.float32, (8, 16)),  # SegMamba's orders: lines along D
        ((16, 1, 16), (SLICE,), torch.bfloat16, (16, 16)),
        ((32, 16), (ScanOrder((1, 0)), RASTER), torch.float16, (16, 32)),  # a column-major 2D cross-scan order
    ],
)
def test_strided_orders_run_line_by_line(spatial, orders, dtype, expected):
    # one segment per line, neighbouring lines across a program's lanes (layout.lines): shifted lane pointers,
    # per-lane B/C, per-lane segment states and last states; forward and all gradients against float64
    assert layout.lines(orders, spatial, torch.tensor([], dtype=dtype).element_size(), 32) == expected
    low, ref = make_inputs(spatial, len(orders), channels=8, N=3, dtype=dtype, seed=13)
    cfg = P(sub=32, num_warps=1, lines=True)
    u, A, B = (x.unsqueeze(axis) if len(orders) == 1 else x for x, axis in ((low[0], 1), (low[2], 0), (low[3], 1)))
    p = triton_forward.plan(u, A, B)
    assert triton_forward.lines_of(p, cfg, orders, low[0]) == expected
    with configs.override(forward=cfg, backward=cfg):
        assert_matches_reference(low, ref, orders, dtype=dtype)


@pytest.mark.parametrize(
    ("spatial", "order", "dtype", "options", "lv"),
    [
        ((16, 2, 4), SLICE, torch.float32, {"batch": 2}, 4),  # 8 lines: 2 groups chained by the carry pass
        ((16, 1, 4), SLICE, torch.bfloat16, {"groups": 2, "channels": 64}, 4),  # B/C groups of 32 channels
        ((32, 4), ScanOrder((1, 0)), torch.float32, {"z": False, "D": False, "bias": False}, 4),  # 2D, one group
        ((16, 1, 4), TEMPORAL, torch.float16, {}, 2),
        ((32, 1, 8), SLICE, torch.float32, {}, 8),  # lines of two chunks
    ],
    ids=["slice-fp32-carry", "slice-bf16-groups", "2d-column-major-plain", "temporal-fp16-lv2", "slice-lv8"],
)
def test_one_strided_order_runs_as_line_vectors(spatial, order, dtype, options, lv, monkeypatch):
    # lines.py: a thread's LV neighbouring lines side by side, one segment per line, groups of LV lines chained by
    # the carry pass; the chunk-start states it saves feed the backward (line vectors by default; the chunk path's
    # in test_calls_mixing_strided_and_raster_orders_run_as_groups). Forward and every gradient
    # against float64, with the defaults (LV 4) or another LV
    import dataclasses

    kw = {"channels": 32, "N": 16, "seed": 17, **options}
    low, ref = make_inputs(spatial, 1, dtype=dtype, **kw)
    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
    cfg = dataclasses.replace(configs.forward_config(), line_vectors=lv)
    assert configs.forward_config().line_vectors == 4
    with configs.override(forward=cfg):
        assert_matches_reference(low, ref, (order,), dtype=dtype)
        assert_matches_reference(low, ref, (order,), dtype=dtype, merge="stack", grads=False)
    assert {launch.line_vectors for launch in triton_forward._LAUNCHES.values()} == {lv}
    # the cap for calls of strided orders only reaches the line-vector launches (128 by default), maxnreg does not
    assert {launch.flags["maxnreg"] for launch in triton_forward._LAUNCHES.values()} == {128}
    if lv == 4:
        triton_forward._LAUNCHES.clear()
        with configs.override(forward=dataclasses.replace(cfg, strided_maxnreg=None, maxnreg=168)):
            assert_matches_reference(low, ref, (order,), dtype=dtype, grads=False)
        assert ["maxnreg" in launch.flags for launch in triton_forward._LAUNCHES.values()] == [False]


@pytest.mark.parametrize(
    ("spatial", "order", "dtype", "options", "forward_lv"),
    [
        ((32, 1, 4), SLICE, torch.float32, {}, 4),  # lines of two chunks; lane sums; line-vector forward (16 states)
        ((16, 2, 2), SLICE, torch.bfloat16, {"groups": 2, "channels": 64, "N": 4}, 0),  # B/C groups; chunk forward
    ],
    ids=["slice-fp32-two-chunks", "slice-bf16-groups-chunk-forward"],
)
def test_backward_of_one_strided_order_runs_as_line_vectors(spatial, order, dtype, options, forward_lv, monkeypatch):
    # lines_backward.py (the backward's line_vectors, 2 by default): two lines per thread, every line a segment of the
    # segment and carry passes, the chunk-start states saved by either forward. Every gradient against float64;
    # without z, D and delta_bias, in a group of SegMamba-like orders: test_calls_mixing_strided_and_raster_orders…
    import dataclasses

    from medmamba.kernels.backends.triton_scan import backward as triton_backward

    kw = {"channels": 32, "N": 16, "seed": 23, **options}
    low, ref = make_inputs(spatial, 1, dtype=dtype, **kw)
    monkeypatch.setattr(triton_backward, "_LAUNCHES", {})
    fwd = dataclasses.replace(configs.forward_config(), line_vectors=forward_lv)
    # the first case takes the GPU path's dB/dC sums (ptx._lane_sum8, emulated) and the line-vector segment pass
    # (line_vector_segments), the second tl.sum and the chunk path's segment pass
    first = forward_lv == 4
    bwd = dataclasses.replace(configs.backward_config(), line_vectors=2, emulate_ptx=first, line_vector_segments=first)
    # the defaults since the H100 timings (configs._BACKWARD)
    assert configs.backward_config().line_vectors == 2 and configs.backward_config().line_vector_segments
    with configs.override(forward=fwd, backward=bwd):
        assert_matches_reference(low, ref, (order,), dtype=dtype)
    launches = list(triton_backward._LAUNCHES.values())
    assert [(x.line_vectors, x.segment_lines) for x in launches] == [(2, first)]


def test_line_vector_backward_never_reads_the_first_chunks_unwritten_state():
    # the chunk path's forward leaves the sequence's first chunk-start state unwritten (the scan starts from zero);
    # the line-vector backward must not read it: NaN there changes no gradient
    import dataclasses

    from medmamba.kernels.backends.triton_scan import backward as triton_backward
    from medmamba.kernels.canonical import canonical_views

    low, _ = make_inputs((16, 2, 2), 1, channels=32, N=4, seed=29)
    u, delta, A, B, C, D, z, bias = canonical_views(*low, (SLICE,))
    u, delta, B, C = (layout.natural_spatial(x, 3) for x in (u, delta, B, C))
    kw = {"orders": (SLICE,), "delta_softplus": True, "merge": "sum"}
    fwd = dataclasses.replace(configs.forward_config(), line_vectors=0)
    bwd = dataclasses.replace(configs.backward_config(), line_vectors=2)
    with configs.override(forward=fwd, backward=bwd):
        res = triton_forward.forward(u, delta, A, B, C, D, z, bias, save=True, **kw)
        gy = torch.randn(res.out.shape, generator=generator(30))
        clean = triton_backward.backward(gy, None, u, delta, A, B, C, D, z, bias, res.states, res.pre_gate,
                                         p=res.plan, **kw)  # fmt: skip
        res.states[:, :, 0] = float("nan")
        poisoned = triton_backward.backward(gy, None, u, delta, A, B, C, D, z, bias, res.states, res.pre_gate,
                                            p=res.plan, **kw)  # fmt: skip
    for name, a, b in zip(NAMES, clean, poisoned, strict=True):
        assert torch.equal(a, b) and a.isfinite().all(), name


def test_calls_that_cannot_run_as_line_vectors(monkeypatch):
    assert layout.line_groups((SLICE,), (16, 2, 8), 4) == 16
    assert layout.line_groups((ScanOrder((1, 0)),), (32, 4), 4) == 32
    assert layout.line_groups((SLICE,), (16, 2, 8), 0) == 0  # off
    assert layout.line_groups((SLICE,), (16, 2, 6), 4) == 0  # 6 lines per slow step: not whole groups of 4
    assert layout.line_groups((SLICE,), (12, 2, 8), 4) == 0  # lines of 12 tokens: not whole chunks
    assert layout.line_groups((RASTER,), (16, 2, 8), 4) == 0  # not strided
    assert layout.line_groups((SLICE, RASTER), (16, 2, 8), 4) == 0  # two orders
    assert layout.line_groups((ScanOrder((1, 2, 0), True),), (16, 2, 8), 4) == 0  # reversed
    assert layout.line_groups((ScanOrder((2, 1, 0)),), (16, 8, 8), 4) == 0  # second axis strided too
    # more groups of lines than a grid axis holds: the chunk path
    monkeypatch.setattr(triton_forward, "MAX_GRID_Y", 1)
    low, ref = make_inputs((16, 1, 8), 1, channels=32, N=16, seed=2)  # 2 groups of 4 lines
    triton_forward._LAUNCHES.clear()
    assert_matches_reference(low, ref, (SLICE,), dtype=torch.float32, grads=False)
    assert [launch.line_vectors for launch in triton_forward._LAUNCHES.values()] == [0]
    monkeypatch.undo()
    # 8 states: the chunk path
    low, ref = make_inputs((16, 1, 4), 1, channels=32, N=8, seed=2)
    triton_forward._LAUNCHES.clear()
    assert_matches_reference(low, ref, (SLICE,), dtype=torch.float32, grads=False)
    assert [launch.line_vectors for launch in triton_forward._LAUNCHES.values()] == [0]


@pytest.mark.parametrize(
    ("orders", "dtype", "options", "ranges", "backward_lv"),
    [
        ((RASTER, REVERSED, SLICE), torch.float32, {}, ((0, 2), (2, 3)), 0),  # SegMamba's three orders
        ((SLICE, RASTER), torch.bfloat16, {}, ((0, 1), (1, 2)), 0),
        ((RASTER, SLICE, REVERSED), torch.float16, {"z": False, "D": False, "batch": 2}, ((0, 1), (1, 2), (2, 3)), 2),
    ],
    ids=["segmamba-fp32", "slice-first-bf16", "slice-between-fp16-plain-lv-backward"],
)
def test_calls_mixing_strided_and_raster_orders_run_as_groups(orders, dtype, options, ranges, backward_lv, monkeypatch):
    # PassConfig.split_orders: each strided order alone as line vectors, the raster and reversed orders between
    # them in one call; outputs summed, gradients joined along the orders, the gate's gradient taken once. The
    # last case's slice order takes the line-vector backward, writing du and dΔ into the middle of the orders'
    # buffer (a batch stride of three orders)
    import dataclasses

    from medmamba.kernels.backends.triton_scan import backward as triton_backward

    spatial = (16, 1, 4)  # slice lines of 16 tokens, 4 of them: one group of line vectors
    low, ref = make_inputs(spatial, len(orders), dtype=dtype, **{"channels": 32, "N": 16, "seed": 23, **options})
    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
    monkeypatch.setattr(triton_backward, "_LAUNCHES", {})
    assert configs.forward_config().split_orders
    # 64 tokens: split them too; fold_merge (opt-in): a last group of one strided order sums and gates in its main
    # pass, no merge kernel
    short = dataclasses.replace(configs.forward_config(), split_min_length=0, fold_merge=True)
    monkeypatch.setattr(configs, "_FORWARD", short)
    monkeypatch.setattr(configs, "_BACKWARD", dataclasses.replace(configs.backward_config(), line_vectors=backward_lv))
    assert_matches_reference(low, ref, orders, dtype=dtype)
    assert sorted(x.line_vectors for x in triton_backward._LAUNCHES.values()) == [0] * (len(ranges) - 1) + [backward_lv]
    grouped = [x for x in triton_forward._LAUNCHES.values() if isinstance(x, triton_forward._Groups)]
    assert [g.ranges for g in grouped] == [ranges]
    assert [g.fold for g in grouped] == [orders[-1] == SLICE]
    lv = sorted(x.line_vectors for x in triton_forward._LAUNCHES.values() if isinstance(x, triton_forward._Launch))
    assert lv == [0] * (len(ranges) - 1) + [4]  # the strided order ran as line vectors
    assert {key[0].K for key in triton_backward._LAUNCHES} == {b - a for a, b in ranges}  # one backward per group
    if dtype == torch.bfloat16:  # rounded to bf16 once, after the fp32 sum, as one call: equal but for rare ties
        with torch.no_grad():
            grouped_out = selective_scan(*low, orders=orders, backend="triton").out
            with configs.override(forward=dataclasses.replace(short, split_orders=False)):
                one_call = selective_scan(*low, orders=orders, backend="triton").out
        assert (grouped_out != one_call).float().mean().item() < 0.02
    if grouped[0].fold:  # the folded sum is the merge kernel's, in the same order: the same bits
        with torch.no_grad():
            folded = selective_scan(*low, orders=orders, backend="triton")
            with configs.override(forward=dataclasses.replace(short, fold_merge=False)):
                merged = selective_scan(*low, orders=orders, backend="triton")
        assert torch.equal(folded.out, merged.out)
    if len(ranges) != 2 or dtype != torch.float32:
        return
    # the last state alone carries a gradient: no output gradient reaches the grouped backward
    got = selective_scan(*low, orders=orders, return_last_state=True, backend="triton")
    want = selective_scan(*ref, orders=orders, return_last_state=True, backend="reference")
    weights = torch.randn(want.last_state.shape, generator=generator(5), dtype=torch.float64)
    (du,) = torch.autograd.grad((got.last_state * weights.float()).sum(), low[0])
    (du_want,) = torch.autograd.grad((want.last_state * weights).sum(), ref[0])
    torch.testing.assert_close(du.double(), du_want, rtol=1e-4, atol=1e-4 * max(du_want.abs().max().item(), 1.0))


def test_calls_that_run_as_one_despite_mixing_orders():
    import dataclasses

    def ranges(orders, spatial=(16, 2, 8), merge="sum", N=16, channels=32, **changes):
        cfg = dataclasses.replace(configs.forward_config(), **{"split_min_length": 0, **changes})
        p = triton_forward.Plan(2, len(orders), channels, 1, N, math.prod(spatial), spatial, 16, N, 0)
        return triton_forward._order_ranges(p, orders, merge, cfg)

    segmamba = (RASTER, REVERSED, SLICE)
    assert ranges(segmamba) == ((0, 2), (2, 3))
    assert ranges((RASTER, SLICE, SLICE, REVERSED)) == ((0, 1), (1, 2), (2, 3), (3, 4))
    assert ranges(segmamba, merge="stack") == ()  # stacked outputs: one call
    assert ranges(segmamba, split_orders=False) == ()
    assert ranges(segmamba, save_pre_gate=False) == ((0, 2), (2, 3))  # the merge keeps the pre-gate output
    assert ranges(segmamba, N=8) == ()  # the slice order alone would not run as line vectors
    assert ranges(segmamba, channels=16) == ()
    assert ranges(segmamba, spatial=(16, 2, 6)) == ()
    assert ranges(segmamba, line_vectors=0) == ()
    assert ranges((RASTER, REVERSED)) == ()  # no strided order
    assert ranges((SLICE,)) == ()
    # short calls stay one (the groups' host time): 32³ tokens by default
    assert configs.forward_config().split_min_length == 32768
    assert ranges(segmamba, split_min_length=257) == ()
    assert ranges(segmamba, split_min_length=256) == ((0, 2), (2, 3))
    assert ranges(segmamba, spatial=(32, 32, 32), split_min_length=32768) == ((0, 2), (2, 3))


def test_orders_that_cannot_run_line_by_line():
    assert layout.lines((RASTER, REVERSED), (16, 8, 8), 4, 32) == (1, 0)  # no strided order
    assert layout.lines((SLICE,), (16, 2, 4), 4, 32) == (1, 0)  # 4 lines per row: not 8 neighbours
    assert layout.lines((SLICE,), (12, 2, 8), 4, 32) == (1, 0)  # lines of 12 tokens: not whole chunks
    assert layout.lines((ScanOrder((1, 2, 0), True),), (16, 2, 8), 4, 32) == (1, 0)  # reversed slice order
    assert layout.lines((ScanOrder((2, 1, 0)),), (16, 8, 8), 4, 32) == (1, 0)  # second axis strided too
    assert layout.lines((SLICE, ScanOrder((0, 2, 1))), (16, 32, 8), 4, 32) == (1, 0)  # lines of 16 and of 32
    assert layout.lines((SLICE,), (16, 2, 8), 4, 4) == (1, 0)  # 4 lanes cannot hold 8 lines


@pytest.mark.parametrize(
    ("spatial", "order", "cfg", "channels", "N", "dtype"),
    [
        ((3, 4, 5), SLICE, P(sub=2, num_warps=1, segments=3, save_pre_gate=False), 4, 3, torch.float32),
        ((48,), RASTER, P(sub=32, num_warps=1, segments=2, emulate_ptx=True, save_pre_gate=False), 32, 16,
         torch.bfloat16),
    ],
    ids=["tiles", "gpu-path-logic"],
)  # fmt: skip
def test_one_order_gate_gradient_without_a_saved_pre_gate_output(spatial, order, cfg, channels, N, dtype):
    # PassConfig(save_pre_gate=False): the forward keeps no pre-gate output and the backward rebuilds
    # y = Σ_n C·h + D·u for dz in its per-state loop (backward.GATE_GRAD)
    low, ref = make_inputs(spatial, 1, channels=channels, N=N, dtype=dtype, seed=21)
    u, A, B = low[0].unsqueeze(1), low[2][None], low[3].unsqueeze(1)
    D, z, bias = low[5][None], low[6], low[7][None]
    with configs.override(forward=cfg, backward=cfg):
        res = triton_forward.forward(u, low[1].unsqueeze(1), A, B, low[4].unsqueeze(1), D, z, bias, orders=(order,),
                                     delta_softplus=True, merge="sum", save=True)  # fmt: skip
        assert res.pre_gate is None and res.states is not None
        assert_matches_reference(low, ref, (order,), dtype=dtype)


def test_launch_settings_are_derived_once_per_call_signature(monkeypatch):
    # forward._LAUNCHES and backward._LAUNCHES: a call like an earlier one (shapes, strides, dtypes, alignment,
    # settings) reuses its launch settings; any of those changed derives them afresh, and the results stay right
    from medmamba.kernels.backends.triton_scan import backward as triton_backward

    derived = []
    for module, tag in ((triton_forward, "forward"), (triton_backward, "backward")):
        real = module._launch_settings
        monkeypatch.setattr(module, "_launch_settings", lambda *a, real=real, tag=tag: derived.append(tag) or real(*a))
        monkeypatch.setattr(module, "_LAUNCHES", {})
    cfg = P(sub=2, num_warps=1, segments=2)

    def run(low, ref, dtype=torch.float32, config=cfg):
        derived.clear()
        with configs.override(forward=config, backward=config):
            assert_matches_reference(low, ref, (RASTER,), dtype=dtype)
        return derived.copy()

    inputs = [make_inputs((48,), 1, channels=4, N=4, seed=s) for s in (1, 2)]
    assert run(*inputs[0]) == ["forward", "backward"]
    assert run(*inputs[1]) == []  # other tensors, same signature
    low, ref = inputs[1]
    shifted = list(low)
    flat = torch.empty(low[0].numel() + 1)
    shifted[0] = flat[1:].view(low[0].shape).copy_(low[0].detach()).requires_grad_()  # 4 bytes off alignment
    assert run(shifted, ref) == ["forward", "backward"]
    assert run(*make_inputs((48,), 1, channels=4, N=4, seed=3, dtype=torch.bfloat16), torch.bfloat16) == [
        "forward", "backward"]  # fmt: skip
    assert run(*make_inputs((48,), 1, channels=4, N=4, seed=4, z=False)) == ["forward", "backward"]
    assert run(low, ref, config=P(sub=2, num_warps=1, segments=3)) == ["forward", "backward"]
    assert run(low, ref) == []


def test_raster_calls_on_the_gpu_path_cap_their_registers(monkeypatch):
    # the default forward settings cap registers only for the per-token path without token offsets (every order
    # raster, VEC_MODE 1, or raster and reversed, VEC_MODE 3): there 128 keeps 16 one-warp programs per SM; calls
    # with a strided order (here saving for the backward: the per-order path, VEC_MODE 2) spill and keep the
    # compiler's choice
    import dataclasses

    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
    gpu_like = dataclasses.replace(configs.forward_config(), segments=2, emulate_ptx=True)
    assert gpu_like.raster_maxnreg == 128
    cases = (((RASTER,), (48,), 1, 128), ((RASTER, REVERSED), (2, 4, 4), 3, 128), ((RASTER, SLICE), (2, 4, 6), 2, None))
    for orders, spatial, vec, cap in cases:
        low, ref = make_inputs(spatial, len(orders), channels=32, N=16, seed=9)
        with configs.override(forward=gpu_like):
            assert_matches_reference(low, ref, orders, dtype=torch.float32, grads=False)
        (launch,) = triton_forward._LAUNCHES.values()
        assert launch.flags["VEC_MODE"] == vec and launch.flags.get("maxnreg") == cap
        triton_forward._LAUNCHES.clear()


def test_default_settings_take_the_per_order_path_for_training_calls_with_a_strided_order(monkeypatch):
    # SegMamba's three orders: a training step's forward and the backward move the raster and reversed programs'
    # chunks by 16-byte loads (VEC_MODE 2); a forward without gradients stays on tiles (faster there, configs.py)
    import dataclasses

    from medmamba.kernels.backends.triton_scan import backward as triton_backward

    orders, spatial = (RASTER, REVERSED, SLICE), (4, 4, 4)
    fwd = dataclasses.replace(configs.forward_config(), segments=2, emulate_ptx=True)
    bwd = dataclasses.replace(configs.backward_config(), segments=2, emulate_ptx=True)
    cube = torch.zeros(1, 3, 32, *spatial)
    assert fwd.vector_mode(True, orders, spatial, cube) == 0
    assert fwd.vector_mode(True, orders, spatial, cube, saving=True) == 2
    assert bwd.vector_mode(True, orders, spatial, cube) == 2
    low, ref = make_inputs(spatial, len(orders), channels=32, N=16, seed=21)
    for grads, modes in ((False, {0}), (True, {2})):
        monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
        monkeypatch.setattr(triton_backward, "_LAUNCHES", {})
        with configs.override(fwd, bwd), torch.set_grad_enabled(grads):
            assert_matches_reference(low, ref, orders, dtype=torch.float32, grads=grads)
        assert {launch.flags["VEC_MODE"] for launch in triton_forward._LAUNCHES.values()} == modes
        assert {launch.vec_mode for launch in triton_backward._LAUNCHES.values()} == (modes if grads else set())


def test_availability_and_spatial_limit():
    assert triton_scan.unavailable_reason(torch.device("cpu")) is None  # the interpreter is on (conftest)
    assert available_backends("cpu")["triton"] is None
    os_value = os.environ.pop("TRITON_INTERPRET")
    try:
        reason = triton_scan.unavailable_reason(torch.device("cpu"))
    finally:
        os.environ["TRITON_INTERPRET"] = os_value
    assert "needs a CUDA tensor" in reason and "backend='torch'" in reason
    with pytest.raises(BackendUnavailableError, match="1 to 3 spatial axes"):
        layout.spatial3((2, 2, 2, 2))


def test_float64_runs_in_float64_on_the_torch_backend():
    low, ref = make_inputs((9,), 1, dtype=torch.float64)
    got = selective_scan(*low, backend="triton").out
    want = selective_scan(*ref, backend="reference").out
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------- GPU


def _random_case(rng: torch.Generator):
    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=rng))]

    nd = pick([1, 2, 3])
    sizes = {1: [1, 5, 300, 4097], 2: [1, 3, 17, 64], 3: [1, 2, 7, 16, 24]}[nd]
    spatial = tuple(pick(sizes) for _ in range(nd))
    pool = (cross_scan(nd) + ((RASTER, REVERSED, SLICE) if nd == 3 else ())) if nd > 1 else (RASTER, REVERSED)
    K = pick([1, 2, 3, 4, 6])
    orders = tuple(pick(pool) for _ in range(K))
    groups = pick([1, 1, 2])
    channels = groups * pick([1, 3, 8, 48])
    return {
        "spatial": spatial, "orders": orders, "channels": channels, "groups": groups, "N": pick([1, 4, 16, 24]),
        "batch": pick([1, 2]), "dtype": pick([torch.float32, torch.bfloat16, torch.float16]),
        "z": pick([True, False]), "D": pick([True, False]), "bias": pick([True, False]),
        "merge": pick(["sum", "stack"]),
    }  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(16))
def test_gpu_random_shapes_match_the_torch_backend(seed):
    case = _random_case(generator(1000 + seed))
    orders, merge, dtype = case.pop("orders"), case.pop("merge"), case.pop("dtype")
    spatial = case.pop("spatial")
    low, ref = make_inputs(spatial, len(orders), dtype=dtype, seed=seed, device="cuda", **case)
    ref = [a.detach().float().cuda().requires_grad_() if a is not None else None for a in ref]
    # the torch backend in fp32 on the GPU is the second opinion at sizes the sequential reference cannot do
    assert_matches_reference(low, ref, orders, dtype=dtype if dtype != torch.float32 else torch.float32,
                             merge=merge, other="torch")  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_segmamba_sized_layer_scan_matches_torch_backend(dtype):
    orders = (RASTER, REVERSED, SLICE)
    low, ref = make_inputs((16, 24, 20), 3, batch=2, channels=96, N=16, dtype=dtype, seed=2, device="cuda")
    ref = [a.detach().float().cuda().requires_grad_() if a is not None else None for a in ref]
    assert_matches_reference(low, ref, orders, dtype=dtype, other="torch")
    # as two groups (PassConfig.split_orders, here below its default length): raster and reversed, then the slice
    # order as line vectors
    import dataclasses

    triton_forward._LAUNCHES.clear()
    with configs.override(forward=dataclasses.replace(configs.forward_config(), split_min_length=0)):
        assert_matches_reference(low, ref, orders, dtype=dtype, other="torch")
    launches = list(triton_forward._LAUNCHES.values())
    assert [x.ranges for x in launches if isinstance(x, triton_forward._Groups)] == [((0, 2), (2, 3))]
    assert sorted(x.line_vectors for x in launches if isinstance(x, triton_forward._Launch)) == [0, 4]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_gpu_vector_path_matches_torch_backend(dtype):
    # raster, whole chunks, 32-channel blocks: the inline-PTX path (16-byte loads, per-token forward, warp
    # reduce-scatter of dB/dC), with segments, two batch entries and every optional input
    low, ref = make_inputs((8, 16, 48), 1, batch=2, channels=64, N=16, dtype=dtype, seed=5, device="cuda")
    u, B = low[0], low[3]
    assert configs.forward_config().ptx(u.device, 32, 1)
    assert layout.vector_mode((RASTER,), (8, 16, 48), u.unsqueeze(1), B.unsqueeze(1)) == 1
    ref = [a.detach().float().cuda().requires_grad_() if a is not None else None for a in ref]
    assert_matches_reference(low, ref, (RASTER,), dtype=dtype, other="torch")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("orders", "options", "mode"),
    [
        ((RASTER, REVERSED), {}, 3),  # bidirectional: the per-order path by default
        ((RASTER, REVERSED, SLICE), {"mixed_vectors": True}, 2),  # opt-in with a strided order
        ((RASTER, REVERSED, SLICE), {"lines": True}, 0),  # line mode (forward; tiles), plain backward
        ((RASTER,), {"save_pre_gate": False}, 1),  # dz from the rebuilt pre-gate output
    ],
    ids=["bidirectional", "mixed-opt-in", "lines-opt-in", "no-saved-pre-gate"],
)
def test_gpu_bidirectional_and_opt_in_paths_match_torch_backend(orders, options, mode):
    # the bidirectional default and the opt-in settings; (16, 16, 32) bf16: whole chunks, aligned rows, lines of 16
    # tokens with 32 neighbours per row
    spatial = (16, 16, 32)
    low, ref = make_inputs(spatial, len(orders), batch=2, channels=64, N=16, dtype=torch.bfloat16, seed=8,
                           device="cuda")  # fmt: skip
    cfg = P(sub=32, num_warps=1, fill=8, fill_strided=32, **options)
    assert cfg.vector_mode(cfg.ptx(low[0].device, 32, 1), orders, spatial, low[0], low[3]) == mode
    if cfg.lines:
        p = triton_forward.plan(low[0], low[2], low[3])
        assert triton_forward.lines_of(p, cfg, orders, low[0]) == (16, 16)
    ref = [a.detach().float().cuda().requires_grad_() if a is not None else None for a in ref]
    with configs.override(forward=cfg, backward=cfg):
        assert_matches_reference(low, ref, orders, dtype=torch.bfloat16, other="torch")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_gpu_line_vectors_match_torch_backend(dtype):
    # one strided order (SegMamba's slice order alone) runs as line vectors by default (lines.py): 512 lines of 32
    # tokens in groups of 4, chained by the carry pass; every gradient through the chunk path's backward
    spatial = (32, 16, 32)
    low, ref = make_inputs(spatial, 1, batch=2, channels=64, N=16, dtype=dtype, seed=12, device="cuda")
    ref = [a.detach().float().cuda().requires_grad_() if a is not None else None for a in ref]
    triton_forward._LAUNCHES.clear()
    assert_matches_reference(low, ref, (SLICE,), dtype=dtype, other="torch")
    assert {launch.line_vectors for launch in triton_forward._LAUNCHES.values()} == {4}


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("dtype", "ptx"), [(torch.bfloat16, True), (torch.float32, True), (torch.bfloat16, False)], ids=str
)
def test_gpu_line_vector_backward_matches_torch_backend(dtype, ptx):
    # the opt-in line-vector backward (lines_backward.py): 512 lines of 32 tokens, two per thread, with the warp
    # reduce-scatter of dB/dC (ptx) or tl.sum; every gradient against the torch backend
    import dataclasses

    from medmamba.kernels.backends.triton_scan import backward as triton_backward

    low, ref = make_inputs((32, 16, 32), 1, batch=2, channels=64, N=16, dtype=dtype, seed=31, device="cuda")
    ref = [a.detach().float().cuda().requires_grad_() if a is not None else None for a in ref]
    bwd = dataclasses.replace(configs.backward_config(), line_vectors=2, inline_ptx=ptx)
    triton_backward._LAUNCHES.clear()
    with configs.override(backward=bwd):
        assert_matches_reference(low, ref, (SLICE,), dtype=dtype, other="torch")
    assert [launch.line_vectors for launch in triton_backward._LAUNCHES.values()] == [2]


@pytest.mark.gpu
def test_gpu_long_sequence_uses_segments_and_matches_torch_backend():
    low, ref = make_inputs((40_000,), 1, batch=1, channels=8, N=16, seed=4, device="cuda")
    ref = [a.detach().float().cuda().requires_grad_() if a is not None else None for a in ref]
    assert_matches_reference(low, ref, (RASTER,), dtype=torch.float32, other="torch")


@pytest.mark.gpu
def test_gpu_auto_backend_is_triton_and_matches_reference_on_tiny_input():
    low, ref = make_inputs((3, 4, 5), 3, channels=4, N=4, seed=9, device="cuda")
    orders = (RASTER, REVERSED, SLICE)
    auto = selective_scan(*low, orders=orders).out
    tri = selective_scan(*low, orders=orders, backend="triton").out
    assert torch.equal(auto, tri)
    assert_matches_reference(low, ref, orders, dtype=torch.float32)


# ----------------------------------------------------------------------------------------- causal conv


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
    leaves = [t for t in (x, w, b) if t is not None]
    want = causal_conv(x, w, b, orders=orders, backend="torch")  # to_sequence + F.conv1d + from_sequence
    weight = torch.randn(want.shape, generator=g, dtype=torch.float64)
    g_want = torch.autograd.grad((want * weight).sum(), leaves)
    low = [t.detach().float().requires_grad_() for t in leaves]
    got = causal_conv(low[0], low[1], low[2] if bias else None, orders=orders, backend="triton")
    assert got.shape == (2, K, channels, *spatial) and got.dtype == torch.float32
    g_got = torch.autograd.grad((got * weight.float()).sum(), low)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for a, c in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5 * max(c.abs().max().item(), 1.0))


@pytest.mark.parametrize("width", [2, 5])  # the general path (width 4 has its own, written out)
def test_causal_conv_of_other_widths_matches_conv1d(width):
    g = generator(22)
    orders = (RASTER, REVERSED, SLICE, ScanOrder((0, 2, 1)))
    x = torch.randn(2, 3, 3, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(len(orders), 3, width, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(len(orders), 3, generator=g, dtype=torch.float64).requires_grad_()
    want = causal_conv(x, w, b, orders=orders, backend="torch")
    weight = torch.randn(want.shape, generator=g, dtype=torch.float64)
    g_want = torch.autograd.grad((want * weight).sum(), (x, w, b))
    low = [t.detach().float().requires_grad_() for t in (x, w, b)]
    got = causal_conv(*low, orders=orders, backend="triton")
    g_got = torch.autograd.grad((got * weight.float()).sum(), low)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for a, c in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5 * max(c.abs().max().item(), 1.0))


@pytest.mark.gpu
@pytest.mark.parametrize(("width", "bias"), [(4, True), (4, False), (3, True)], ids=["w4", "w4-nobias", "w3"])
def test_gpu_causal_conv_matches_torch_backend(width, bias):
    # SegMamba's three orders and a column-major order at a real size, bf16: every mode of the conv's neighbours
    g = torch.Generator(device="cuda").manual_seed(23)
    orders = (RASTER, REVERSED, SLICE, ScanOrder((0, 2, 1)))
    x = torch.randn(2, 96, 24, 32, 40, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    w = (0.3 * torch.randn(len(orders), 96, width, device="cuda", generator=g)).requires_grad_()
    b = (0.1 * torch.randn(len(orders), 96, device="cuda", generator=g)).requires_grad_() if bias else None
    leaves = [t for t in (x, w, b) if t is not None]
    out = {}
    for backend in ("torch", "triton"):
        y = causal_conv(x, w, b, orders=orders, backend=backend)
        gy = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(24))
        out[backend] = (y.float(), *torch.autograd.grad((y.float() * gy).sum(), leaves))
    for got, want in zip(out["triton"], out["torch"], strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * max(want.abs().max().item(), 1.0))


def _scan_conv_norm(inputs, orders, seed):
    """Scan, causal conv and channel LayerNorm forward and backward on the GPU: every output and gradient."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    leaves = [a for a in inputs if a is not None]
    res = selective_scan(*inputs, orders=orders, backend="triton")
    x = inputs[0] if len(orders) == 1 else inputs[0][:, 0]
    w = torch.randn(len(orders), x.shape[1], 4, device="cuda", generator=gen).requires_grad_()
    conv = causal_conv(x, w, orders=orders, backend="triton")
    norm = channel_layer_norm(x, w[0, :, 0], w[0, :, 1], 1e-5)
    loss = sum((t.float() * torch.randn(t.shape, device="cuda", generator=gen)).sum() for t in (res.out, conv, norm))
    return (res.out, conv, norm, *torch.autograd.grad(loss, [*leaves, w]))


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("spatial", "orders", "dtype", "offset"),
    [
        ((16, 16, 32), (RASTER,), torch.bfloat16, 0),  # the vector path, segments
        ((16, 24, 20), (RASTER, REVERSED, SLICE), torch.float32, 0),  # tiles, merge, line segments
        ((16, 16, 32), (RASTER,), torch.float16, 1),  # u and delta 2 bytes off 16-byte boundaries: tiles
    ],
    ids=["raster-bf16", "three-orders-fp32", "misaligned-fp16"],
)
def test_gpu_direct_launches_run_the_kernels_triton_picks(spatial, orders, dtype, offset):
    # launch.Launcher: a repeated argument key launches the remembered compiled kernel by its C launcher. In
    # "check" mode Triton launches and must pick that kernel; the direct launches must give the same bits.
    from medmamba.kernels.backends.triton_scan import launch

    low, _ = make_inputs(spatial, len(orders), batch=2, channels=64, N=16, dtype=dtype, seed=13, device="cuda")
    if offset:
        for i in (0, 1):
            flat = torch.empty(low[i].numel() + offset, device="cuda", dtype=dtype)
            low[i] = flat[offset:].view(low[i].shape).copy_(low[i].detach()).requires_grad_()
        assert low[0].data_ptr() % 16 != 0
    with launch.use_mode("jit"):
        want = _scan_conv_norm(low, orders, seed=14)
    with launch.use_mode("check"):
        for _ in range(2):  # the first call remembers the kernels, the second checks them
            checked = _scan_conv_norm(low, orders, seed=14)
    with launch.use_mode("direct"):
        fresh = [a.detach().clone().requires_grad_() if a is not None else None for a in low]
        direct = [_scan_conv_norm(inputs, orders, seed=14) for inputs in (low, fresh if not offset else low)]
    for got in (checked, *direct):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


def test_causal_conv_rejects_bad_shapes():
    x = torch.randn(1, 3, 5)
    with pytest.raises(ScanInputError, match="weight must be"):
        causal_conv(x, torch.randn(3, 4), orders=(RASTER,))
    with pytest.raises(ScanInputError, match="x must be"):
        causal_conv(torch.randn(1, 2, 5), torch.randn(1, 3, 4), orders=(RASTER,))
    with pytest.raises(ScanInputError, match="bias must be"):
        causal_conv(x, torch.randn(1, 3, 4), torch.randn(3), orders=(RASTER,))
