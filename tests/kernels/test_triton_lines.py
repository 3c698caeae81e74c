"""Strided scan orders line by line under TRITON_INTERPRET=1: line mode (layout.lines), the line-vector forward
(lines.py) and backward (lines_backward.py) against the float64 reference, and the calls that cannot take them."""

from __future__ import annotations

import pytest
import torch

from medmamba.kernels import RASTER, REVERSED, SLICE, TEMPORAL, ScanOrder
from medmamba.kernels.backends.triton_scan import configs, layout
from medmamba.kernels.backends.triton_scan import forward as triton_forward
from tests.helpers import generator
from tests.kernels.scan_checks import NAMES, P, assert_matches_reference, forward_launch, make_inputs


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
    # against float64, with the defaults (LV 4) or another LV; stacked outputs in one case
    import dataclasses

    kw = {"channels": 32, "N": 16, "seed": 17, **options}
    low, ref = make_inputs(spatial, 1, dtype=dtype, **kw)
    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
    cfg = dataclasses.replace(configs.forward_config(), line_vectors=lv)
    assert configs.forward_config().line_vectors == 4
    with configs.override(forward=cfg):
        assert_matches_reference(low, ref, (order,), dtype=dtype)
        if order == TEMPORAL:
            assert_matches_reference(low, ref, (order,), dtype=dtype, merge="stack", grads=False)
    assert {launch.line_vectors for launch in triton_forward._LAUNCHES.values()} == {lv}
    # the cap for calls of strided orders only reaches the line-vector launches (128 by default), maxnreg does not
    assert {launch.flags["maxnreg"] for launch in triton_forward._LAUNCHES.values()} == {128}
    with configs.override(forward=dataclasses.replace(cfg, strided_maxnreg=None, maxnreg=168)):
        launch = forward_launch(low, (order,), save=True)
    assert launch.line_vectors == lv and "maxnreg" not in launch.flags


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
    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
    # both cases with the middle states asked for (PassConfig.mid_states): the line-vector forward saves them and
    # the line-vector backward reads them; the chunk forward of a strided order saves none
    fwd = dataclasses.replace(configs.forward_config(), line_vectors=forward_lv, mid_states=True)
    # the first case takes the GPU path's dB/dC sums (ptx._lane_sum8, emulated) and the line-vector segment pass
    # (line_vector_segments), the second tl.sum, the chunk path's segment pass and state n + 1's A and B_n row
    # loaded during state n (line_vector_load_ahead)
    first = forward_lv == 4
    bwd = dataclasses.replace(configs.backward_config(), line_vectors=2, emulate_ptx=first, line_vector_segments=first,
                              line_vector_load_ahead=not first)  # fmt: skip
    # the defaults since the H100 timings (configs._BACKWARD)
    assert configs.backward_config().line_vectors == 2 and configs.backward_config().line_vector_segments
    with configs.override(forward=fwd, backward=bwd):
        assert_matches_reference(low, ref, (order,), dtype=dtype)
    launches = list(triton_backward._LAUNCHES.values())
    assert [(x.line_vectors, x.segment_lines) for x in launches] == [(2, first)]
    assert any(x.save_mids for x in triton_forward._LAUNCHES.values()) == first


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
    # the launch settings of such calls: the chunk path (whose numerics every other test of it checks)
    low, _ = make_inputs((16, 1, 8), 1, channels=32, N=16, seed=2)  # 2 groups of 4 lines
    assert forward_launch(low, (SLICE,), save=False).line_vectors == 4
    monkeypatch.setattr(triton_forward, "MAX_GRID_Y", 1)  # more groups of lines than a grid axis holds
    assert forward_launch(low, (SLICE,), save=False).line_vectors == 0
    monkeypatch.undo()
    low, _ = make_inputs((16, 1, 4), 1, channels=32, N=8, seed=2)  # 8 states
    assert forward_launch(low, (SLICE,), save=False).line_vectors == 0


def test_orders_that_cannot_run_line_by_line():
    assert layout.lines((RASTER, REVERSED), (16, 8, 8), 4, 32) == (1, 0)  # no strided order
    assert layout.lines((SLICE,), (16, 2, 4), 4, 32) == (1, 0)  # 4 lines per row: not 8 neighbours
    assert layout.lines((SLICE,), (12, 2, 8), 4, 32) == (1, 0)  # lines of 12 tokens: not whole chunks
    assert layout.lines((ScanOrder((1, 2, 0), True),), (16, 2, 8), 4, 32) == (1, 0)  # reversed slice order
    assert layout.lines((ScanOrder((2, 1, 0)),), (16, 8, 8), 4, 32) == (1, 0)  # second axis strided too
    assert layout.lines((SLICE, ScanOrder((0, 2, 1))), (16, 32, 8), 4, 32) == (1, 0)  # lines of 16 and of 32
    assert layout.lines((SLICE,), (16, 2, 8), 4, 4) == (1, 0)  # 4 lanes cannot hold 8 lines
