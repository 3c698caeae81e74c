from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medmamba.engines.checkpoint import load_checkpoint
from medmamba.engines.recipes import merge_overrides, recipe_for
from medmamba.engines.segmentation.trainer import MedmambaTrainer, nnunet_environment, train
from medmamba.engines.training import find_free_port
from medmamba.errors import CheckpointError, DatasetError, PlanError, UsageError
from tests.engines.conftest import DATASET, train_tiny

ROOT = Path(__file__).resolve().parents[3]


def make_trainer(tiny: dict[str, Path], results: Path, configuration: str) -> MedmambaTrainer:
    plans = json.loads((tiny["preprocessed"] / "medmambaPlans.json").read_text())
    dataset_json = json.loads((tiny["preprocessed"] / "dataset.json").read_text())
    plans["continue_training"] = False
    with nnunet_environment(preprocessed=tiny["preprocessed_root"], results=results, num_workers=0):
        return MedmambaTrainer(plans, configuration, 0, dataset_json, torch.device("cpu"))


def poly(epoch: float, total: float, lr: float = 1e-2) -> float:
    return lr * (1 - epoch / total) ** 0.9


def test_training_writes_weights_only_checkpoints_log_curves_and_recipe(tiny_dataset, tmp_path):
    fold = train_tiny(tiny_dataset, tmp_path, overrides={"num_epochs": 2})
    assert fold == tmp_path / DATASET / "MedmambaTrainer__medmambaPlans__3d_fullres_umamba_bot" / "fold_0"
    assert {"checkpoint_final.pth", "checkpoint_best.pth", "train.log", "progress.png", "recipe.json"} <= {
        p.name for p in fold.iterdir()
    }
    assert not (fold / "checkpoint_latest.pth").exists()  # replaced by the final one, as in nnU-Net
    assert (fold.parent / "plans.json").is_file() and (fold.parent / "dataset.json").is_file()
    final = torch.load(fold / "checkpoint_final.pth", weights_only=True)  # noqa: TID251 - plain torch must read it
    assert (final["network"], final["in_channels"], final["out_channels"]) == ("umamba_bot", 1, 3)
    assert final["current_epoch"] == 2 and final["init_args"]["configuration"] == "3d_fullres_umamba_bot"
    assert final["logging"]["lrs"] == pytest.approx([poly(0, 2), poly(1, 2)])
    assert len(final["logging"]["train_losses"]) == 2
    assert json.loads((fold / "recipe.json").read_text())["num_epochs"] == 2
    log = (fold / "train.log").read_text()
    assert "epoch 1/2: train loss" in log and "epoch 2/2: train loss" in log and "ETA" in log
    assert (fold / "progress.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_continues_a_killed_run_on_the_same_schedule(tiny_dataset, tmp_path, monkeypatch):
    original = MedmambaTrainer.train_step

    def killed_in_second_epoch(self, batch):
        if self.current_epoch == 1:
            raise KeyboardInterrupt
        return original(self, batch)

    overrides = {"num_epochs": 3}
    monkeypatch.setattr(MedmambaTrainer, "train_step", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_tiny(tiny_dataset, tmp_path, overrides=overrides)
    monkeypatch.setattr(MedmambaTrainer, "train_step", original)
    fold = tmp_path / DATASET / "MedmambaTrainer__medmambaPlans__3d_fullres_umamba_bot" / "fold_0"
    assert load_checkpoint(fold / "checkpoint_latest.pth")["current_epoch"] == 1
    with pytest.raises(UsageError, match="Pass --resume to continue it or --overwrite"):
        train_tiny(tiny_dataset, tmp_path, overrides=overrides)
    with pytest.raises(UsageError, match="num_epochs"):
        train_tiny(tiny_dataset, tmp_path, overrides={"num_epochs": 5}, resume=True)
    train_tiny(tiny_dataset, tmp_path, overrides=overrides, resume=True)
    final = load_checkpoint(fold / "checkpoint_final.pth")
    assert final["current_epoch"] == 3
    assert final["logging"]["lrs"] == pytest.approx([poly(0, 3), poly(1, 3), poly(2, 3)])
    assert len(final["logging"]["train_losses"]) == 3
    assert "resuming" in (fold / "train.log").read_text()


def test_segmamba_recipe_ce_without_deep_supervision_and_poly_per_iteration(tiny_dataset, tmp_path):
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss

    trainer = make_trainer(tiny_dataset, tmp_path / "a", "3d_fullres_segmamba")
    trainer.initialize()
    assert trainer.network_name == "segmamba" and type(trainer.loss) is RobustCrossEntropyLoss
    assert trainer.network.decoder.deep_supervision is False
    assert isinstance(trainer.optimizer, torch.optim.SGD) and trainer.optimizer.defaults["nesterov"]
    bot = make_trainer(tiny_dataset, tmp_path / "b", "3d_fullres_umamba_bot")
    bot.initialize()
    assert isinstance(bot.loss, DeepSupervisionWrapper) and bot.network.decoder.deep_supervision is True

    fold = train_tiny(tiny_dataset, tmp_path / "c", network="segmamba", overrides={"iterations_per_epoch": 3})
    final = load_checkpoint(fold / "checkpoint_final.pth", network="segmamba")
    assert final["recipe"]["loss"] == "ce" and final["recipe"]["lr_step"] == "iteration"
    # the optimiser's lr after the last of 3 iterations of a 1-epoch run: poly at step 2 of 3
    assert final["optimizer_state"]["param_groups"][0]["lr"] == pytest.approx(poly(2, 3))


def test_2d_configuration_trains_a_2d_network_on_slices(tiny_dataset, tmp_path):
    fold = train_tiny(tiny_dataset, tmp_path, configuration="2d")
    assert fold.parent.name == "MedmambaTrainer__medmambaPlans__2d_umamba_bot"
    weights = load_checkpoint(fold / "checkpoint_final.pth")["network_weights"]
    convs = [w for k, w in weights.items() if k.endswith("weight") and w.ndim >= 4]
    assert convs and all(w.ndim == 4 for w in convs)  # Conv2d kernels only


def test_overrides_reach_nnunets_trainer(tiny_dataset, tmp_path):
    trainer = make_trainer(tiny_dataset, tmp_path, "3d_fullres_umamba_bot")
    trainer.set_recipe(merge_overrides(recipe_for("umamba_bot"), {"batch_size": 3, "optimizer": "adamw", "seed": 1}))
    trainer.initialize()
    assert trainer.batch_size == 3 and isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.plans_manager.plans["configurations"]["3d_fullres_umamba_bot"]["batch_size"] == 3
    assert trainer.grad_scaler is None and not trainer._do_i_compile()
    with pytest.raises(RuntimeError, match="before the trainer is initialised"):
        trainer.set_recipe(recipe_for("umamba_bot"))


@pytest.mark.parametrize(
    ("kwargs", "error", "fragment"),
    [
        ({"plans_name": "nnUNetPlans"}, PlanError, "nnUNetPlans.json: no such plans"),
        ({"configuration": "3d_lowres"}, PlanError, "no configuration 3d_lowres_umamba_bot"),
        ({"configuration": "3d_fullres_umamba_bot", "network": "segmamba"}, PlanError, "trains 'umamba_bot'"),
        ({"overrides": {"num_epoch": 2}}, UsageError, "did you mean 'num_epochs'"),
        ({"dataset": "902"}, DatasetError, "no dataset '902'"),
    ],
    ids=["no-plans", "no-configuration", "other-network", "bad-override", "no-dataset"],
)
def test_user_mistakes_raise_before_anything_is_written(tiny_dataset, tmp_path, kwargs, error, fragment):
    args = {"configuration": "3d_fullres", "network": "umamba_bot", "dataset": DATASET, **kwargs}
    with pytest.raises(error, match=fragment):
        train(
            args.pop("dataset"),
            args.pop("configuration"),
            0,
            preprocessed=tiny_dataset["preprocessed_root"],
            results=tmp_path,
            device="cpu",
            **args,
        )
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_of_another_network_is_refused(tiny_dataset, tmp_path):
    fold = train_tiny(tiny_dataset, tmp_path)
    trainer = make_trainer(tiny_dataset, tmp_path / "other", "3d_fullres_segmamba")
    with pytest.raises(CheckpointError, match="holds a 'umamba_bot' network, not 'segmamba'"):
        trainer.load_checkpoint(fold / "checkpoint_final.pth")


@pytest.mark.slow
def test_final_validation_writes_nnunets_summary(tiny_dataset, tmp_path, monkeypatch):
    nnunet_trainer = importlib.import_module("nnunetv2.training.nnUNetTrainer.nnUNetTrainer")
    monkeypatch.setattr(nnunet_trainer, "default_num_processes", 1)  # one export worker on a 2-core box
    fold = train_tiny(tiny_dataset, tmp_path, validate=True)
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert {case["prediction_file"].rsplit("/", 1)[-1] for case in summary["metric_per_case"]} == {
        "tiny_004.nii.gz",
        "tiny_005.nii.gz",
    }
    assert 0.0 <= summary["foreground_mean"]["Dice"] <= 1.0


def _torchrun_train(tiny_dataset, results: Path, device: str, epochs: int, iterations: int, timeout: int) -> Path:
    """`torchrun --nproc_per_node 2 -m medmamba train …` on the tiny dataset; returns the fold folder."""
    env = {
        **os.environ,
        "MEDMAMBA_PREPROCESSED": str(tiny_dataset["preprocessed_root"]),
        "MEDMAMBA_RESULTS": str(results),
        "OMP_NUM_THREADS": "1",
        "CI": "1",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_port", str(find_free_port())]
    command += ["-m", "medmamba", "train", DATASET, "3d_fullres", "0", "--network", "umamba_bot", "--device", device]
    command += ["--epochs", str(epochs), "--iterations-per-epoch", str(iterations), "--val-iterations", "1"]
    command += ["--no-validation", "--num-workers", "0", "--batch-size", "2"]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    fold = results / DATASET / "MedmambaTrainer__medmambaPlans__3d_fullres_umamba_bot" / "fold_0"
    assert done.stdout.strip() == str(fold)  # one line: only rank 0 prints
    return fold


@pytest.mark.slow
def test_ddp_over_gloo_on_two_cpu_processes(tiny_dataset, tmp_path):
    """`torchrun --nproc_per_node 2 -m medmamba train … --device cpu`: two ranks share the batch of 2."""
    fold = _torchrun_train(tiny_dataset, tmp_path, "cpu", epochs=1, iterations=2, timeout=300)
    assert load_checkpoint(fold / "checkpoint_final.pth")["current_epoch"] == 1
    assert "batch 1" in (fold / "train.log").read_text()  # each rank trains on half of the global batch


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_ddp_over_nccl_on_two_gpus(tiny_dataset, tmp_path):
    """`torchrun --nproc_per_node 2 -m medmamba train … --device cuda`: NCCL, one GPU per rank, bf16 AMP."""
    fold = _torchrun_train(tiny_dataset, tmp_path, "cuda", epochs=2, iterations=3, timeout=600)
    final = load_checkpoint(fold / "checkpoint_final.pth")
    assert final["current_epoch"] == 2
    assert all(torch.isfinite(torch.tensor(final["logging"]["train_losses"])))
    log = (fold / "train.log").read_text()
    assert "batch 1" in log and "bf16 AMP" in log


@pytest.mark.gpu
@pytest.mark.parametrize("network", ["umamba_bot", "segmamba"])
def test_gpu_training_in_bf16_on_the_default_scan_backend(tiny_dataset, tmp_path, network):
    fold = train(
        DATASET,
        "3d_fullres",
        0,
        network=network,
        preprocessed=tiny_dataset["preprocessed_root"],
        results=tmp_path,
        overrides={"num_epochs": 2, "iterations_per_epoch": 3, "val_iterations_per_epoch": 1},
        device="cuda",
        validate=False,
        num_workers=0,
    )
    final = load_checkpoint(fold / "checkpoint_final.pth")
    assert final["recipe"]["amp_dtype"] == "bf16" and final["grad_scaler_state"] is None
    assert all(torch.isfinite(torch.tensor(final["logging"]["train_losses"])))
    assert "bf16 AMP" in (fold / "train.log").read_text()
