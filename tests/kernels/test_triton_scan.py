"""The Triton scan backend against the float64 reference under TRITON_INTERPRET=1 on the CPU: every order, the
optional inputs and merges, and the chunk path's segments, channel blocks, carry and finish passes (tiny shapes, small
tiles that force several chunks, segments, channel blocks and sub-blocks). The GPU path's logic, line modes, groups of
orders and the causal conv have files of their own (test_triton_*.py); GPU runs at real sizes: test_triton_gpu.py."""

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
    ScanOrder,
    available_backends,
    cross_scan,
    order_indices,
    selective_scan,
)
from medmamba.kernels.backends import triton_scan
from medmamba.kernels.backends.triton_scan import configs, layout
from medmamba.kernels.backends.triton_scan import forward as triton_forward
from tests.helpers import generator
from tests.kernels.scan_checks import NAMES, P, assert_matches_reference, make_inputs, weighted_grads

#: tiny tiles so that a few dozen tokens already span several chunks, sub-blocks and channel blocks
TINY = P(sub=1, num_warps=1)
TINY_SEGMENTS = P(sub=2, num_warps=1, segments=3)

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


@pytest.mark.parametrize("tall", [False, True])
def test_finish_pass_sums_partials_tile_by_tile(monkeypatch, tall):
    # dA, dD and d(delta_bias) are summed over 2 batches × 6 segments = 12 partial rows, 8 (or, in tall tiles, 16:
    # one partial tile) at a time, and over column blocks of 2 (or 4) columns (C·N = 8 and C = 4 columns, two orders)
    from medmamba.kernels.backends.triton_scan import backward

    monkeypatch.setattr(backward, "FINISH_TILES", (8, 2, 4))
    monkeypatch.setattr(backward, "FINISH_TALL_TILES", (16, 4, 8))
    monkeypatch.setattr(backward, "FINISH_TALL_FROM", 12 if tall else 13)  # batch × segments = 12 rows
    monkeypatch.setattr(backward, "_LAUNCHES", {})
    launcher, tiles = backward._bwd_finish_launch, []
    run = launcher.launch
    monkeypatch.setattr(launcher, "launch", lambda grid, args, meta, *memo: tiles.append(meta["ROWS"]) or run(
        grid, args, meta, *memo))  # fmt: skip
    low, ref = make_inputs((4, 6, 8), 2, batch=2, channels=4, seed=4)
    cfg = P(sub=2, num_warps=1, segments=6)
    with configs.override(cfg, cfg):
        assert_matches_reference(low, ref, (RASTER, SLICE), dtype=torch.float32)
    assert tiles and set(tiles) == {16 if tall else 8}


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
    # SegMamba's 16³ stage (4,096 tokens, 24 rows) on 132 SMs at fill 8: 2-chunk segments, or min_chunks long
    assert layout.segments(nchunks=256, rows=24, target_programs=2112) == (128, 2)
    assert layout.segments(nchunks=256, rows=24, target_programs=2112, min_chunks=4) == (64, 4)
    assert layout.segments(nchunks=3, rows=24, target_programs=2112, min_chunks=4) == (1, 3)
    # a longer call's segments are longer anyway (U-Mamba's 32³ stage: 16 rows)
    assert layout.segments(nchunks=2048, rows=16, target_programs=2112, min_chunks=4) == (256, 8)


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


@pytest.mark.parametrize(
    ("spatial", "order", "cfg", "channels", "N", "dtype"),
    [
        ((3, 4, 5), SLICE, P(sub=2, num_warps=1, segments=3, save_pre_gate=False), 4, 3, torch.float32),
        ((48,), RASTER, P(sub=32, num_warps=1, segments=2, emulate_ptx=True, save_pre_gate=False,
                          token_segments=True), 32, 16, torch.bfloat16),  # the gated per-token segment pass too
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


@pytest.mark.parametrize(
    ("spatial", "orders", "extras"),
    [((5, 7), (RASTER,), True), ((3, 4, 5), (RASTER, REVERSED, SLICE), True), ((3, 4, 5), (SLICE,), False)],
    ids=["raster", "3-order", "slice-no-extras"],
)
def test_no_grad_calls_of_a_known_signature_take_the_remembered_forward(spatial, orders, extras, monkeypatch):
    # selective_scan's no-grad memo: a second call of a signature launches the remembered forward with the
    # arguments as given (no checks, views or settings key); same results as the full path, and the full path again
    # after a settings override or a cleared memo, or for another signature
    import medmamba.kernels.scan as scan_module

    K = len(orders)
    low, _ = make_inputs(spatial, K, channels=4, N=3, seed=11, z=extras, D=extras, bias=extras)
    args = [a.detach() if a is not None else None for a in low]
    runs = []
    real_run = triton_forward.run
    monkeypatch.setattr(triton_forward, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))

    def call(tensors):
        with torch.no_grad(), configs.override(TINY, TINY):
            return selective_scan(*tensors, orders=orders, backend="triton", return_last_state=True)

    scan_module._NO_GRAD.clear()
    full = call(args)
    assert len(scan_module._NO_GRAD) == 1 and next(iter(scan_module._NO_GRAD.values())) is not None
    fresh = [a.clone() if a is not None else None for a in args]  # same signature, other memory
    settings_memo = dict(triton_forward._LAUNCHES)
    monkeypatch.setattr(triton_forward, "settings", lambda *a, **k: pytest.fail("the full path ran"))
    fast = call(fresh)
    assert torch.equal(fast.out, full.out) and torch.equal(fast.last_state, full.last_state)
    assert fast.out.data_ptr() != full.out.data_ptr() and len(runs) == 2
    monkeypatch.undo()
    monkeypatch.setattr(triton_forward, "run", lambda *a, **k: runs.append(1) or real_run(*a, **k))
    with torch.no_grad(), configs.override(TINY_SEGMENTS, TINY_SEGMENTS):  # other settings: derived again
        seg = selective_scan(*fresh, orders=orders, backend="triton", return_last_state=True)
    assert len(triton_forward._LAUNCHES) > len(settings_memo)
    torch.testing.assert_close(seg.out, full.out, rtol=1e-5, atol=1e-6)
    triton_forward._LAUNCHES.clear()
    assert torch.equal(call(fresh).out, full.out) and len(triton_forward._LAUNCHES) >= 1
    strided = [a.transpose(-1, -2).contiguous().transpose(-1, -2) if a is not None and a.ndim > 2 else a for a in fresh]
    assert torch.equal(call(strided).out, full.out)
    assert len(scan_module._NO_GRAD) == 2


@pytest.mark.parametrize(
    ("spatial", "orders"), [((5, 7), (RASTER,)), ((2, 2, 3), (RASTER, REVERSED, SLICE))], ids=["raster", "3-order"]
)
def test_grad_calls_of_a_known_signature_take_the_remembered_forward(spatial, orders, monkeypatch):
    # selective_scan's memo of calls that record gradients: a second call of a signature (requires_grad included)
    # goes through the autograd Function with the launch settings derived once (no checks, backend choice or
    # settings key); its output and every gradient are the full path's, bit for bit. Other requires_grad flags, or
    # other settings, take the full path again.
    import medmamba.kernels.scan as scan_module

    low, _ = make_inputs(spatial, len(orders), channels=4, N=3, seed=13, z=True, D=True, bias=True)
    grad_out = torch.randn_like(low[0][:, 0] if len(orders) > 1 else low[0])

    def call(tensors, cfg=TINY):
        leaves = [a.detach().requires_grad_() if a is not None else None for a in tensors]
        with configs.override(cfg, cfg):
            out = selective_scan(*leaves, orders=orders, backend="triton").out
            out.backward(grad_out)
        return out.detach(), [a.grad for a in leaves if a is not None]

    scan_module._GRAD.clear()
    full, full_grads = call(low)
    assert len(scan_module._GRAD) == 1 and next(iter(scan_module._GRAD.values())) is not None
    monkeypatch.setattr(triton_forward, "settings", lambda *a, **k: pytest.fail("the full path ran"))
    fresh = [a.detach().clone() if a is not None else None for a in low]  # same signature, other memory
    fast, fast_grads = call(fresh)
    assert torch.equal(fast, full) and all(torch.equal(a, b) for a, b in zip(fast_grads, full_grads, strict=True))
    monkeypatch.undo()
    seg, seg_grads = call(fresh, TINY_SEGMENTS)  # other settings: the full path, the same values
    torch.testing.assert_close(seg, full, rtol=1e-5, atol=1e-6)
    for got, want in zip(seg_grads, full_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    leaves = [a.detach().requires_grad_(i != 2) if a is not None else None for i, a in enumerate(fresh)]  # A frozen
    with configs.override(TINY, TINY):
        selective_scan(*leaves, orders=orders, backend="triton").out.backward(grad_out)
    assert leaves[2].grad is None and torch.equal(leaves[0].grad, full_grads[0])
    assert len(scan_module._GRAD) == 2  # another signature


def test_fake_tensors_take_the_full_path_and_are_remembered_nowhere():
    # shape tracing and memory estimates (plans/memory.py) run the scan on fake tensors, which have no memory: the
    # memos' keys would read their data pointers (a deprecation warning, an error in later PyTorch) and could hand a
    # real call what a fake one derived
    import warnings

    from torch._subclasses.fake_tensor import FakeTensorMode

    import medmamba.kernels.scan as scan_module

    low, _ = make_inputs((4, 5), 1, channels=4, N=3, seed=3)
    before = (dict(scan_module._NO_GRAD), dict(scan_module._GRAD))
    with FakeTensorMode() as mode, warnings.catch_warnings():
        warnings.simplefilter("error")
        fake = [mode.from_tensor(a) if a is not None else None for a in low]
        out = selective_scan(*fake, backend="torch").out
        leaves = [mode.from_tensor(a).requires_grad_() if a is not None else None for a in low]
        selective_scan(*leaves, backend="torch").out.sum().backward()
    assert out.shape == low[0].shape and leaves[0].grad.shape == low[0].shape
    assert (dict(scan_module._NO_GRAD), dict(scan_module._GRAD)) == before


@pytest.mark.parametrize(("orders", "spatial", "N"), [((RASTER,), (5, 16), 3), ((RASTER, REVERSED), (77,), 5)])
def test_fused_carry_chains_the_segments_in_blocks_and_leaves_the_counters_zero(monkeypatch, orders, spatial, N):
    # PassConfig.fused_carry under the interpreter: the fused kernel's two phases (segment pass and carry, then the
    # main pass). 5 segments, their 4 boundaries carried 2 at a time (so across blocks), N states split between
    # the helpers; against the float64 reference, output and every gradient
    monkeypatch.setattr(triton_forward, "CARRY_STEP", 2)
    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
    monkeypatch.setattr(triton_forward, "_SYNC", {})
    low, ref = make_inputs(spatial, len(orders), channels=4, N=N, seed=11)
    with configs.override(P(sub=2, num_warps=1, segments=5, fused_carry=True), TINY):
        assert_matches_reference(low, ref, orders, dtype=torch.float32)
        assert_matches_reference(low, ref, orders, dtype=torch.float32)  # the counters as the first call left them
    (launch,) = triton_forward._LAUNCHES.values()
    assert launch.fused and launch.nsplit == 5 and launch.helpers == 4
    assert all(int(words.abs().sum()) == 0 for words in triton_forward._SYNC.values())
