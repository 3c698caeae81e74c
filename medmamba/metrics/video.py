"""Video segmentation metrics per case: Dice and IoU over all frames, and the mean per-frame Dice (MONAI's metrics).

Arrays in, numbers out: a case is ``(T, X, Y)`` label maps. ``dice`` and ``iou`` pool every pixel of every frame
(the case as one volume); ``frame_dice`` averages the Dice of the frames where the label is present in the
reference or the prediction (frames where both are empty are left out, as nnU-Net leaves out empty classes). Both
empty over the whole case: NaN (left out of means).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["video_metrics"]


def video_metrics(reference: np.ndarray, prediction: np.ndarray, labels: Sequence[int]) -> dict[int, dict[str, float]]:
    """Dice, IoU and mean frame Dice of each label for one video.

    Args:
        reference: ``(T, X, Y)`` integer label maps.
        prediction: the same shape.
        labels: the labels to score (background is not implied).

    Returns:
        ``label → {"dice", "iou", "frame_dice"}``.

    Raises:
        ValueError: shapes differ or are not ``(T, X, Y)``.

    Example:
        >>> ref = np.zeros((2, 4, 4), np.uint8); ref[:, :2] = 1
        >>> pred = ref.copy(); pred[1] = 0
        >>> {k: round(v, 3) for k, v in video_metrics(ref, pred, [1])[1].items()}
        {'dice': 0.667, 'iou': 0.5, 'frame_dice': 0.5}
    """
    from monai.metrics import compute_dice, compute_iou

    reference, prediction = np.asarray(reference), np.asarray(prediction)
    if reference.shape != prediction.shape or reference.ndim != 3:
        raise ValueError(f"reference {reference.shape} and prediction {prediction.shape} must be one (T, X, Y) shape")
    results = {}
    for label in labels:
        ref, pred = reference == label, prediction == label
        if not ref.any() and not pred.any():
            results[int(label)] = {"dice": math.nan, "iou": math.nan, "frame_dice": math.nan}
            continue
        volume = (_one_hot(pred)[None], _one_hot(ref)[None])  # (1, 2, T, X, Y): the case as one volume
        frames = (_one_hot(pred).movedim(1, 0), _one_hot(ref).movedim(1, 0))  # (T, 2, X, Y): one row per frame
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dice = float(compute_dice(*volume, include_background=False, ignore_empty=False).item())
            iou = float(compute_iou(*volume, include_background=False, ignore_empty=False).item())
            per_frame = compute_dice(*frames, include_background=False, ignore_empty=False)[:, 0].numpy()
        defined = per_frame[(ref.any(axis=(1, 2)) | pred.any(axis=(1, 2))) & np.isfinite(per_frame)]
        results[int(label)] = {
            "dice": dice,
            "iou": iou,
            "frame_dice": float(defined.mean()) if defined.size else math.nan,
        }
    return results


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    """``(…)`` bool → ``(2, …)`` float: background, foreground."""
    m = torch.from_numpy(np.ascontiguousarray(mask))
    return torch.stack([~m, m]).float()
