"""The GPU benchmark scripts' CPU-side logic (their GPU runs are recorded in benchmarks/RESULTS.md)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medmamba.plans import load_preset

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_gpu():
    return _load("train_gpu")


@pytest.mark.parametrize("preset", ["umamba_bot_3d", "umamba_enc_3d", "umamba_bot_2d", "umamba_enc_2d"])
def test_architecture_block_is_per_stage_and_per_axis(train_gpu, preset):
    p = load_preset(preset)
    block = train_gpu.architecture(p.network, dict(p.network_kwargs), tuple(p.patch_size))["arch_kwargs"]
    dims = len(p.patch_size)
    assert len(block["kernel_sizes"]) == len(block["strides"]) == block["n_stages"]
    for k, s in zip(block["kernel_sizes"], block["strides"], strict=True):
        assert len(k) == len(s) == dims
        assert all(isinstance(v, int) for v in (*k, *s))


def test_merge_keeps_unmeasured_rows_and_refuses_other_cards(train_gpu):
    def row(preset, amp, t):
        return {"preset": preset, "setting": "planned", "amp": amp, "s_per_iteration": t}

    earlier = {"device": "H100", "results": [row("umamba_bot_3d", "fp32", 1.0), row("umamba_bot_2d", "fp32", 2.0)]}
    out = train_gpu.merged(earlier, [row("umamba_bot_2d", "fp32", 3.0)], "H100")
    assert [(r["preset"], r["s_per_iteration"]) for r in out] == [("umamba_bot_3d", 1.0), ("umamba_bot_2d", 3.0)]
    with pytest.raises(SystemExit, match="earlier run"):
        train_gpu.merged(earlier, [], "H200")


def test_set_changes_the_networks_arguments_and_names_the_rows(train_gpu):
    import argparse

    args = argparse.Namespace(presets=["segmamba_brats"], amp=["fp16"], quick=False,
                              network_kwargs=dict([train_gpu._network_kwarg("ssm_fp32=false")]))  # fmt: skip
    (row,) = train_gpu.rows(args)
    assert row["kwargs"]["ssm_fp32"] is False and row["kwargs"]["hidden_size"] == 768
    assert row["setting"] == "planned = 128³, batch 2, ssm_fp32=False"
    assert train_gpu._network_kwarg("norm=batch") == ("norm", "batch")  # not JSON: a string
    with pytest.raises(argparse.ArgumentTypeError, match="KEY=VALUE"):
        train_gpu._network_kwarg("ssm_fp32")


def _sass(kernel: str, dtype: str, *extra: str) -> dict:
    # a fresh process: the kernels must be compiled, not interpreted (conftest sets TRITON_INTERPRET here)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scan_sass.py"), "--kernel", kernel, "--dtype", dtype, "--json"]
    return json.loads(subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True, check=True).stdout)


def _halves(report: dict) -> list[dict]:
    # the backward's two per-state loops (one per half-chunk)
    return [loop for loop in report["loops"] if loop["mix"].get("SHFL") and loop["instructions"] < 1000]


def test_scan_kernels_exchange_across_lanes_only_for_the_db_dc_sums():
    # compiled for sm_90a on this CPU machine. The backward's per-state loops shuffle only for the dB/dC sums over
    # the warp's channels: on the GPU path a reduce-scatter (2 sums × 9 shuffles = 18 per half-chunk), on the
    # plain-Triton path tl.sum butterflies (2 × 8 tokens × 5 = 80; a reverse associative_scan would add 240).
    # Nothing spills.
    # On the GPU path the states run on per-token vectors: no barrier of a shared-memory layout change either (as
    # (8,) rows broadcast against the tiles, B_n and C_n took two per state and half-chunk).
    for extra, shuffles in (((), 18), (("--divisible",), 18), (("--plain",), 80)):
        bwd = _sass("backward", "bf16", *extra)
        assert bwd["spill_bytes"] == 0 and bwd["registers"] <= 255
        assert len(_halves(bwd)) == 2, bwd["loops"]
        assert all(loop["mix"]["SHFL"] == shuffles for loop in _halves(bwd)), (extra, bwd["loops"])
        if "--plain" not in extra:
            assert not any(loop["mix"].get("BAR") for loop in _halves(bwd)), (extra, bwd["loops"])
        if extra == ("--divisible",):
            # as launched at 64³, with the default settings: the lines the per-state loops load first are asked
            # for once per chunk and half (PassConfig.prefetch), never inside those loops
            chunk = max(bwd["loops"], key=lambda loop: loop["instructions"])
            assert chunk["mix"].get("CCTL", 0) >= 9, chunk["mix"]
            assert not any(loop["mix"].get("CCTL") for loop in bwd["loops"] if loop is not chunk), bwd["loops"]
            # and (PassConfig.load_ahead) state 0's loads before each per-state loop stay in the chunk loop, one
            # each: 2 halves × (start state, ρ, dA, the B and C words). The slots are the kernel's own scratch:
            # loaded by pure asm, the compiler merged the two halves' and hoisted them out of the chunk loop, and the
            # H200 read stale ρ and dA
            plain = _sass("backward", "bf16", "--divisible", "--no-load-ahead")
            in_place = max(plain["loops"], key=lambda loop: loop["instructions"])
            assert chunk["mix"]["LDG"] - in_place["mix"]["LDG"] >= 10, (chunk["mix"], in_place["mix"])
            # with the forward's middle states (PassConfig.mid_states, the default) the middle-state loop is gone:
            # the two halves' per-state loops are the only ones with exponentials; without them it is back
            states = [loop for loop in bwd["loops"] if loop["mix"].get("MUFU") and loop is not chunk]
            again = _sass("backward", "bf16", "--divisible", "--no-mid-states")
            chunk_again = max(again["loops"], key=lambda loop: loop["instructions"])
            assert len(states) == 2 and again["spill_bytes"] == 0, bwd["loops"]
            assert len([loop for loop in again["loops"] if loop["mix"].get("MUFU") and loop is not chunk_again]) == 3


def test_scan_backward_segment_pass_runs_token_by_token():
    # the backward's segment pass on the GPU path of raster calls: one warp, every value one per thread, so no
    # exchange between lanes; the plain path spreads its tiles over four warps and sums across lanes
    seg = _sass("backward-segment", "bf16", "--divisible")
    loop = max(seg["loops"], key=lambda x: x["instructions"])
    assert seg["spill_bytes"] == 0 and loop["mix"]["MUFU"] >= 256
    assert not any(x["mix"].get("SHFL") or x["mix"].get("BAR") for x in seg["loops"]), seg["loops"]
    plain = max(_sass("backward-segment", "bf16", "--divisible", "--plain")["loops"], key=lambda x: x["instructions"])
    assert plain["mix"].get("SHFL") and plain["mix"].get("BAR"), plain["mix"]


def test_scan_forward_runs_token_by_token_on_16_byte_loads():
    # the GPU path of the forward for raster calls: no exchange between lanes (no shuffles, no barriers of a
    # shared-memory round trip: in bf16 the carried state tile once took the coalesced layout of its saving stores,
    # and every state's pick moved it), the 16 states x 16 tokens of exps in one chunk loop, and chunks moved by
    # 16-byte loads (the plain path issues one load per token, or per two in bf16: 2.2x more here)
    for dtype in ("fp32", "bf16"):
        fwd = _sass("forward", dtype, "--divisible")  # as launched at 64³
        chunk = max(fwd["loops"], key=lambda loop: loop["instructions"])
        assert not any(loop["mix"].get("SHFL") or loop["mix"].get("BAR") for loop in fwd["loops"]), dtype
        assert chunk["mix"]["MUFU"] >= 256 and fwd["spill_bytes"] == 0
    plain = max(_sass("forward", "bf16", "--divisible", "--plain")["loops"], key=lambda loop: loop["instructions"])
    assert 2 * chunk["mix"]["LDG"] < plain["mix"]["LDG"], (chunk["mix"], plain["mix"])


def test_scan_gpu_ops_alone_do_the_work_of_the_autograd_call(monkeypatch):
    # the "ops alone" columns time the backend's entry points without autograd, as the spec timed upstream: they
    # must compute what the timed selective_scan call computes (outputs and every gradient), or the two columns
    # would time different work. Tiny three-order call under the interpreter (conftest).
    import torch

    from medmamba.kernels import selective_scan

    scan_gpu = _load("scan_gpu")
    monkeypatch.setattr(scan_gpu, "DEVICE", "cpu")
    orders = scan_gpu.SEGMAMBA
    args = scan_gpu.make_inputs(1, 4, (2, 3, 16), orders, torch.float32, True, N=2)
    grad_out = torch.randn(1, 4, 2, 3, 16, generator=torch.Generator().manual_seed(3))
    fwd, fwd_bwd = scan_gpu.op_calls(args, orders, grad_out)
    leaves = [a.detach().requires_grad_() if a is not None else None for a in args]
    out = selective_scan(*leaves, orders=orders, backend="triton").out
    want = torch.autograd.grad(out, [a for a in leaves if a is not None], grad_out)
    torch.testing.assert_close(fwd(), out.detach(), rtol=0, atol=0)
    got = [g for g in fwd_bwd() if g is not None]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=0, atol=0)


def test_scan_gpu_sweep_checks_every_gradient_against_the_torch_backend(monkeypatch):
    # a sweep variant is timed only beside its errors against the torch backend: the output's and the largest of the
    # inputs' gradients'. A backward that alone goes wrong (here the variant's Δ gradient doubled by a hook) shows in
    # the second, and only for that variant.
    from medmamba.kernels import RASTER

    scan_gpu = _load("scan_gpu")
    configs = scan_gpu.configs  # the settings the sweep overrides
    monkeypatch.setattr(scan_gpu, "DEVICE", "cpu")
    scan_call = scan_gpu.scan_call

    def doubled_delta_grad_without_load_ahead(args, orders, backend, grad=False):
        got = scan_call(args, orders, backend, grad)
        if grad and backend == "triton" and not configs.backward_config().load_ahead:
            got[1][1].register_hook(lambda g: 2 * g)
        return got

    monkeypatch.setattr(scan_gpu, "scan_call", doubled_delta_grad_without_load_ahead)
    rows = [("tiny raster", 1, 4, (2, 3, 16), (RASTER,), "fp32", True)]
    default, broken = scan_gpu.sweep(rows=rows, reps=(1, 1), variants="load_ahead=False")
    assert (default["config"], broken["config"]) == (
        "default",
        "backward load_ahead=False (the per-state loops load where they use)",
    )
    assert default["rel_err_vs_torch"] < 1e-5 and default["grad_rel_err_vs_torch"] < 1e-5, default
    assert broken["rel_err_vs_torch"] < 1e-5 and broken["grad_rel_err_vs_torch"] > 0.5, broken


def test_scan_host_times_the_python_of_a_call_with_the_kernels_stubbed():
    # benchmarks/scan_host.py: the scan's host path on CPU tensors, every launch a stub kernel (no interpreter, no
    # GPU): both launch modes run all four calls of a row; under the interpreter it refuses (its stubs would not run)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = str(ROOT / "benchmarks" / "scan_host.py")
    cmd = [sys.executable, script, "--rows", "SegMamba s3 16³", "--calls", "3", "--repeats", "1", "--first-launch"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    rows = [line.split("|")[1:-1] for line in lines if line.startswith("| SegMamba") and "first launch" not in line]
    assert [r[3].strip() for r in rows] == ["fwd", "fwd+bwd", "ops fwd", "ops fwd+bwd"]
    assert all(float(cell) > 0 for r in rows for cell in r[4:6])
    # --first-launch: the Python before each call's first launch, then when each of its launches came (a forward
    # launches its segment, carry and main passes; a backward five more)
    firsts = [line for line in lines if "first launch after" in line]
    assert [line.split("|")[2].split(":")[0].strip() for line in firsts] == ["fwd", "fwd+bwd", "ops fwd", "ops fwd+bwd"]
    counts = [len(line.split("launches at ")[1].split(" µs")[0].split(", ")) for line in firsts]
    assert counts == [3, 8, 3, 8], firsts
    refused = subprocess.run(
        [sys.executable, script], capture_output=True, text=True, env={**env, "TRITON_INTERPRET": "1"}, check=False
    )
    assert refused.returncode != 0 and "without TRITON_INTERPRET" in refused.stderr


def test_conv_gpu_dry_run_checks_each_tile_against_the_torch_backend(tmp_path):
    env = os.environ | {"TRITON_INTERPRET": "1"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "conv_gpu.py"), "--dry-run", "--out", str(tmp_path),
           "--tiles", "4,128,4,8;2,16,1,3"]  # fmt: skip
    subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    rows = json.loads((tmp_path / "conv_gpu.json").read_text())["rows"]
    assert [r["tile"] for r in rows] == [[4, 128, 4, 8], [2, 16, 1, 3]]
    assert all(r["max_rel_err"] < 1e-5 and r["fwd_ms"] > 0 and r["bwd_ms"] > 0 for r in rows), rows


def test_conv_kernels_fit_their_default_tiles_without_spills():
    # the default tiles (configs.ConvTile) as compiled for SegMamba's three orders: at 16 channels x 128 offsets a
    # one-pass backward took 255 registers and spilled, with 2 programs of 4 warps per SM. With the approximate
    # sigmoid ptxas keeps the first backward pass at 96 registers and parks one 64-bit value of the set-up in local
    # memory (8 bytes stored once, reloaded after each mode's loop): allowed, but never inside a tile loop
    for kernel, cap, parked in (("conv-forward", 96, 0), ("conv-grad", 144, 32), ("conv-dx", 168, 0)):
        report = _sass(kernel, "bf16")
        assert report["spill_bytes"] <= parked and report["registers"] <= cap, (kernel, report)
        assert not any({"LDL", "STL"} & set(loop["mix"]) for loop in report["loops"]), (kernel, report["loops"])


def test_layer_profile_linear_variants_compute_the_default_linears_and_their_gradients(monkeypatch):
    # scan_gpu.py --layer-profile --linear times the mixer pair with its linears swapped for these variants: each
    # must compute what MambaLayer's own compute, forward and backward (whose weight gradient is summed over several
    # pieces of the tokens, and a length the pieces do not divide)
    import torch

    from medmamba.layers import mamba, token_linear

    scan_gpu = _load("scan_gpu")
    monkeypatch.setattr(token_linear, "PIECE", 4)
    g = torch.Generator().manual_seed(5)
    linear = torch.nn.Linear(5, 7).double()  # in_proj, out_proj: (linear, x (B, C_in, L))
    x_weight = torch.randn(3, 3 + 2 * 4, 5, generator=g, dtype=torch.float64, requires_grad=True)  # x_proj
    dt_weight = torch.randn(3, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)  # dt_proj

    def value_and_grads(fn, x, *params):
        x = x.clone().requires_grad_()
        outs = fn(*params, x) if params == (linear,) else fn(x, *params)
        outs = outs if isinstance(outs, tuple) else (outs,)
        total = sum((o * torch.cos(torch.arange(o.numel(), dtype=o.dtype)).view(o.shape) * (i + 1)).sum()
                    for i, o in enumerate(outs))  # fmt: skip
        leaves = [x, *(linear.parameters() if params == (linear,) else params)]
        return [*outs, *torch.autograd.grad(total, leaves)]

    for length in (16, 10):
        x = torch.randn(2, 5, length, generator=g, dtype=torch.float64)
        u = torch.randn(2, 3, 5, length, generator=g, dtype=torch.float64)
        for slot, (default, inputs, params) in enumerate(
            ((mamba.channel_linear, x, (linear,)), (mamba.order_projections, u, (x_weight, dt_weight)))
        ):
            want = value_and_grads(default, inputs, *params)
            for variant in scan_gpu.LINEAR_VARIANTS.values():
                for a, b in zip(value_and_grads(variant[slot], inputs, *params), want, strict=True):
                    torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)


def test_idle_stretches_are_where_no_kernel_runs():
    # --layer-profile's GPU idle gaps: kernels may overlap (several streams); a gap is time covered by none, and only
    # those longer than the threshold count
    scan_gpu = _load("scan_gpu")
    kernels = [("c", 30.0, 40.0), ("a", 10.0, 20.0), ("b", 15.0, 25.0), ("d", 41.0, 60.0), ("e", 100.0, 110.0)]
    got = scan_gpu.idle_stretches(kernels, host_start=4.0, min_us=2.0, top=1)
    # idle: 25-30 (5 µs, after b, which ends last) and 60-100 (40 µs); 40-41 is under the threshold
    assert got["gaps"] == 2 and got["total_us"] == 45.0 and got["first_kernel_us"] == 6.0
    assert got["top"] == [{"us": 40.0, "after": "d", "before": "e"}]
    assert scan_gpu.idle_stretches([], 0.0, 5.0, 3)["gaps"] == 0
