"""The epoch loop the registration and video engines share, its schedules and run-folder rules (engines/training.py)."""

from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch

from medmamba.engines.checkpoint import load_checkpoint
from medmamba.engines.recipes import TrainRecipe, merge_overrides, recipe_for
from medmamba.engines.training import (
    ConstantLR,
    CosineLR,
    EpochLoop,
    LoopState,
    amp_policy,
    check_resume_recipe,
    make_lr_schedule,
    make_optimizer,
    prepare_run_folder,
)
from medmamba.errors import UsageError


def test_cosine_schedule_equals_torchs_cosine_annealing():
    net = torch.nn.Linear(2, 1)
    optimizer = torch.optim.Adam(net.parameters(), 1e-4)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200, eta_min=1e-6)
    ours = CosineLR(torch.optim.Adam(net.parameters(), 1e-4), 1e-4, 200, min_lr=1e-6)
    for epoch in range(201):
        assert ours.lr_at(epoch) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9)
        optimizer.step()
        reference.step()
    per_iteration = CosineLR(optimizer, 1.0, 2, 5, per_iteration=True)
    assert per_iteration.lr_at(1, 0) == pytest.approx(0.5)  # halfway through 10 iterations
    assert ConstantLR(optimizer, 3e-4, 10).lr_at(9, 4) == 3e-4


def test_factories_build_the_papers_optimisers_and_schedules():
    params = list(torch.nn.Linear(2, 1).parameters())
    assert type(make_optimizer("adam", params, lr=1e-4)) is torch.optim.Adam
    assert type(make_optimizer("adamw", params, lr=1e-4)) is torch.optim.AdamW
    sgd = make_optimizer("sgd", params, lr=1e-2, weight_decay=3e-5)
    assert sgd.defaults["nesterov"] and sgd.defaults["momentum"] == 0.99
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("rmsprop", params, lr=1.0)
    poly = make_lr_schedule("poly", sgd, initial_lr=1e-2, num_epochs=10)
    assert poly.lr_at(5) == pytest.approx(1e-2 * 0.5**0.9)
    with pytest.raises(ValueError, match="schedule"):
        make_lr_schedule("step", sgd, initial_lr=1.0, num_epochs=1)


def test_registration_and_video_recipes_are_the_papers():
    morph, feat, vivim = recipe_for("mambamorph"), recipe_for("mambamorph_feat"), recipe_for("vivim")
    assert (morph.optimizer, morph.initial_lr, morph.lr_schedule, morph.batch_size) == ("adam", 1e-4, "constant", 1)
    assert morph.loss == "registration" and dict(morph.loss_weights) == {"dice": 1.0, "smoothness": 0.1}
    assert feat.loss_weights["contrastive"] == 0.001
    assert (vivim.num_epochs, vivim.lr_schedule, vivim.min_lr, vivim.batch_size) == (200, "cosine", 1e-6, 8)
    assert (vivim.loss, vivim.amp_dtype, vivim.seed) == ("structure", "fp32", 1234)
    assert morph.iterations_per_epoch == vivim.iterations_per_epoch == 0  # one pass over the data
    merged = merge_overrides(morph, {"loss_weights": {"mi": 1.0, "dice": 0.0}, "initial_lr": None})
    assert dict(merged.loss_weights) == {"dice": 0.0, "smoothness": 0.1, "mi": 1.0}
    assert TrainRecipe.from_dict(merged.to_dict()) == merged
    with pytest.raises(ValueError, match="loss weights"):
        TrainRecipe(loss_weights={"dice": -1.0})
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainRecipe(lr_schedule="cosin")  # type: ignore[arg-type]


def test_run_folder_rules(tmp_path):
    assert prepare_run_folder(tmp_path, resume=False, overwrite=False) is None
    (tmp_path / "checkpoint_latest.pth").write_bytes(b"x")
    with pytest.raises(UsageError, match="--resume"):
        prepare_run_folder(tmp_path, resume=False, overwrite=False)
    assert prepare_run_folder(tmp_path, resume=False, overwrite=True) is None
    assert prepare_run_folder(tmp_path, resume=True, overwrite=False) == tmp_path / "checkpoint_latest.pth"
    with pytest.raises(UsageError, match="exclude each other"):
        prepare_run_folder(tmp_path, resume=True, overwrite=True)
    check_resume_recipe({"initial_lr": 1e-4}, {"initial_lr": 1e-4}, "x.pth")
    with pytest.raises(UsageError, match="initial_lr"):
        check_resume_recipe({"initial_lr": 1e-4}, {"initial_lr": 1e-3}, "x.pth")


def regression_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([[2.0, -1.0, 0.5]])
    while True:
        x = torch.randn(16, 3, generator=g)
        yield x, x @ w.T + 0.3


def make_loop(folder, *, epochs=4, seed=0, validate=True, batches=None, **kwargs):
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 1)
    optimizer = make_optimizer("adam", net.parameters(), lr=0.2)
    val_x = torch.randn(32, 3, generator=torch.Generator().manual_seed(99))
    val_y = val_x @ torch.tensor([[2.0, -1.0, 0.5]]).T + 0.3

    def compute_loss(model, batch):
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x), y)
        return loss, {"mse": float(loss.detach())}

    return EpochLoop(
        network=net,
        compute_loss=compute_loss,
        batches=batches if batches is not None else regression_batches(seed),
        validate=(lambda n: {"val_loss": float(torch.nn.functional.mse_loss(n(val_x), val_y))}) if validate else None,
        optimizer=optimizer,
        schedule=make_lr_schedule("cosine", optimizer, initial_lr=0.2, num_epochs=epochs, min_lr=1e-3),
        per_iteration=False,
        num_epochs=epochs,
        iterations_per_epoch=10,
        amp=amp_policy(torch.device("cpu")),
        device=torch.device("cpu"),
        folder=folder,
        static={"network": "linear", "in_channels": 3, "out_channels": 1, "recipe": {}},
        **kwargs,
    )


def test_epoch_loop_trains_checkpoints_and_plots(tmp_path):
    state = make_loop(tmp_path).run()
    history = state.history
    assert state.epoch == 4 and len(history["train_loss"]) == 4
    assert history["val_loss"][-1] < 0.05 and history["train_loss"][-1] < 0.1 * history["train_loss"][0]  # it learns
    assert history["lr"][0] == pytest.approx(0.2) and history["lr"][1] < 0.2  # cosine, per epoch
    assert history["train_mse"] == pytest.approx(history["train_loss"])
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint_best.pth", "checkpoint_final.pth", "progress.png"}
    final = load_checkpoint(tmp_path / "checkpoint_final.pth")
    best = load_checkpoint(tmp_path / "checkpoint_best.pth")
    assert final["loop_state"]["best"] == min(history["val_loss"]) == best["loop_state"]["history"]["val_loss"][-1]
    assert (tmp_path / "progress.png").read_bytes()[:4] == b"\x89PNG"


def test_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    straight = make_loop(tmp_path / "a").run()
    # interrupted after two epochs (the loop's own checkpoint of epoch 2), then resumed with fresh objects
    first = make_loop(tmp_path / "b", epochs=4)
    first.num_epochs = 2
    first.run()
    saved = load_checkpoint(tmp_path / "b" / "checkpoint_final.pth")
    resumed = make_loop(tmp_path / "b", batches=itertools.islice(regression_batches(0), 20, None))
    state = resumed.restore(saved, "b")
    assert state.epoch == 2
    state = resumed.run(state)
    a = load_checkpoint(tmp_path / "a" / "checkpoint_final.pth")["network_weights"]
    b = load_checkpoint(tmp_path / "b" / "checkpoint_final.pth")["network_weights"]
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert state.history.keys() == straight.history.keys()
    assert state.history["val_loss"] == pytest.approx(straight.history["val_loss"])


def test_non_finite_loss_skips_the_step_and_selection_falls_back_to_train_loss(tmp_path, caplog):
    def batches():
        for i in itertools.count():
            x = torch.randn(4, 3)
            yield x, torch.full((4, 1), math.nan) if i == 3 else x.sum(1, keepdim=True)

    loop = make_loop(tmp_path, epochs=2, validate=False, batches=batches())
    with caplog.at_level(logging.WARNING, logger="medmamba.engines.training"):
        state = loop.run()
    assert "non-finite loss" in caplog.text
    assert all(math.isfinite(v) for v in state.history["train_loss"])
    assert all(torch.isfinite(p).all() for p in loop.network.parameters())
    assert state.best == min(state.history["train_loss"])
    assert LoopState.from_dict(state.to_dict()) == state


def _ddp_worker(rank, folder):
    import torch.distributed as dist

    from medmamba.engines.training import DistributedEnv, init_distributed

    env = DistributedEnv.from_env()
    init_distributed(env, torch.device("cpu"))
    loop = make_loop(folder, epochs=2, batches=regression_batches(seed=rank), dist_env=env)  # each rank its own data
    loop.run()
    torch.save(loop.network.state_dict(), folder / f"rank{rank}.pt")
    dist.barrier()  # as the trainers do: a rank that tears down while the other still talks aborts in Gloo
    dist.destroy_process_group()


@pytest.mark.slow
def test_epoch_loop_under_ddp_on_cpu_keeps_the_ranks_in_step(tmp_path):
    """Two processes over Gloo: gradients are averaged, so both ranks end with the same weights; rank 0 writes."""
    from medmamba.engines.training import spawn

    spawn(_ddp_worker, 2, (tmp_path,))
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))  # noqa: TID251 - a plain test file
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    state = load_checkpoint(tmp_path / "checkpoint_final.pth")["loop_state"]
    assert state["epoch"] == 2 and "val_loss" in state["history"]
    single = make_loop(tmp_path / "single", epochs=2).run()
    assert state["history"]["train_loss"] != pytest.approx(single.history["train_loss"])  # rank 1's data counted
