from __future__ import annotations

import math

import numpy as np
import pytest

from medmamba.metrics.segmentation import segmentation_metrics, structure_name


def cube(shape, start, size, value=1) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[tuple(slice(s, s + size) for s in start)] = value
    return a


def test_dice_equals_the_overlap_formula():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 3, (12, 10, 8))
    pred = np.where(rng.random(ref.shape) < 0.8, ref, rng.integers(0, 3, ref.shape))
    scores = segmentation_metrics(ref, pred, [1, 2], spacing=(1, 1, 1))
    for label in (1, 2):
        r, p = ref == label, pred == label
        expected = 2 * (r & p).sum() / (r.sum() + p.sum())
        assert scores[label].dice == pytest.approx(expected, rel=1e-6)
        assert (scores[label].n_reference, scores[label].n_prediction) == (r.sum(), p.sum())


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_and_surface_dice_of_a_shifted_cube_are_in_mm(axis):
    spacing = (0.5, 1.25, 2.0)
    ref = cube((20, 20, 20), (5, 5, 5), 8)
    start = [5, 5, 5]
    start[axis] += 2  # two voxels along one axis
    pred = cube((20, 20, 20), start, 8)
    shift_mm = 2 * spacing[axis]
    scores = segmentation_metrics(ref, pred, [1], spacing=spacing, tolerance_mm=shift_mm)[1]
    assert scores.hd95 == pytest.approx(shift_mm)  # the moved faces are exactly shift_mm apart
    assert scores.surface_dice == pytest.approx(1.0)  # every boundary point within the tolerance
    tight = segmentation_metrics(ref, pred, [1], spacing=spacing, tolerance_mm=shift_mm / 4)[1]
    assert 0.0 < tight.surface_dice < 1.0


def test_identical_maps_score_perfectly_also_in_2d():
    ref = cube((16, 16), (3, 4), 6, value=2)
    scores = segmentation_metrics(ref, ref, [2], spacing=(1.0, 1.0))[2]
    assert (scores.dice, scores.hd95, scores.surface_dice) == (1.0, 0.0, 1.0)


def test_empty_structures_follow_the_documented_convention():
    ref = cube((10, 10, 10), (2, 2, 2), 4)
    empty = np.zeros_like(ref)
    missed = segmentation_metrics(ref, empty, [1], spacing=(1, 1, 1))[1]
    assert (missed.dice, missed.surface_dice) == (0.0, 0.0) and math.isnan(missed.hd95)
    invented = segmentation_metrics(empty, ref, [1], spacing=(1, 1, 1))[1]
    assert (invented.dice, invented.surface_dice) == (0.0, 0.0) and math.isnan(invented.hd95)
    absent = segmentation_metrics(empty, empty, [1], spacing=(1, 1, 1))[1]
    assert all(math.isnan(v) for v in (absent.dice, absent.hd95, absent.surface_dice))
    assert absent.to_dict()["dice"] is None


def test_regions_score_the_union_of_their_labels():
    ref = cube((10, 10, 10), (2, 2, 2), 4)
    ref[3:5, 3:5, 3:5] = 2  # an inner label 2 inside label 1
    pred = (ref > 0).astype(np.uint8)  # the whole structure predicted as label 1
    scores = segmentation_metrics(ref, pred, [(1, 2), 1], spacing=(1, 1, 1))
    assert scores[(1, 2)].dice == 1.0 and scores[1].dice < 1.0
    assert structure_name((1, 2)) == "1+2" and structure_name(3) == "3"


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"prediction": np.zeros((4, 4, 5))}, "differ in shape"),
        ({"spacing": (1, 1)}, "one entry per axis"),
        ({"tolerance_mm": [1.0, 2.0]}, "2 tolerances for 1 structures"),
        ({"tolerance_mm": -1.0}, ">= 0 mm"),
    ],
)
def test_invalid_arguments(kwargs, fragment):
    args = {"reference": np.zeros((4, 4, 4)), "prediction": np.zeros((4, 4, 4)), "spacing": (1, 1, 1), **kwargs}
    with pytest.raises(ValueError, match=fragment):
        segmentation_metrics(args.pop("reference"), args.pop("prediction"), [1], **args)
