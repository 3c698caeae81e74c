"""``medmamba train``: fold folder on stdout, one epoch line per epoch on stderr, exit 2 for user mistakes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medmamba.cli import main
from medmamba.engines.checkpoint import load_checkpoint
from tests.engines.conftest import DATASET, preprocess, write_raw


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli_train")
    return preprocess(write_raw(root / "raw"), root / "preprocessed").parent


@pytest.fixture(autouse=True)
def no_environment(monkeypatch):
    for name in ("MEDMAMBA_PREPROCESSED", "MEDMAMBA_RESULTS", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(name, raising=False)


SHORT = ["--epochs", "2", "--iterations-per-epoch", "2", "--val-iterations", "1", "--num-workers", "0"]


def test_trains_prints_the_fold_folder_and_reports_each_epoch(preprocessed, tmp_path, capsys):
    # a real process: main() configures the console as a user's shell sees it (pytest owns logging in-process)
    env = {**os.environ, "MEDMAMBA_PREPROCESSED": str(preprocessed), "OMP_NUM_THREADS": "1"}
    args = ["train", "901", "3d_fullres", "0", "--network", "umamba_bot", "--results", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "medmamba", *args, *SHORT, "--device", "cpu", "--no-validation", "--lr", "0.02"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fold = tmp_path / DATASET / "MedmambaTrainer__medmambaPlans__3d_fullres_umamba_bot" / "fold_0"
    assert done.stdout == f"{fold}\n"
    assert "epoch 1/2: train loss" in done.stderr and "epoch 2/2" in done.stderr and "ETA" in done.stderr
    assert "do_dummy_2d_data_aug" not in done.stderr  # nnU-Net's chatter stays in train.log unless -v
    assert "do_dummy_2d_data_aug" in (fold / "train.log").read_text()
    checkpoint = load_checkpoint(fold / "checkpoint_final.pth")
    assert checkpoint["recipe"]["initial_lr"] == 0.02 and checkpoint["recipe"]["num_epochs"] == 2

    # a second run refuses to overwrite; --resume of a finished run has nothing left to do
    args += ["--preprocessed", str(preprocessed), *SHORT, "--device", "cpu", "--no-validation"]
    assert main(args) == 2
    assert "--resume to continue it or --overwrite" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert capsys.readouterr().out == f"{fold}\n"
    assert load_checkpoint(fold / "checkpoint_final.pth")["current_epoch"] == 2


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--network", "umamba_bot"], "--preprocessed not given and $MEDMAMBA_PREPROCESSED not set"),
        (["--network", "segmamba", "--preprocessed", "{pre}", "--plans", "nnUNetPlans"], "no such plans"),
        (["--network", "umamba_bot", "--preprocessed", "{pre}", "--epochs", "0"], "num_epochs >= 1"),
        (["--network", "umamba_bot", "--preprocessed", "{pre}", "--resume", "--overwrite"], "exclude each other"),
        (["--network", "umamba_bot", "--preprocessed", "{pre}", "--device", "cuda:99"], "--device cuda:99:"),
    ],
    ids=["no-preprocessed", "no-plans", "zero-epochs", "resume-and-overwrite", "missing-gpu"],
)
def test_user_mistakes_exit_2_with_one_line_and_write_nothing(preprocessed, tmp_path, capsys, extra, fragment):
    extra = [e.replace("{pre}", str(preprocessed)) for e in extra]
    results = tmp_path / "results"
    code = main(["train", DATASET, "3d_fullres", "0", "--results", str(results), *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err and err.startswith("medmamba train: error:") and "Traceback" not in err
    assert not results.exists() or not any(results.iterdir())
