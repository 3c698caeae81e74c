from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import uniform_filter

from medmamba.cli import main
from medmamba.engines.video.predict import find_video_cases, load_video_model, segment_video
from medmamba.engines.video.train import _augment, clip_indices, normalize_clip, structure_loss
from medmamba.io.datasets.video import open_video_dataset, read_clip
from medmamba.io.geometry import Geometry
from medmamba.io.image import Image, read_image, write_image
from medmamba.metrics.video import video_metrics
from medmamba.networks import build
from tests.engines.video.conftest import TINY


def test_structure_loss_matches_pranets_formula():
    """Weighted BCE + weighted IoU with weights 1 + 5·|avgpool31(m) − m| (zero padding counted), in float64."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 1, 40, 36, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 1, 40, 36, dtype=torch.float64)
    mask[0, 0, 10:25, 5:30] = 1
    mask[1, 0, 30:, :] = 1
    m, x = mask.numpy()[:, 0], logits.numpy()[:, 0]
    expected = []
    for i in range(2):
        weight = 1 + 5 * np.abs(uniform_filter(m[i], size=31, mode="constant") - m[i])
        bce = np.maximum(x[i], 0) - x[i] * m[i] + np.log1p(np.exp(-np.abs(x[i])))
        wbce = (weight * bce).sum() / weight.sum()
        p = 1 / (1 + np.exp(-x[i]))
        inter, union = (p * m[i] * weight).sum(), ((p + m[i]) * weight).sum()
        expected.append(wbce + 1 - (inter + 1) / (union - inter + 1))
    torch.testing.assert_close(structure_loss(logits, mask).double(), torch.tensor(np.mean(expected)))


def test_clips_are_centred_and_clamped_at_the_ends():
    assert clip_indices(0, 10, 5) == [0, 0, 0, 1, 2]
    assert clip_indices(5, 10, 5) == [3, 4, 5, 6, 7]
    assert clip_indices(9, 10, 5) == [7, 8, 9, 9, 9]
    assert clip_indices(2, 3, 4) == [0, 1, 2, 2]  # even length: the centre is index T // 2
    assert clip_indices(0, 1, 3) == [0, 0, 0]


def test_normalisation_imagenet_and_per_clip_zscore():
    clip = torch.rand(2, 5, 3, 8, 8)
    imagenet = normalize_clip(clip, "imagenet")
    torch.testing.assert_close(imagenet[:, :, 1], (clip[:, :, 1] - 0.456) / 0.224)
    z = normalize_clip(clip[:, :, :1], "zscore")
    torch.testing.assert_close(z.mean((1, 2, 3, 4)), torch.zeros(2), atol=1e-6, rtol=0)
    torch.testing.assert_close(z.std((1, 2, 3, 4)), torch.ones(2))


def test_augmentation_moves_frames_and_mask_together():
    rng = np.random.default_rng(0)
    mask = (rng.random((12, 10)) < 0.4).astype(np.int64)
    clip = np.stack([np.stack([mask * 0.5 + 0.25])] * 5).astype(np.float32)  # every frame shows the mask
    for seed in range(8):
        frames, moved = _augment(clip, mask, np.random.default_rng(seed))
        centre = frames[2, 0]
        assert ((centre > centre.mean()) == (moved == 1)).all()


def test_training_writes_a_model_folder_predict_uses(video_model):
    model = json.loads((video_model / "model.json").read_text())
    assert model["clip_length"] == 5 and model["frame_size"] == [64, 64]
    assert model["normalization"] == "zscore" and model["out_channels"] == 1
    assert model["val_cases"] == ["sweep_004", "sweep_005"]  # the last 20 % of the cases, rounded up
    recipe = json.loads((video_model / "recipe.json").read_text())
    assert recipe["optimizer"] == "adam" and recipe["lr_schedule"] == "cosine" and recipe["min_lr"] == 1e-6
    assert recipe["loss"] == "structure" and recipe["seed"] == 1234 and recipe["amp_dtype"] == "fp32"
    network, loaded = load_video_model(video_model)
    assert loaded == model and not network.training


def test_predict_nifti_video_keeps_the_input_geometry(mri_videos, video_model, tmp_path, capsys):
    data = open_video_dataset(mri_videos["test"])
    frames, _ = read_clip(data, data.training[0])
    geometry = Geometry((0.5, 0.7, 40.0), (3.0, -2.0, 0.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    source = tmp_path / "in" / "echo_0000.nii.gz"
    source.parent.mkdir()
    write_image(Image(np.moveaxis(frames[:, 0], 0, -1), geometry), source)
    assert main(["predict", "-i", str(source.parent), "-o", str(tmp_path / "out"), "-m", str(video_model),
                 "--device", "cpu"]) == 0  # fmt: skip
    (written,) = capsys.readouterr().out.split()
    masks = read_image(written)
    assert Path(written).name == "echo.nii.gz"
    assert masks.shape == (*frames.shape[2:], frames.shape[0])
    assert not masks.geometry.mismatches(geometry)
    assert masks.array.dtype == np.uint8 and set(np.unique(masks.array)) <= {0, 1}


def test_predict_reads_mp4_and_jpeg_frame_folders(mri_videos, video_model, tmp_path):
    import imageio.v2 as imageio

    data = open_video_dataset(mri_videos["test"])
    frames, _ = read_clip(data, data.training[0])  # (T, 1, X, Y)
    pictures = [np.repeat(f[0].T[..., None], 3, -1).astype(np.uint8) for f in frames]  # rows first, RGB
    cases = tmp_path / "cases"
    (cases / "jpegs").mkdir(parents=True)
    for t, picture in enumerate(pictures):
        imageio.imwrite(cases / "jpegs" / f"frame{t:03d}.jpg", picture, quality=95)
    imageio.mimwrite(cases / "clip.mp4", pictures, fps=10, macro_block_size=8)
    found = {c.case_id: c.kind for c in find_video_cases(cases)}
    assert found == {"clip": "video", "jpegs": "frames"}
    assert main(["predict", "-i", str(cases), "-o", str(tmp_path / "out"), "-m", str(video_model),
                 "--device", "cpu"]) == 0  # fmt: skip
    for case in ("clip", "jpegs"):
        masks = sorted((tmp_path / "out" / case).iterdir())
        assert [m.name for m in masks] == [f"{t:04d}.png" for t in range(len(frames))]
        assert read_image(masks[0]).shape == frames.shape[2:]  # each frame's own size, (x, y) like the inputs


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "does not exist"),
        (lambda root: root, "holds no video case"),
    ],
    ids=["missing-input", "empty-folder"],
)
def test_predict_rejects_bad_video_input(make, message, video_model, tmp_path, capsys):
    code = main(["predict", "-i", str(make(tmp_path)), "-o", str(tmp_path / "o"), "-m", str(video_model)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.slow
def test_vivim_learns_on_a_realistic_video(mri_videos, tmp_path, capsys):
    """Train a tiny Vivim briefly on CPU; on two unseen videos its Dice beats the untrained network's.

    Videos: sweeps through real MRI (MNI template draws), white matter to segment (conftest). Six training videos
    of 10 frames (two of them validate), 64×64 frames, clips of 5, the paper's recipe with lr 1e-3 and batch 4,
    6 epochs (~40 s on one core). Measured on this box: the untrained network scores Dice 0.37 on the test videos
    (it marks nearly everything), the trained one 0.72.
    """
    run = tmp_path / "run"
    code = main(
        ["train", str(mri_videos["train"]), "--network", "vivim", "--output", str(run), "--epochs", "6", "--lr",
         "1e-3", "--batch-size", "4", "--frame-size", "64", "64", "--device", "cpu", "--network-kwargs",
         json.dumps(TINY)]
    )  # fmt: skip
    assert code == 0
    test = open_video_dataset(mri_videos["test"])
    assert main(["predict", "-i", str(test.root / "videosTr"), "-o", str(tmp_path / "pred"), "-m", str(run),
                 "--device", "cpu"]) == 0  # fmt: skip
    assert main(["evaluate", "--task", "video", "-ref", str(test.root), "-pred", str(tmp_path / "pred")]) == 0
    trained = json.loads((tmp_path / "pred" / "metrics.json").read_text())["foreground_mean"]["dice"]
    # the same network before training: the recipe's seed (1234) builds the same initial weights
    torch.manual_seed(1234)
    model = json.loads((run / "model.json").read_text())
    untrained = build("vivim", spatial_dims=2, in_channels=1, out_channels=1, **TINY).eval()
    scores = []
    for case in test.training:
        frames, masks = read_clip(test, case)
        scores.append(video_metrics(masks, segment_video(untrained, model, frames), [1])[1]["dice"])
    print(f"Dice on unseen videos: untrained {np.mean(scores):.3f}, trained {trained:.3f}", capsys.readouterr().out)
    assert trained > np.mean(scores) + 0.15
    assert trained > 0.6
