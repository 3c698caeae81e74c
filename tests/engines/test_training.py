from __future__ import annotations

import logging
import math
import struct

import pytest
import torch

from medmamba.engines.training import (
    DistributedEnv,
    PolyLR,
    amp_policy,
    compile_allowed,
    default_autocast_dtype,
    find_resume_checkpoint,
    format_seconds,
    plot_curves,
    resolve_device,
    run_log,
    stdout_to_log,
)
from medmamba.errors import UsageError


def optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_poly_per_epoch_matches_nnunets_scheduler():
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    ours, theirs = optimizer(), optimizer()
    schedule, reference = PolyLR(ours, 1e-2, 7), PolyLRScheduler(theirs, 1e-2, 7)
    for epoch in range(7):
        schedule.step(epoch)
        reference.step(epoch)
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], rel=1e-12)


def test_poly_per_iteration_decays_within_an_epoch_and_is_stateless():
    opt = optimizer()
    schedule = PolyLR(opt, 1.0, num_epochs=2, iterations_per_epoch=4, per_iteration=True, exponent=0.9)
    assert schedule.lr_at(0, 0) == 1.0
    assert schedule.lr_at(1, 1) == pytest.approx((1 - 5 / 8) ** 0.9)
    schedule.step(1, 3)
    assert opt.param_groups[0]["lr"] == pytest.approx((1 - 7 / 8) ** 0.9)
    # a resumed run recomputes the same value from (epoch, iteration) alone
    assert PolyLR(optimizer(), 1.0, 2, 4, per_iteration=True).lr_at(1, 3) == schedule.lr_at(1, 3)


def test_amp_policy_is_fp32_on_cpu_and_bf16_needs_no_scaler():
    cpu = amp_policy(torch.device("cpu"), "bf16")
    assert (cpu.enabled, cpu.dtype, cpu.grad_scaler, cpu.name) == (False, torch.float32, False, "fp32")
    with pytest.raises(UsageError, match="unknown"):
        amp_policy(torch.device("cpu"), "int8")


@pytest.mark.gpu
def test_amp_policy_on_gpu():
    bf16 = amp_policy(torch.device("cuda"), "bf16")
    assert bf16.enabled and bf16.dtype == torch.bfloat16 and not bf16.grad_scaler
    fp16 = amp_policy(torch.device("cuda"), "fp16")
    assert fp16.enabled and fp16.grad_scaler
    assert not amp_policy(torch.device("cuda"), "fp32").enabled


def test_default_autocast_dtype_changes_what_a_plain_autocast_uses_and_restores_it():
    before = torch.get_autocast_dtype("cpu")
    with default_autocast_dtype("cpu", torch.float16):
        with torch.autocast("cpu"):  # what nnU-Net writes: no dtype
            assert torch.get_autocast_dtype("cpu") == torch.float16
            y = torch.nn.functional.linear(torch.ones(2, 2), torch.ones(2, 2))
        assert y.dtype == torch.float16
    assert torch.get_autocast_dtype("cpu") == before


def test_compile_is_off_unless_asked_and_never_on_cpu():
    assert not compile_allowed(torch.device("cpu"), False)
    assert not compile_allowed(torch.device("cpu"), True)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("gpu0")


def test_plot_curves_writes_a_png_atomically(tmp_path):
    path = plot_curves(
        {"loss": {"train": [1.0, 0.5, 0.25], "validation": [1.1, 0.7, float("nan")]}, "lr": {"lr": [1e-2, 5e-3, 0]},
         "empty": {"x": []}},
        tmp_path / "progress.png",
        title="t",
    )  # fmt: skip
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width == 640 and height == round(2.6 * 2 * 80)  # two non-empty panels at 80 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["progress.png"]


def test_run_log_appends_records_to_the_run_folder(tmp_path):
    log = logging.getLogger("medmamba.test_run_log")
    for run in range(2):
        with run_log(tmp_path) as path:
            log.info("epoch line %d", run)
    text = path.read_text()
    assert "epoch line 0" in text and "epoch line 1" in text
    log.info("after the run")
    assert "after the run" not in path.read_text()


def test_stdout_to_log_keeps_stdout_clean(capsys, caplog):
    with (
        caplog.at_level(logging.INFO, logger="medmamba.test_stdout"),
        stdout_to_log(logging.getLogger("medmamba.test_stdout"), logging.INFO),
    ):
        print("nnU-Net says hello")
        print("partial", end="")
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == ["nnU-Net says hello", "partial"]


def test_find_resume_checkpoint_prefers_the_order_given(tmp_path):
    assert find_resume_checkpoint(tmp_path, ["latest.pth", "final.pth"]) is None
    (tmp_path / "final.pth").write_bytes(b"x")
    assert find_resume_checkpoint(tmp_path, ["latest.pth", "final.pth"]).name == "final.pth"
    (tmp_path / "latest.pth").write_bytes(b"x")
    assert find_resume_checkpoint(tmp_path, ["latest.pth", "final.pth"]).name == "latest.pth"


def test_format_seconds_and_distributed_env():
    assert [format_seconds(s) for s in (0, 65, 3725, math.nan)] == ["0:00", "1:05", "1:02:05", "?"]
    env = DistributedEnv.from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4"})
    assert (env.rank, env.local_rank, env.world_size, env.active) == (3, 1, 4, True)
    assert not DistributedEnv.from_env({}).active
