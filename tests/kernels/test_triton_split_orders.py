"""Calls mixing strided and raster orders run as groups of orders (PassConfig.split_orders) under
TRITON_INTERPRET=1: outputs summed and gated once, gradients joined along the orders, against the float64 reference;
and the calls that stay one."""

from __future__ import annotations

import math

import pytest
import torch

from medmamba.kernels import RASTER, REVERSED, SLICE, selective_scan
from medmamba.kernels.backends.triton_scan import configs
from medmamba.kernels.backends.triton_scan import forward as triton_forward
from tests.helpers import generator
from tests.kernels.scan_checks import assert_matches_reference, make_inputs


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
    short = dataclasses.replace(configs.forward_config(), split_min_length=0)  # 64 tokens: split them too
    monkeypatch.setattr(configs, "_FORWARD", short)
    monkeypatch.setattr(configs, "_BACKWARD", dataclasses.replace(configs.backward_config(), line_vectors=backward_lv))
    assert_matches_reference(low, ref, orders, dtype=dtype)
    assert sorted(x.line_vectors for x in triton_backward._LAUNCHES.values()) == [0] * (len(ranges) - 1) + [backward_lv]
    grouped = [x for x in triton_forward._LAUNCHES.values() if isinstance(x, triton_forward._Groups)]
    assert [g.ranges for g in grouped] == [ranges]
    lv = sorted(x.line_vectors for x in triton_forward._LAUNCHES.values() if isinstance(x, triton_forward._Launch))
    assert lv == [0] * (len(ranges) - 1) + [4]  # the strided order ran as line vectors
    assert {key[0].K for key in triton_backward._LAUNCHES} == {b - a for a, b in ranges}  # one backward per group
    if dtype == torch.bfloat16:  # rounded to bf16 once, after the fp32 sum, as one call: equal but for rare ties
        with torch.no_grad():
            grouped_out = selective_scan(*low, orders=orders, backend="triton").out
            with configs.override(forward=dataclasses.replace(short, split_orders=False)):
                one_call = selective_scan(*low, orders=orders, backend="triton").out
        assert (grouped_out != one_call).float().mean().item() < 0.02
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


@pytest.mark.parametrize("grouped", [False, True], ids=["one-call", "grouped-orders"])
def test_b_and_c_gradients_arrive_in_x_projs_output_gradient(monkeypatch, grouped):
    # the scan hands back dB and dC as the B and C rows of one buffer laid out as x_proj's output (whose rows B and C
    # are), and order_projections takes that buffer as the output's gradient: no copy of them, the same gradients
    import dataclasses

    from medmamba.kernels.backends.triton_scan import backward as triton_backward
    from medmamba.layers import MambaLayer
    from tests.helpers import OpOutputs
    from tests.helpers import layer_output_and_grads as run

    monkeypatch.setattr(triton_forward, "_LAUNCHES", {})
    monkeypatch.setattr(triton_backward, "_LAUNCHES", {})
    if grouped:  # the raster and reversed orders as one call, the slice order as line vectors (split_orders)
        monkeypatch.setattr(configs, "_FORWARD", dataclasses.replace(configs.forward_config(), split_min_length=0))
    torch.manual_seed(0)
    # 64 channels: two channel blocks, whose dB and dC partials the finish pass sums into the gradients (with one
    # block of fp32 B and C the partials are the gradients, and stay apart)
    layer = MambaLayer(32, orders=(RASTER, REVERSED, SLICE), residual=True)  # 16 states: line vectors
    x = torch.randn(1, 32, 16, 1, 4)
    with OpOutputs((torch.ops.aten.copy_,)) as copies:
        got, g_got = run(layer, x, "triton")
    runs_grouped = any(isinstance(v, triton_forward._Groups) for v in triton_forward._LAUNCHES.values())
    assert runs_grouped == grouped
    assert (1, 3, 16, 64) not in copies.shapes  # B's and C's rows of x_proj's output gradient
    want, g_want = run(layer, x, "torch")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_got, g_want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * max(b.abs().max().item(), 1.0))


def test_sibling_rows_mirror_only_disjoint_row_blocks_of_one_tensor():
    from medmamba.kernels.backends.triton_scan.backward import _sibling_extent

    def _sibling_rows(b, c):
        from medmamba.kernels.backends.triton_scan.backward import _sibling_rows as rows

        return rows(b, c, _sibling_extent(b, c))

    x_dbl = torch.randn(2, 3, 11, 24)  # (B, K, R + 2N, L) with R 3, N 4
    B, C = (x_dbl[:, :, a : a + 4].unflatten(-1, (4, 6)).unsqueeze(2) for a in (3, 7))  # (B, K, 1, N, 4, 6)
    dB, dC = _sibling_rows(B, C)
    assert dB.stride() == B.stride() and dC.stride() == C.stride()
    assert (dB.storage_offset(), dC.storage_offset()) == (B.storage_offset(), C.storage_offset())
    assert dB.untyped_storage().data_ptr() == dC.untyped_storage().data_ptr() != x_dbl.untyped_storage().data_ptr()
    assert dB.untyped_storage().nbytes() == x_dbl.numel() * 4
    overlapping = x_dbl[:, :, 5:9].unflatten(-1, (4, 6)).unsqueeze(2)  # C's rows shifted into B's
    assert _sibling_rows(B, overlapping) is None
    assert _sibling_rows(B, B) is None
    assert _sibling_rows(B, C.clone()) is None  # two tensors
    broadcast = torch.randn(1, 1, 1, 4, 1, 1).expand(B.shape)
    assert _sibling_rows(broadcast, broadcast) is None
    wide = torch.randn(2, 3, 100, 24)  # rows of a tensor far larger than B and C: not mirrored
    assert _sibling_rows(*(wide[:, :, a : a + 4].unflatten(-1, (4, 6)).unsqueeze(2) for a in (3, 7))) is None


def test_sibling_and_separate_b_and_c_of_one_layout_take_separate_launch_settings(monkeypatch):
    # the finish pass writes sibling gradients with B's order stride and separate ones packed: on the GPU the
    # launches are memoised per settings key, so the key must tell the two apart (same shapes and strides)
    from medmamba.kernels.backends.triton_scan import backward as triton_backward

    monkeypatch.setattr(triton_backward, "_LAUNCHES", {})
    g = generator(12)
    orders = (RASTER, REVERSED)
    u, delta = (torch.randn(1, 2, 64, 4, 4, generator=g) for _ in range(2))
    A = -torch.rand(2, 64, 4, generator=g) - 0.5
    grads = []
    for siblings in (True, False):
        x_dbl, other = (torch.randn(1, 2, 11, 16, generator=g) for _ in range(2))
        B = x_dbl[:, :, 3:7].unflatten(-1, (4, 4)).unsqueeze(2).requires_grad_()
        C = (x_dbl if siblings else other)[:, :, 7:11].unflatten(-1, (4, 4)).unsqueeze(2).requires_grad_()
        leaves = [t.detach().clone().requires_grad_() for t in (u, delta)]
        out = selective_scan(*leaves, A, B, C, orders=orders, backend="triton").out
        got = torch.autograd.grad(out.square().sum(), [B, C])
        ref = selective_scan(u, delta, A, B, C, orders=orders, backend="torch").out
        want = torch.autograd.grad(ref.square().sum(), [B, C])
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(b.abs().max().item(), 1.0))
        grads.append(got)
    assert grads[0][0].untyped_storage().data_ptr() == grads[0][1].untyped_storage().data_ptr()
    assert grads[1][0].untyped_storage().data_ptr() != grads[1][1].untyped_storage().data_ptr()
    assert sorted(key[7] for key in triton_backward._LAUNCHES) == [False, True]
