"""kill -9 loses nothing: a training killed mid-epoch resumes from its last checkpoint on the same schedule with the
same optimiser state and ends as well as an uninterrupted run; a prediction killed while writing leaves no
truncated label map. Real processes (``python -m medmamba``), real SIGKILL.

The model: U-Mamba_Bot on the tiny two-blob dataset of tests/engines (six 24×20×16 cases, fold 0: four training,
two validation cases), in a wider configuration added to the plans the way nnU-Net adds custom configurations,
AdamW (so there are two moment buffers to restore). Measured on the 2-core box (seeds 0, 1, 2, uninterrupted):
final validation Dice 1.000, 0.998, 1.000 — the tolerance below is wide against that noise.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medmamba.engines.checkpoint import load_checkpoint
from medmamba.engines.recipes import TrainRecipe
from medmamba.engines.segmentation.trainer import MedmambaTrainer, nnunet_environment
from tests.engines.conftest import DATASET, preprocess, write_raw

pytestmark = pytest.mark.slow

EPOCHS, ITERATIONS, KILL_AFTER = 8, 10, 3
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}  # one thread: the box is shared; CI: no progress bars
DICE_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("crash")
    raw = write_raw(root / "raw")
    preprocessed = preprocess(raw, root / "preprocessed")
    plans_file = preprocessed / "medmambaPlans.json"
    plans = json.loads(plans_file.read_text())
    architecture = copy.deepcopy(plans["configurations"]["3d_fullres_umamba_bot"]["architecture"])
    architecture["arch_kwargs"]["features_per_stage"] = [16, 32, 64]  # the 4-8-16 net collapses a class at random
    plans["configurations"]["3d_wide_umamba_bot"] = {"inherits_from": "3d_fullres", "architecture": architecture}
    plans_file.write_text(json.dumps(plans, indent=1))
    return {"raw": raw, "preprocessed_root": preprocessed.parent}


def train_command(tiny: dict[str, Path], results: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "medmamba", "train", DATASET, "3d_wide", "0", "--network", "umamba_bot",
        "--preprocessed", str(tiny["preprocessed_root"]), "--results", str(results), "--device", "cpu",
        "--num-workers", "0", "--epochs", str(EPOCHS), "--iterations-per-epoch", str(ITERATIONS),
        "--val-iterations", "2", "--optimizer", "adamw", "--lr", "3e-3", "--seed", "0", *extra,
    ]  # fmt: skip


def fold_of(results: Path) -> Path:
    return results / DATASET / "MedmambaTrainer__medmambaPlans__3d_wide_umamba_bot" / "fold_0"


def validation_dice(fold: Path) -> float:
    return json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]["Dice"]


def poly(epoch: int, lr: float = 3e-3) -> float:
    return lr * (1 - epoch / EPOCHS) ** 0.9


def kill_during_epoch(command: list[str], latest: Path, epoch: int) -> dict:
    """Start ``command``; once ``latest`` records ``epoch`` finished epochs, SIGKILL it in the middle of the next
    one. Returns the checkpoint as it was at the kill."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and process.poll() is None:
            if latest.is_file() and load_checkpoint(latest)["current_epoch"] == epoch:
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"training never reached epoch {epoch} (exit code {process.poll()})")
        ends = load_checkpoint(latest)["logging"]["epoch_end_timestamps"]
        time.sleep(0.5 * (ends[-1] - ends[-2]))  # half an epoch in
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    return load_checkpoint(latest)


def restored_trainer(tiny: dict[str, Path], results: Path, checkpoint_path: Path) -> MedmambaTrainer:
    """What `train --resume` restores (the trainer's own load_checkpoint, the code path --resume runs)."""
    folder = tiny["preprocessed_root"] / DATASET
    plans = json.loads((folder / "medmambaPlans.json").read_text())
    plans["continue_training"] = True
    dataset_json = json.loads((folder / "dataset.json").read_text())
    saved = load_checkpoint(checkpoint_path)
    with nnunet_environment(preprocessed=tiny["preprocessed_root"], results=results, num_workers=0):
        trainer = MedmambaTrainer(plans, "3d_wide_umamba_bot", 0, dataset_json, torch.device("cpu"))
        trainer.set_recipe(TrainRecipe.from_dict(saved["recipe"]))
        trainer.load_checkpoint(checkpoint_path)
    return trainer


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tiny, tmp_path):
    uninterrupted = subprocess.run(
        train_command(tiny, tmp_path / "a"), env=ENV, capture_output=True, text=True, timeout=600, check=False
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    reference = load_checkpoint(fold_of(tmp_path / "a") / "checkpoint_final.pth")

    fold = fold_of(tmp_path / "b")
    at_kill = kill_during_epoch(train_command(tiny, tmp_path / "b"), fold / "checkpoint_latest.pth", KILL_AFTER)
    assert at_kill["current_epoch"] == KILL_AFTER  # no later epoch was saved: the kill came mid-epoch
    assert not (fold / "checkpoint_final.pth").exists()
    assert all(p.name.startswith(".") for p in fold.iterdir() if ".tmp-" in p.name)  # a cut write stays hidden
    # the file on disk is a whole checkpoint, readable by plain torch with weights_only=True
    torch.load(fold / "checkpoint_latest.pth", weights_only=True)  # noqa: TID251 - plain torch must read it

    # what --resume restores: epoch, learning rate, both AdamW moments and the step counts, the logs so far
    trainer = restored_trainer(tiny, tmp_path / "b", fold / "checkpoint_latest.pth")
    assert trainer.current_epoch == KILL_AFTER
    state, saved = trainer.optimizer.state_dict(), at_kill["optimizer_state"]
    assert state["param_groups"][0]["lr"] == pytest.approx(saved["param_groups"][0]["lr"])
    assert set(state["state"]) == set(saved["state"]) and len(state["state"]) > 0
    for key, moments in saved["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(state["state"][key][name], moments[name], rtol=0, atol=0)
    assert trainer.logger.get_checkpoint()["lrs"] == pytest.approx([poly(e) for e in range(KILL_AFTER)])

    resumed = subprocess.run(
        train_command(tiny, tmp_path / "b", "--resume"), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = load_checkpoint(fold / "checkpoint_final.pth")
    assert final["current_epoch"] == EPOCHS
    # the same schedule end to end: every epoch's learning rate equals the uninterrupted run's
    assert final["logging"]["lrs"] == pytest.approx(reference["logging"]["lrs"])
    assert final["logging"]["lrs"] == pytest.approx([poly(e) for e in range(EPOCHS)])
    # the epochs before the kill are the killed run's own record, not a re-run of them
    assert final["logging"]["train_losses"][:KILL_AFTER] == at_kill["logging"]["train_losses"]
    assert f"at epoch {KILL_AFTER}" in (fold / "train.log").read_text()
    dice_a, dice_b = validation_dice(fold_of(tmp_path / "a")), validation_dice(fold)
    assert dice_a > 0.9 and abs(dice_b - dice_a) <= DICE_TOLERANCE, (dice_a, dice_b)


#: runs `medmamba predict` with nibabel's writer stopping half-way through the third label map, so the kill lands
#: exactly where a non-atomic writer would leave a truncated file under its final name
_SLOW_WRITER = textwrap.dedent(
    """
    import gzip, sys, time
    import nibabel

    written = []

    def save(image, path):
        data = image.to_bytes()
        data = gzip.compress(data) if str(path).endswith(".gz") else data
        with open(path, "wb") as handle:
            if len(written) == 2:
                handle.write(data[: len(data) // 2])
                handle.flush()
                print("HALF", path, flush=True)
                time.sleep(600)
            handle.write(data)
        written.append(str(path))

    nibabel.save = save
    from medmamba.cli import main

    sys.exit(main(sys.argv[1:]))
    """
)


def test_sigkill_while_predict_writes_leaves_no_truncated_label_map(tiny, tmp_path):
    from tests.engines.conftest import train_tiny

    model = train_tiny(tiny, tmp_path / "results").parent
    images = tiny["raw"] / "imagesTr"
    output = tmp_path / "out"
    command = ["predict", "-i", str(images), "-o", str(output), "-m", str(model), "--device", "cpu"]
    process = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, *command], env=ENV, stdout=subprocess.PIPE, text=True
    )
    try:
        line = process.stdout.readline()  # blocks until the third write is half done
        assert line.startswith("HALF "), line
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
    half = Path(line.split(maxsplit=1)[1].strip())
    cases = sorted(p.name.replace("_0000", "") for p in images.iterdir())
    assert half.parent == output and half.name.startswith(f".{cases[2]}.tmp-")  # a hidden temporary, not the output
    finished = sorted(p.name for p in output.iterdir() if not p.name.startswith("."))
    assert finished == cases[:2]  # the two label maps written before the kill, nothing under the third's name
    for name in finished:
        source, label_map = nib.load(images / name.replace(".nii.gz", "_0000.nii.gz")), nib.load(output / name)
        assert np.asarray(label_map.dataobj).shape == source.shape  # the whole volume decompresses
        np.testing.assert_allclose(label_map.affine, source.affine, atol=1e-4)

    # running again finishes the job; the hidden temporary of the killed write is the only leftover
    rerun = subprocess.run(
        [sys.executable, "-m", "medmamba", *command], env=ENV, capture_output=True, text=True, timeout=600
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert sorted(p.name for p in output.iterdir() if not p.name.startswith(".")) == cases
    assert [p.name for p in output.iterdir() if p.name.startswith(".")] == [half.name]
