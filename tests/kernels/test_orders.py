from __future__ import annotations

import pytest
import torch

from medmamba.kernels import (
    RASTER,
    REVERSED,
    SLICE,
    TEMPORAL,
    ScanInputError,
    ScanOrder,
    cross_scan,
    from_sequence,
    order_indices,
    to_sequence,
)


def test_slice_order_matches_the_worked_example_of_the_spec():
    # networks.md §1.3: D=2, H=2, W=3 -> inter-slice order visits p = h·W + w, then all d
    assert order_indices(SLICE, (2, 2, 3)).tolist() == [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]
    assert order_indices(TEMPORAL, (2, 2, 3)).tolist() == order_indices(SLICE, (2, 2, 3)).tolist()


def test_slice_order_equals_segmamba_chunk_stack_flatten():
    # SegMamba builds its inter-slice sequence as chunk(nslices) -> stack(dim=-1) -> flatten.
    D, H, W = 3, 4, 5
    seq = torch.arange(D * H * W)
    segmamba = torch.stack(seq.chunk(D), dim=-1).flatten()
    assert torch.equal(order_indices(SLICE, (D, H, W)), segmamba)


def test_raster_and_reversed_indices():
    assert order_indices(RASTER, (2, 3)).tolist() == list(range(6))
    assert order_indices(REVERSED, (7,)).tolist() == list(range(6, -1, -1))


@pytest.mark.parametrize("shape", [(5,), (3, 4), (2, 3, 5), (1, 1, 1)], ids=str)
def test_every_order_round_trips(shape):
    x = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(0))
    orders = [RASTER, REVERSED, *cross_scan(len(shape))]
    if len(shape) == 3:
        orders.append(SLICE)
    for order in orders:
        seq = to_sequence(x, order, len(shape))
        assert seq.shape == (2, 3, x[0, 0].numel())
        idx = order_indices(order, shape)
        assert torch.equal(seq, x.flatten(2)[..., idx]), order.label
        assert torch.equal(from_sequence(seq, order, shape), x), order.label


def test_cross_scan_makes_each_axis_fastest_once_in_both_directions():
    orders = cross_scan(3)
    assert len(orders) == 6
    fastest = [o.axes[-1] for o in orders[:3]]
    assert sorted(fastest) == [0, 1, 2]
    assert [o.reverse for o in orders] == [False] * 3 + [True] * 3
    assert len(cross_scan(2)) == 4


def test_an_order_for_another_rank_is_rejected():
    with pytest.raises(ScanInputError, match="not a permutation"):
        to_sequence(torch.zeros(1, 1, 4, 4), SLICE, 2)
    with pytest.raises(ScanInputError):
        ScanOrder((0, 0)).resolve(2)
