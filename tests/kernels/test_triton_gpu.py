"""The Triton scan and causal conv on a CUDA device at real sizes (marked ``gpu``; they skip without one): random
shape fuzzing, SegMamba-sized calls, every path and opt-in, with the torch backend as the second opinion, and the
direct launches against Triton's own."""

from __future__ import annotations

import pytest
import torch

from medmamba.kernels import (
    RASTER,
    REVERSED,
    SLICE,
    ScanOrder,
    causal_conv,
    channel_layer_norm,
    cross_scan,
    selective_scan,
)
from medmamba.kernels.backends.triton_scan import configs, layout
from medmamba.kernels.backends.triton_scan import forward as triton_forward
from tests.helpers import generator
from tests.kernels.scan_checks import P, assert_matches_reference, make_inputs


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
    for launcher in launch._LAUNCHERS:  # what earlier tests remembered (the fused carry's cooperative kernel)
        launcher._kernels.clear()
    with launch.use_mode("jit"):
        want = _scan_conv_norm(low, orders, seed=14)
    with launch.use_mode("check"):
        for _ in range(2):  # the first call remembers the kernels, the second checks them
            checked = _scan_conv_norm(low, orders, seed=14)
    with launch.use_mode("direct"):
        fresh = [a.detach().clone().requires_grad_() if a is not None else None for a in low]
        direct = [_scan_conv_norm(inputs, orders, seed=14) for inputs in (low, fresh if not offset else low)]
    with launch.use_mode("direct-triton"):  # Triton's C launchers only
        direct.append(_scan_conv_norm(low, orders, seed=14))
    for got in (checked, *direct):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)
    # the native launcher (native_launch.c) took every remembered kernel: the direct launches above went through it
    kept = [(launcher.fn.__name__, spec) for launcher in launch._LAUNCHERS for _, _, spec in launcher._kernels.values()]
    assert kept and [name for name, spec in kept if spec is None] == []


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("spatial", "orders", "dtype"),
    [((16, 16, 16), (RASTER, REVERSED, SLICE), torch.bfloat16), ((4096,), (RASTER,), torch.float32)],
    ids=["3-order", "1d"],
)
def test_gpu_scan_replays_as_a_cuda_graph(spatial, orders, dtype):
    # captured once (forward, then forward+backward) after warm-up on a side stream; a replay on new values in the
    # static inputs gives the eager call's output and gradients bit for bit (the kernels are deterministic)
    low, _ = make_inputs(spatial, len(orders), batch=2, channels=32, N=16, dtype=dtype, seed=21, device="cuda")
    args = [a.detach() if a is not None else None for a in low]
    leaves = [a.detach().requires_grad_() if a is not None else None for a in args]  # share the static memory
    gy = torch.randn((2, 32, *spatial), device="cuda", dtype=dtype)

    def forward():
        with torch.no_grad():
            return selective_scan(*args, orders=orders, backend="triton").out

    def forward_backward():
        for a in leaves:
            if a is not None:
                a.grad = None
        out = selective_scan(*leaves, orders=orders, backend="triton").out
        out.backward(gy)
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            forward()
            forward_backward()
    torch.cuda.current_stream().wait_stream(side)
    graphs = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graphs[0]):
        out_fwd = forward()
    with torch.cuda.graph(graphs[1]):
        out_fb = forward_backward()
    g = generator(22)
    for _ in range(2):
        with torch.no_grad():  # new values in place, each tensor's own shuffled (A stays negative)
            for a in [*args, gy]:
                if a is not None:
                    a.copy_(a.flatten()[torch.randperm(a.numel(), generator=g).cuda()].view_as(a))
        graphs[0].replay()
        graphs[1].replay()
        fresh = [a.detach().clone().requires_grad_() if a is not None else None for a in args]
        want = selective_scan(*fresh, orders=orders, backend="triton").out
        want.backward(gy)
        assert torch.equal(out_fb.detach(), want.detach())
        assert torch.equal(out_fwd, forward())  # no grad: a forward that saves nothing (its own rounding for K > 1)
        for a, b in zip(leaves, fresh, strict=True):
            if a is not None:
                assert torch.equal(a.grad, b.grad)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("spatial", "orders", "channels", "dtype"),
    [
        ((16, 16, 16), (RASTER,), 64, torch.float32),
        ((16, 16, 16), (RASTER,), 96, torch.bfloat16),
        ((7, 9, 33), (RASTER, REVERSED), 48, torch.float16),
        ((4097,), (REVERSED,), 32, torch.float32),
    ],
    ids=["16³-fp32", "16³-bf16", "odd-K2-fp16", "1d-reversed"],
)
def test_gpu_fused_carry_runs_as_one_cooperative_launch(spatial, orders, channels, dtype):
    # PassConfig.fused_carry: segment pass, carry and main pass in one launch whose programs wait for their row's
    # carry; output and every gradient as the torch backend's, and the counters zero again afterwards
    import dataclasses

    low, ref = make_inputs(spatial, len(orders), batch=2, channels=channels, N=16, dtype=dtype, seed=5, device="cuda")
    ref = [a.detach().float().cuda().requires_grad_() if a is not None else None for a in ref]
    triton_forward._LAUNCHES.clear()
    fused = dataclasses.replace(configs.forward_config(), fused_carry=True)
    with configs.override(forward=fused):
        for _ in range(2):  # the second call finds the counters the first left
            assert_matches_reference(low, ref, orders, dtype=dtype, other="torch")
    torch.cuda.synchronize()
    launches = [x for x in triton_forward._LAUNCHES.values() if isinstance(x, triton_forward._Launch)]
    assert any(x.fused and "fused" in x.sites and "apart" not in x.sites for x in launches)
    assert all(int(words.abs().sum()) == 0 for words in triton_forward._SYNC.values())
