"""The memory model: its tensor counting agrees with a CPU allocator measurement, its totals with GPU anchors."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from medmamba.kernels import use_backend
from medmamba.networks import build
from medmamba.plans.memory import CONTEXT_BYTES, MemoryEstimate, estimate, saved_tensor_bytes

MiB = 2**20
TINY = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "features_per_stage": (8, 16, 32),
    "strides": (1, 2, 2),
    "deep_supervision": True,
}


def measured_live_bytes(model: torch.nn.Module, shape: tuple[int, ...]) -> int:
    """Bytes the CPU allocator still holds after forward + loss, when only the loss (its graph) is kept."""
    from medmamba.plans.memory import _dice_ce

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        x = torch.randn(shape)
        outputs = model(x)
        targets = [torch.zeros((o.shape[0], *o.shape[2:]), dtype=torch.long) for o in outputs]
        loss = sum(_dice_ce(o, t) for o, t in zip(outputs, targets, strict=True))
        del x, outputs, targets
    assert loss.requires_grad
    return sum(e.self_cpu_memory_usage for e in prof.key_averages())


def test_saved_tensor_count_matches_the_cpu_allocator():
    torch.manual_seed(0)
    net = build("umamba_bot", **TINY).train()
    shape = (2, 1, 16, 16, 16)
    counted = saved_tensor_bytes(net, shape, precision="fp32", scan="as_run")
    measured = measured_live_bytes(net, shape)
    # what autograd keeps is exactly what stays allocated (the loss scalar aside)
    assert abs(counted.total - measured) <= 64, (counted.total, measured)
    assert counted.count > 50


def test_fake_tensor_estimate_matches_a_real_cpu_run():
    torch.manual_seed(0)
    net = build("umamba_bot", **TINY).train()
    real = saved_tensor_bytes(net, (2, 1, 16, 16, 16), precision="fp32", scan="as_run")
    with use_backend("torch"):
        fake = estimate(
            "umamba_bot", (16, 16, 16), 2, in_channels=1, network_kwargs=TINY, precision="fp32", scan="as_run"
        )
    assert fake.parameters == sum(p.numel() for p in net.parameters())
    assert fake.saved_fixed_bytes + 2 * fake.saved_bytes_per_sample == pytest.approx(real.total, rel=2e-3)


def test_gpu_kernel_accounting_keeps_less_than_the_cpu_backend():
    with use_backend("torch"):
        cpu = estimate(
            "umamba_bot", (16, 16, 16), 1, in_channels=1, network_kwargs=TINY, precision="fp32", scan="as_run"
        )
    gpu = estimate("umamba_bot", (16, 16, 16), 1, in_channels=1, network_kwargs=TINY, precision="fp32")
    assert 0.5 * cpu.saved_bytes_per_sample < gpu.saved_bytes_per_sample < cpu.saved_bytes_per_sample


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_umamba_bot_estimate_is_within_10_percent_of_the_h100_measurement(precision):
    # networks.md §10: official U-Mamba_Bot-3D (1→14, 6 stages), batch 2, 128³, SGD, max_memory_allocated on an H100
    measured_mib = {"fp16": 11_242, "fp32": 21_825}[precision]
    kwargs = {
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 14,
        "features_per_stage": (32, 64, 128, 256, 320, 320),
        "strides": (1, (1, 2, 2), 2, 2, 2, (1, 2, 2)),
        "kernel_sizes": ((1, 3, 3), 3, 3, 3, 3, 3),
        "deep_supervision": True,
    }
    result = estimate("umamba_bot", (128, 128, 128), 2, in_channels=1, network_kwargs=kwargs, precision=precision)
    assert result.parameters == 41_945_158
    assert result.allocated_bytes / MiB == pytest.approx(measured_mib, rel=0.10)


def test_estimate_grows_with_patch_and_batch():
    sizes = [(16, 16, 16), (16, 16, 32), (16, 32, 32), (32, 32, 32)]
    totals = [estimate("umamba_bot", s, 2, in_channels=1, network_kwargs=TINY).allocated_bytes for s in sizes]
    assert totals == sorted(totals) and len(set(totals)) == len(totals)
    one = estimate("umamba_bot", (16, 16, 16), 1, in_channels=1, network_kwargs=TINY)
    assert one.with_batch(3).allocated_bytes - one.with_batch(2).allocated_bytes == one.bytes_per_sample > 0
    assert one.with_batch(2).allocated_bytes > one.allocated_bytes


def test_autocast_halves_the_activations_of_the_convolutions():
    fp32 = estimate("umamba_bot", (32, 32, 32), 1, in_channels=1, network_kwargs=TINY, precision="fp32")
    bf16 = estimate("umamba_bot", (32, 32, 32), 1, in_channels=1, network_kwargs=TINY, precision="bf16")
    assert fp32.saved_fixed_bytes == 0 < bf16.saved_fixed_bytes  # the cached bf16 weight copies
    assert 0.4 < bf16.saved_bytes_per_sample / fp32.saved_bytes_per_sample < 0.8  # norms, loss and the SSM stay fp32


def test_max_batch_size_is_the_largest_batch_that_fits():
    result = estimate("umamba_bot", (16, 16, 16), 1, in_channels=1, network_kwargs=TINY)
    budget = result.with_batch(5).device_bytes
    assert result.max_batch_size(budget) == 5
    assert result.with_batch(6).device_bytes > budget
    assert result.max_batch_size(CONTEXT_BYTES) < 1


def test_the_estimate_is_reported_in_json_types():
    result = estimate("umamba_bot", (16, 16, 16), 2, in_channels=1, network_kwargs=TINY)
    row = result.to_dict()
    assert row["allocated_bytes"] == result.allocated_bytes and row["patch_size"] == [16, 16, 16]
    assert isinstance(result, MemoryEstimate)


@pytest.mark.parametrize("patch, batch", [((0, 16, 16), 1), ((16, 16, 16), 0)])
def test_estimate_rejects_empty_patches_and_batches(patch, batch):
    with pytest.raises(ValueError, match="positive"):
        estimate("umamba_bot", patch, batch, in_channels=1, network_kwargs=TINY)


@pytest.mark.parametrize(("ssm_fp32", "measured_mib"), [(True, 21_726), (False, 19_194)])
def test_segmamba_estimate_is_within_10_percent_of_the_h200_measurement(ssm_fp32, measured_mib):
    # benchmarks/RESULTS.md, twenty-sixth pass: our SegMamba (4→4), batch 2, 128³, fp16 autocast, training step of
    # `medmamba train` on an H200, max_memory_allocated; the scan's saved chunk and middle states included
    from medmamba.plans import load_preset

    preset = load_preset("segmamba_brats")
    kwargs = {"spatial_dims": 3, "in_channels": 4, "out_channels": 4, **preset.network_kwargs, "ssm_fp32": ssm_fp32}
    result = estimate("segmamba", (128, 128, 128), 2, in_channels=4, network_kwargs=kwargs, precision="fp16")
    assert result.parameters == 67_416_196
    assert result.allocated_bytes / MiB == pytest.approx(measured_mib, rel=0.10)
