from __future__ import annotations

import json

import numpy as np
import pytest

from medmamba.io.datasets.video import VideoDatasetWriter, open_video_dataset, read_clip
from medmamba.io.verify import check_dataset


def clip(rng, frames=5, shape=(12, 10)):
    masks = np.zeros((frames, *shape), np.uint8)
    for t in range(frames):
        masks[t, 2 + t : 6 + t, 3:7] = 1  # a moving square
    images = (masks[:, None] * 150 + rng.integers(0, 60, (frames, 1, *shape))).astype(np.uint8)
    return images, masks


@pytest.mark.parametrize("layout", ["frames", "volume"])
def test_clips_round_trip_in_both_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    clips = [clip(rng) for _ in range(2)]
    with VideoDatasetWriter(
        tmp_path,
        21,
        "Clips",
        channel_names=["US"],
        labels={"background": 0, "polyp": 1},
        layout=layout,
        frame_interval_ms=40,
    ) as writer:
        for i, (frames, masks) in enumerate(clips):
            writer.add_clip(f"clip_{i}", frames, masks, spacing=(0.5, 0.5))
        writer.add_clip("clip_test", clips[0][0], test=True)
    dataset = open_video_dataset(writer.path)
    assert dataset.layout == layout and [c.case_id for c in dataset.training] == ["clip_0", "clip_1"]
    assert [c.case_id for c in dataset.test] == ["clip_test"]
    for case, (frames, masks) in zip(dataset.training, clips, strict=True):
        got_frames, got_masks = read_clip(dataset, case)
        assert got_frames.shape == (5, 1, 12, 10)
        np.testing.assert_array_equal(got_frames, frames.astype(np.float32))
        np.testing.assert_array_equal(got_masks, masks)
    assert json.loads((writer.path / "dataset.json").read_text())["frame_interval_ms"] == 40
    report = check_dataset(writer.path)
    assert (report.kind, report.ok, report.num_cases, report.num_test) == ("video", True, 2, 1)


def test_missing_mask_and_frame_gap_are_reported(tmp_path):
    rng = np.random.default_rng(0)
    with VideoDatasetWriter(
        tmp_path, 22, "Clips", channel_names=["US"], labels={"background": 0, "polyp": 1}
    ) as writer:
        writer.add_clip("clip_0", *clip(rng))
        writer.add_clip("clip_1", *clip(rng))
    (writer.path / "masksTr" / "clip_0" / "0002.png").unlink()
    (writer.path / "videosTr" / "clip_1" / "0003_0000.png").unlink()
    (writer.path / "masksTr" / "clip_1" / "0003.png").unlink()
    report = check_dataset(writer.path)
    whats = [p.what for p in report.problems]
    assert "mask of 0002_0000.png missing" in whats
    assert "frame numbers [0, 1, 2, 4]… are not 0000, 0001, … without gaps" in whats
