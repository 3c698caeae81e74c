from __future__ import annotations

import math

import numpy as np
import pytest

from medmamba.metrics.video import video_metrics


def test_video_metrics_pool_frames_and_average_frame_dice():
    rng = np.random.default_rng(0)
    ref = (rng.random((4, 8, 8)) < 0.3).astype(np.uint8)
    pred = ref.copy()
    pred[1] = 0  # one frame missed entirely
    pred[2, :2] = 1  # one frame over-segmented
    ref[3], pred[3] = 0, 0  # one frame empty in both: left out of the frame mean
    scores = video_metrics(ref, pred, [1])[1]
    r, p = ref == 1, pred == 1
    assert scores["dice"] == pytest.approx(2 * (r & p).sum() / (r.sum() + p.sum()))
    assert scores["iou"] == pytest.approx((r & p).sum() / (r | p).sum())
    frames = [2 * (r[t] & p[t]).sum() / (r[t].sum() + p[t].sum()) for t in range(3)]
    assert scores["frame_dice"] == pytest.approx(np.mean(frames))


def test_video_metrics_empty_labels_and_shape_checks():
    ref = np.zeros((2, 4, 4), np.uint8)
    pred = ref.copy()
    pred[0, 0, 0] = 2
    scores = video_metrics(ref, pred, [1, 2])
    assert all(math.isnan(v) for v in scores[1].values())
    assert scores[2]["dice"] == 0.0 and scores[2]["frame_dice"] == 0.0  # predicted where the reference is empty
    with pytest.raises(ValueError, match="one \\(T, X, Y\\) shape"):
        video_metrics(ref, pred[:1], [1])
