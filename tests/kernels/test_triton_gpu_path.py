"""The Triton scan's GPU path (16-byte chunk moves, the per-token forward, the warp reduce-scatter of dB/dC, the
per-order decisions of mixed calls, the register caps) under TRITON_INTERPRET=1, its inline PTX emulated
(ptx.INTERPRETING): its logic against the float64 reference, and which calls take it."""

from __future__ import annotations

import pytest
import torch

from medmamba.kernels import RASTER, REVERSED, SLICE, ScanOrder
from medmamba.kernels.backends.triton_scan import configs, layout
from medmamba.kernels.backends.triton_scan import forward as triton_forward
from tests.kernels.scan_checks import P, assert_matches_reference, forward_launch, make_inputs


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
    ("spatial", "orders", "dtype", "mode", "early", "mids"),
    [
        # 3 chunks over 2 segments (raster bf16: the gated test in test_triton_scan)
        ((48,), (RASTER,), torch.float32, 1, True, True),
        ((2, 4, 4), (REVERSED,), torch.float16, 3, True, False),
        # the backward's loads where they are used (no prefetch, no load_ahead: the settings' opt-outs)
        ((2, 4, 4), (REVERSED,), torch.float16, 3, False, True),
        ((4, 2, 4), (RASTER, REVERSED), torch.bfloat16, 3, True, True),  # each program reads its order's way
        (
            (2, 4, 4),
            (RASTER, REVERSED, SLICE),
            torch.float32,
            2,
            True,
            True,
        ),  # neighbours forwards, backwards, gathered
    ],
    ids=["raster-fp32", "reversed-fp16", "reversed-fp16-loads-in-place", "bidirectional-bf16", "segmamba-fp32"],
)
def test_gpu_path_logic_matches_the_float64_reference_under_the_interpreter(
    spatial, orders, dtype, mode, early, mids, monkeypatch
):
    # the GPU path (16-byte chunk moves, the per-token forward, the warp reduce-scatter of dB/dC, per-order
    # decisions of a mixed call) with its inline PTX emulated (ptx.INTERPRETING): its logic, not its speed.
    # mids: the forward saves the chunks' middle states and the backward reads them (PassConfig.mid_states; the
    # per-token path only, so not the mixed call)
    from medmamba.kernels.backends.triton_scan import backward as triton_backward

    low, ref = make_inputs(spatial, len(orders), channels=32, N=16, dtype=dtype, seed=11)
    cfg = P(sub=32, num_warps=1, segments=2, emulate_ptx=True, mixed_vectors=True, token_segments=True,
            prefetch=early, load_ahead=early, mid_states=mids)  # fmt: skip
    canonical = [x.unsqueeze(1) if len(orders) == 1 else x for x in (low[0], low[3])]
    assert cfg.vector_mode(cfg.ptx(low[0].device, 32, 1), orders, spatial, *canonical) == mode
    monkeypatch.setattr(triton_backward, "_LAUNCHES", {})
    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
    with configs.override(forward=cfg, backward=cfg):
        assert_matches_reference(low, ref, orders, dtype=dtype)
    # the backward runs the forward's mode too (raster and reversed orders: no token offsets either)
    assert {launch.vec_mode for launch in triton_backward._LAUNCHES.values()} == {mode}
    # and raster or reversed orders take the per-token segment pass when asked (PassConfig.token_segments)
    assert {launch.segment_vec for launch in triton_backward._LAUNCHES.values()} == {mode if mode != 2 else 0}
    assert any(launch.save_mids for launch in triton_forward._LAUNCHES.values()) == (mids and mode != 2)


def test_grouped_call_hands_each_group_its_middle_states(monkeypatch):
    # SegMamba's three orders as groups (PassConfig.split_orders) with PassConfig.mid_states on the emulated GPU
    # path: each group saves its chunks' middle states (the raster and reversed group on the per-token path, the
    # slice order as line vectors) and its backward gets them
    import dataclasses

    from medmamba.kernels.backends.triton_scan import backward as triton_backward

    low, ref = make_inputs((16, 1, 4), 3, channels=32, N=16, dtype=torch.float32, seed=29)
    fwd = dataclasses.replace(configs.forward_config(), emulate_ptx=True, split_min_length=0, mid_states=True)
    bwd = dataclasses.replace(configs.backward_config(), emulate_ptx=True)
    handed = []
    backward = triton_backward.backward

    def recording(*args, mids=None, **kw):
        handed.append((len(kw["orders"]), mids is not None))
        return backward(*args, mids=mids, **kw)

    monkeypatch.setattr(triton_backward, "backward", recording)
    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
    with configs.override(forward=fwd, backward=bwd):
        assert_matches_reference(low, ref, (RASTER, REVERSED, SLICE), dtype=torch.float32)
    assert sorted(handed) == [(1, True), (2, True)]


def test_grouped_call_derives_each_groups_settings_once(monkeypatch):
    # the groups' launch settings are remembered with the call's (host time before the first kernel): a second call
    # of the signature derives none, and computes what the first did
    import dataclasses

    from medmamba.kernels import selective_scan

    low, _ = make_inputs((16, 1, 2), 3, channels=32, N=16, dtype=torch.float32, seed=31)
    fwd = dataclasses.replace(configs.forward_config(), emulate_ptx=True, split_min_length=0, line_vectors=2)
    derived = []
    settings = triton_forward.settings
    monkeypatch.setattr(triton_forward, "settings", lambda *a, **k: derived.append(a[10]) or settings(*a, **k))
    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})

    def call(tensors):
        with torch.no_grad(), configs.override(forward=fwd):
            return selective_scan(*tensors, orders=(RASTER, REVERSED, SLICE), backend="triton").out

    first = call(low)
    assert derived.count("stack") == 2  # each group's, once
    (groups,) = [v for v in triton_forward._LAUNCHES.values() if type(v) is triton_forward._Groups]
    assert sorted(groups.group_launches) == [0, 1] and groups.group_launches[0] is not groups.group_launches[1]
    calls = len(derived)
    again = call([x.clone() if x is not None else None for x in low])
    assert derived.count("stack") == 2 and derived[calls:] == ["sum"] and torch.equal(again, first)


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
    # chunks by 16-byte loads (VEC_MODE 2); a forward without gradients stays on tiles (faster there, configs.py).
    # The training step runs against float64; the tiles' forward is everywhere else in these tests
    import dataclasses

    from medmamba.kernels.backends.triton_scan import backward as triton_backward

    orders, spatial = (RASTER, REVERSED, SLICE), (2, 4, 4)  # two chunks: one per segment
    fwd = dataclasses.replace(configs.forward_config(), segments=2, emulate_ptx=True)
    bwd = dataclasses.replace(configs.backward_config(), segments=2, emulate_ptx=True)
    cube = torch.zeros(1, 3, 32, *spatial)
    assert fwd.vector_mode(True, orders, spatial, cube) == 0
    assert fwd.vector_mode(True, orders, spatial, cube, saving=True) == 2
    assert bwd.vector_mode(True, orders, spatial, cube) == 2
    low, ref = make_inputs(spatial, len(orders), channels=32, N=16, seed=21)
    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
    monkeypatch.setattr(triton_backward, "_LAUNCHES", {})
    with configs.override(fwd, bwd):
        assert forward_launch(low, orders, save=False).flags["VEC_MODE"] == 0
        assert_matches_reference(low, ref, orders, dtype=torch.float32)
    assert [launch.flags["VEC_MODE"] for launch in triton_forward._LAUNCHES.values()] == [2]
    assert [launch.vec_mode for launch in triton_backward._LAUNCHES.values()] == [2]
