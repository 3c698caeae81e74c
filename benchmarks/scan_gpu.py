"""GPU benchmark of the Triton selective scan: builds, checks and times in one call.

    python benchmarks/scan_gpu.py [--out DIR] [--only NAME] [--sweep] [--layer] [--layer-profile
        [--linear autograd,conv1d]] [--launch] [--profile] [--graphs] [--marks] [--quick]

For each shape of kernels.md §4.2/§4.4 (S1, S2, U-Mamba and SegMamba stages, SegMamba's three-order layer):
checks the Triton forward against the torch backend on the same inputs, then times forward (no grad: nothing
saved) and forward+backward with CUDA events (median after warm-up; random inputs as in the spec's method, never
zeros) and reports them beside the upstream mamba_ssm numbers measured on the same card kind. Each is timed twice:
through ``selective_scan`` and autograd, and as the backend's forward and backward entry points alone ("ops
alone"), which is how the spec timed upstream's ``fwd`` and ``bwd`` ops. Also reported: the achieved
"floor bytes / time" (kernels.md §3), the distance to the physical floor (max of the DRAM and exp terms) and the
peak extra device memory beyond inputs and outputs. ``--sweep`` compares the default settings with each opt-in
path of configs.PassConfig, ``--layer`` times
MambaLayer (SegMamba's stage-0 mixer pair) on both backends, ``--layer-profile`` its training step on the triton
backend with each kernel's GPU time, ``--launch`` times the host-bound rows and S1 with
Triton's own kernel launches and the direct ones (launch.py), interleaved, with the host time of a forward call.
``--profile`` lists the GPU time of each kernel of a call (torch.profiler) beside the call's per-call median: what
the kernels take and what the host adds. ``--marks`` records a CUDA event before each launch of a forward+backward:
when the host reaches the first kernel, and where the GPU waits on it. ``--only NAME`` keeps the rows whose name
contains NAME, in every table. Results: ``DIR/scan_gpu.json`` and ``DIR/scan_gpu.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from medmamba.kernels import RASTER, REVERSED, SLICE, selective_scan
from medmamba.kernels.backends.triton_scan import configs, launch

# mamba_ssm selective_scan_cuda, kernels.md §4.2 and §4.4: (fwd ms, bwd ms) per card kind
UPSTREAM = {
    "H100": {
        ("S1", "fp32", False): (1.837, 4.383),
        ("S1", "fp32", True): (1.954, 4.327),
        ("S1", "bf16", False): (1.023, 3.902),
        ("S1", "bf16", True): (1.098, 3.910),
        ("S2", "fp32", False): (7.283, 17.849),
        ("S2", "fp32", True): (7.799, 17.437),
        ("S2", "bf16", False): (5.456, 15.703),
        ("S2", "bf16", True): (5.785, 16.196),
        ("U-Mamba s0 128³", "fp32", True): (24.07, 50.23),
        ("U-Mamba s1 64³", "fp32", True): (3.33, 6.98),
        ("U-Mamba s2 32³", "fp32", True): (0.973, 2.193),
        ("U-Mamba s3 16³", "fp32", True): (0.192, 0.472),
        ("SegMamba s1 64³ (1 order)", "bf16", True): (2.587, 6.140),
        ("SegMamba s2 32³", "bf16", True): (0.359, 1.107),
        ("SegMamba s3 16³", "bf16", True): (0.088, 0.336),
        # three scans (3 × 2.587 / 6.140) plus the reorder copies and merge of §4.5 (6.4 ms forward; the same
        # assumed for their mirror in backward)
        ("SegMamba 3-order layer 64³", "bf16", True): (14.16, 24.82),
    },
    "H200": {
        ("S1", "fp32", False): (1.832, 4.431),
        ("S1", "fp32", True): (1.939, 4.359),
        ("S1", "bf16", False): (1.065, 3.778),
        ("S1", "bf16", True): (1.117, 3.817),
        ("S2", "fp32", False): (7.295, 17.641),
        ("S2", "fp32", True): (7.624, 17.420),
        ("S2", "bf16", False): (5.373, 14.956),
        ("S2", "bf16", True): (5.731, 15.379),
        ("U-Mamba s0 128³", "fp32", True): (24.03, 53.08),
        ("U-Mamba s1 64³", "fp32", True): (3.24, 7.08),
        ("U-Mamba s2 32³", "fp32", True): (0.965, 2.202),
        ("U-Mamba s3 16³", "fp32", True): (0.189, 0.483),
        ("SegMamba s1 64³ (1 order)", "bf16", True): (2.610, 6.300),
        ("SegMamba s2 32³", "bf16", True): (0.364, 1.100),
        ("SegMamba s3 16³", "bf16", True): (0.086, 0.323),
        ("SegMamba 3-order layer 64³", "bf16", True): (14.23, 25.30),
    },
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEGMAMBA = (RASTER, REVERSED, SLICE)


def shapes(quick: bool) -> list[tuple]:
    """(name, batch, d_inner, spatial, orders, dtype, z)."""
    rows = [
        (name, 2, d, (L,), (RASTER,), dt, z)
        for name, d, L in (("S1", 768, 32768), ("S2", 384, 262144))
        for dt in ("fp32", "bf16")
        for z in (False, True)
    ]
    rows += [
        ("U-Mamba s0 128³", 2, 64, (128, 128, 128), (RASTER,), "fp32", True),
        ("U-Mamba s1 64³", 2, 128, (64, 64, 64), (RASTER,), "fp32", True),
        ("U-Mamba s2 32³", 2, 256, (32, 32, 32), (RASTER,), "fp32", True),
        ("U-Mamba s3 16³", 2, 512, (16, 16, 16), (RASTER,), "fp32", True),
        ("SegMamba s1 64³ (1 order)", 2, 96, (64, 64, 64), (RASTER,), "bf16", True),
        ("SegMamba s2 32³", 2, 192, (32, 32, 32), (RASTER,), "bf16", True),
        ("SegMamba s3 16³", 2, 384, (16, 16, 16), (RASTER,), "bf16", True),
        ("SegMamba 3-order layer 64³", 2, 96, (64, 64, 64), SEGMAMBA, "bf16", True),
    ]
    if quick:
        rows = [r for r in rows if r[0] in ("S1", "SegMamba 3-order layer 64³", "U-Mamba s0 128³")]
    return rows


DEVICE = "cuda"


def make_inputs(batch, d, spatial, orders, dtype, z, N=16, seed=0):
    """kernels.md §4.1 inputs: normal u, B, C, z; Δ_raw·0.5; delta_bias = softplus⁻¹(U[1e-3, 0.1]);
    A = −(1…N)·(1 + 0.1·U); D normal."""
    dev = DEVICE
    g = torch.Generator(device=dev).manual_seed(seed)
    K = len(orders)

    def randn(*shape):
        return torch.randn(*shape, generator=g, device=dev)

    lead = (batch, K, d) if K > 1 else (batch, d)
    u = randn(*lead, *spatial).to(dtype)
    delta = (randn(*lead, *spatial) * 0.5).to(dtype)
    kc = (K, d) if K > 1 else (d,)
    A = -(
        torch.arange(1, N + 1, device=dev, dtype=torch.float32)
        * (1 + 0.1 * torch.rand(*kc, N, generator=g, device=dev))
    )
    bc = (batch, K, 1, N) if K > 1 else (batch, 1, N)
    Bm = randn(*bc, *spatial).to(dtype)
    Cm = randn(*bc, *spatial).to(dtype)
    D = randn(*kc)
    dt = torch.exp(torch.rand(*kc, generator=g, device=dev) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    bias = dt + torch.log(-torch.expm1(-dt))
    zz = randn(batch, d, *spatial).to(dtype) if z else None
    return [u, delta, A, Bm, Cm, D, zz, bias]


def cuda_time(fn, reps: int, warmup: int = 2) -> tuple[float, float]:
    """(median, min) in ms of ``fn`` timed with CUDA events.

    A :class:`TrainingStep` is timed from its call on: its ``reset`` (the leaves' gradients set to ``None``, a
    training loop's ``zero_grad``) runs before the start event.
    """
    if DEVICE == "cpu":  # --dry-run
        t = time.perf_counter()
        fn()
        ms = (time.perf_counter() - t) * 1e3
        return ms, ms
    reset, call = (fn.reset, fn.run) if isinstance(fn, TrainingStep) else (None, fn)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if reset is not None:
            reset()
        start.record()
        call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), min(times)


def back_to_back_ms(fn, reps: int) -> float:
    """ms per call of ``reps`` calls issued back to back between two CUDA events: the GPU's time when the host runs
    ahead (as in a training loop at large shapes), where :func:`cuda_time` also counts a call's host prologue."""
    if DEVICE == "cpu":  # --dry-run
        return cuda_time(fn, 1)[0]
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write (kernels.md §4.1)."""
    x = torch.empty(2**30, dtype=torch.float32, device="cuda").normal_()
    y = torch.empty_like(x)
    ms, _ = cuda_time(lambda: y.copy_(x), 10)
    return 2 * 4 * 2**30 / (ms * 1e-3)


def floor_bytes(batch, d, L, N, e, z, K=1):
    """kernels.md §3 bytes (G = 1): forward (minimal gate), backward; per order, K orders add their own u, Δ, B, C."""
    fwd = batch * L * K * ((3 * d + 2 * N) * e) + (batch * L * d * e if z else 0)
    bwd = batch * L * K * ((5 * d + 4 * N) * e) + (batch * L * 3 * d * e if z else 0)
    return fwd, bwd


def scan_call(args, orders, backend, grad=False):
    kw = {"orders": orders, "backend": backend}
    if not grad:
        with torch.no_grad():
            return selective_scan(*args, **kw).out
    leaves = [a.detach().requires_grad_() if a is not None else None for a in args]
    out = selective_scan(*leaves, **kw).out
    return out, leaves


class TrainingStep:
    """A forward+backward through ``selective_scan`` and autograd into leaves made once: ``step()`` runs one.

    ``reset()`` sets the leaves' gradients to ``None``, as a training step's ``zero_grad`` does, so nothing
    accumulates; ``run()`` is the call itself (forward, then backward into the leaves). ``step()`` is both. Until
    the nineteenth pass the timed call also made its leaf tensors (16 tensor ops of harness), and until the
    twentieth it also reset the gradients (freeing 8 tensors); :func:`cuda_time` now times ``run`` alone.
    """

    def __init__(self, args, orders, grad_out, backend: str = "triton") -> None:
        self.leaves = [a.detach().requires_grad_() if a is not None else None for a in args]
        self.orders, self.grad_out, self.backend = orders, grad_out, backend

    def reset(self) -> None:
        for a in self.leaves:
            if a is not None:
                a.grad = None

    def run(self) -> list:
        selective_scan(*self.leaves, orders=self.orders, backend=self.backend).out.backward(self.grad_out)
        return self.leaves

    def __call__(self) -> list:
        self.reset()
        return self.run()


def training_step(args, orders, grad_out, backend="triton"):
    """``(step, leaves)``: a :class:`TrainingStep` of these inputs and its leaves."""
    step = TrainingStep(args, orders, grad_out, backend)
    return step, step.leaves


def op_calls(args, orders, grad_out):
    """``(fwd, fwd_bwd)``: the Triton backend's forward and backward entry points on canonical tensors, no autograd.

    The spec timed upstream this way (kernels.md §4.1: its ``fwd`` and ``bwd`` ops called directly, their sum the
    forward+backward), so these columns compare like with like; the per-call columns add ``selective_scan``'s
    checks and autograd, which the host-bound shapes feel.
    """
    from medmamba.kernels.backends.triton_scan import backward as triton_backward
    from medmamba.kernels.backends.triton_scan import forward as triton_forward
    from medmamba.kernels.backends.triton_scan.layout import natural_spatial
    from medmamba.kernels.canonical import canonical_views

    with torch.no_grad():
        u, delta, A, B, C, D, z, bias = canonical_views(*args, orders)
        nd = u.ndim - 3
        u, delta, B, C = (natural_spatial(x, nd) for x in (u, delta, B, C))
        gy = natural_spatial(grad_out, nd)
    tensors = (u, delta, A, B, C, D, z, bias)
    kw = {"orders": orders, "delta_softplus": True, "merge": "sum"}

    def fwd():
        return triton_forward.forward(*tensors, save=False, **kw).out

    def fwd_bwd():
        res = triton_forward.forward(*tensors, save=True, **kw)
        if res.parts:  # a call run as groups of orders (PassConfig.split_orders)
            return triton_backward.grouped_backward(gy, None, *tensors, res.parts, res.pre_gate, orders=orders,
                                                    delta_softplus=True)  # fmt: skip
        return triton_backward.backward(gy, None, *tensors, res.states, res.pre_gate, p=res.plan, mids=res.mids, **kw)

    return fwd, fwd_bwd


def bench_shape(row, bw, card, reps_fwd, reps_bwd, check=True):
    name, batch, d, spatial, orders, dtname, z = row
    dtype = DTYPES[dtname]
    args = make_inputs(batch, d, spatial, orders, dtype, z)
    L, N, K = math.prod(spatial), 16, len(orders)
    res: dict = {"shape": name, "batch": batch, "d_inner": d, "L": L, "K": K, "dtype": dtname, "z": z}

    if check:  # forward against the torch backend on the same inputs
        got = scan_call(args, orders, "triton").float()
        want = scan_call(args, orders, "torch").float()
        res["rel_err_vs_torch"] = ((got - want).norm() / want.norm()).item()
        res["finite"] = bool(torch.isfinite(got).all())
        del got, want

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = scan_call(args, orders, "triton")
    torch.cuda.synchronize()
    res["fwd_extra_MiB"] = (torch.cuda.max_memory_allocated() - base - out.numel() * out.element_size()) / 2**20
    del out
    res["fwd_ms"], res["fwd_min_ms"] = cuda_time(lambda: scan_call(args, orders, "triton"), reps_fwd)
    res["fwd_b2b_ms"] = back_to_back_ms(lambda: scan_call(args, orders, "triton"), reps_fwd)

    grad_out = torch.randn((batch, d, *spatial), device=DEVICE, dtype=dtype)

    fwd_bwd, _ = training_step(args, orders, grad_out)

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    leaves = fwd_bwd()
    torch.cuda.synchronize()
    grads = sum(a.grad.numel() * a.grad.element_size() for a in leaves if a is not None and a.grad is not None)
    res["fwd_bwd_extra_MiB"] = (torch.cuda.max_memory_allocated() - base - grads) / 2**20
    del leaves
    res["fwd_bwd_ms"], res["fwd_bwd_min_ms"] = cuda_time(fwd_bwd, reps_bwd)
    res["fwd_bwd_b2b_ms"] = back_to_back_ms(fwd_bwd, reps_bwd)
    op_fwd, op_fwd_bwd = op_calls(args, orders, grad_out)
    res["fwd_op_ms"] = cuda_time(op_fwd, reps_fwd)[0]
    res["fwd_bwd_op_ms"] = cuda_time(op_fwd_bwd, reps_bwd)[0]

    e = 4 if dtname == "fp32" else 2
    fb, bb = floor_bytes(batch, d, L, N, e, z, K)
    res["fwd_GBps"] = fb / (res["fwd_ms"] * 1e-3) / 1e9
    bwd_ms = max(res["fwd_bwd_ms"] - res["fwd_ms"], 1e-6)
    res["bwd_GBps_approx"] = bb / (bwd_ms * 1e-3) / 1e9
    exp_floor_ms = batch * K * d * L * N / 4.2e12 * 1e3
    res["fwd_floor_ms"] = max(fb / bw * 1e3, exp_floor_ms)
    res["fwd_x_floor"] = res["fwd_ms"] / res["fwd_floor_ms"]
    up = UPSTREAM.get(card, {}).get((name, dtname, z))
    if up is not None:
        res["upstream_fwd_ms"], res["upstream_bwd_ms"] = up
        res["speedup_fwd"] = up[0] / res["fwd_ms"]
        res["speedup_fwd_bwd"] = (up[0] + up[1]) / res["fwd_bwd_ms"]
        res["speedup_op_fwd"] = up[0] / res["fwd_op_ms"]
        res["speedup_op_fwd_bwd"] = (up[0] + up[1]) / res["fwd_bwd_op_ms"]
    torch.cuda.empty_cache()
    return res


def bench_torch_backend(card):
    """The torch backend in the same run, at S1 fp32 without z and at the three-order layer."""
    out = []
    for row in (("S1", 2, 768, (32768,), (RASTER,), "fp32", False),
                ("SegMamba 3-order layer 64³", 2, 96, (64, 64, 64), SEGMAMBA, "bf16", True)):  # fmt: skip
        name, batch, d, spatial, orders, dtname, z = row
        args = make_inputs(batch, d, spatial, orders, DTYPES[dtname], z)
        fwd, _ = cuda_time(lambda args=args, orders=orders: scan_call(args, orders, "torch"), 3, warmup=1)
        grad_out = torch.randn((batch, d, *spatial), device=DEVICE, dtype=DTYPES[dtname])

        def fb(args=args, orders=orders, grad_out=grad_out):
            o, _ = scan_call(args, orders, "torch", grad=True)
            o.backward(grad_out)

        fwd_bwd, _ = cuda_time(fb, 2, warmup=1)
        out.append({"shape": name, "dtype": dtname, "z": z, "torch_fwd_ms": fwd, "torch_fwd_bwd_ms": fwd_bwd})
        del args
        torch.cuda.empty_cache()
    return out


def sweep_variants() -> list[tuple[str, tuple[configs.PassConfig, configs.PassConfig] | None]]:
    """The settings ``--sweep`` compares: the defaults, then each opt-in path of configs.PassConfig, as
    ``(label, (forward settings, backward settings))``; each variant changes one setting of both passes' defaults."""
    fwd, bwd = configs.forward_config(), configs.backward_config()

    def variant(**changes):
        return dataclasses.replace(fwd, **changes), dataclasses.replace(bwd, **changes)

    return [
        ("default", None),
        ("raster_maxnreg=None (the compiler's registers)", variant(raster_maxnreg=None)),
        (
            "mixed_vectors=False (tiles for calls with a strided order)",
            variant(mixed_vectors=False, mixed_vectors_saving=False),
        ),
        ("mixed_vectors (also in the forward without saving)", variant(mixed_vectors=True)),
        ("split_orders=False (mixed orders in one call)", variant(split_orders=False)),
        ("split_min_length=0 (short calls split too)", variant(split_min_length=0)),
        ("line_vectors=0 (one strided order on the chunk passes)", variant(line_vectors=0)),
        ("backward line_vectors=0 (the chunk path's main pass)", (fwd, dataclasses.replace(bwd, line_vectors=0))),
        (
            "backward line_vector_segments=False (the chunk path's segment pass for line-vector calls)",
            (fwd, dataclasses.replace(bwd, line_vector_segments=False)),
        ),
        (
            "backward token_segments (the raster segment pass token by token, one warp per 32 channels)",
            (fwd, dataclasses.replace(bwd, token_segments=True)),
        ),
        ("prefetch=False (no early requests for the per-state loops' lines)", variant(prefetch=False)),
        (
            "backward load_ahead=False (the per-state loops load where they use)",
            (fwd, dataclasses.replace(bwd, load_ahead=False)),
        ),
        (
            "backward line_vector_load_ahead (the line-vector per-state loops load one state ahead)",
            (fwd, dataclasses.replace(bwd, line_vector_load_ahead=True)),
        ),
        (
            "mid_states=False (the backward recomputes the chunks' middle states)",
            variant(mid_states=False),
        ),
        (
            "backward maxnreg=168 (12 programs per SM, no spills on sm_90a with mid_states)",
            (fwd, dataclasses.replace(bwd, maxnreg=168)),
        ),
        (
            "backward maxnreg=168, line_vector_maxnreg=200 (10 line-vector programs per SM)",
            (fwd, dataclasses.replace(bwd, maxnreg=168, line_vector_maxnreg=200)),
        ),
        (
            "backward maxnreg=144 (14 programs per SM, no spills on sm_90a at lengths of 16s)",
            (fwd, dataclasses.replace(bwd, maxnreg=144)),
        ),
        (
            "backward maxnreg=168, fill=12 (as many segments as resident programs)",
            (fwd, dataclasses.replace(bwd, maxnreg=168, fill=12)),
        ),
        (
            "forward prefetch (the per-token main pass asks for the next chunk's lines)",
            (dataclasses.replace(fwd, prefetch=True), bwd),
        ),
        (
            "backward inline_ptx=False (lines_backward.py's dB/dC by tl.sum)",
            (fwd, dataclasses.replace(bwd, inline_ptx=False)),
        ),
        ("strided_maxnreg=None (the compiler's registers)", variant(strided_maxnreg=None)),
        ("strided_maxnreg=168", variant(strided_maxnreg=168)),
        ("strided_maxnreg=200", variant(strided_maxnreg=200)),
        ("maxnreg=168", variant(maxnreg=168)),
        ("save_pre_gate=False", variant(save_pre_gate=False)),
        (
            "forward fused_carry (segment pass, carry and main pass as one cooperative launch)",
            (dataclasses.replace(fwd, fused_carry=True), bwd),
        ),
        ("line_segments=False", variant(line_segments=False)),
        # how many segments a short call is cut into (at 16³ the segment states' bytes rival the inputs')
        *(
            (
                f"{side} fill={n} (segments for about {n} × 2 programs per SM)",
                (dataclasses.replace(fwd, fill=n), bwd)
                if side == "forward"
                else (fwd, dataclasses.replace(bwd, fill=n)),
            )
            for side, fills in (("forward", (2, 4, 16)), ("backward", (4, 16)))
            for n in fills
        ),
    ]


SWEEP_ROWS = [
    ("S1", 2, 768, (32768,), (RASTER,), "bf16", True),
    ("U-Mamba s1 64³", 2, 128, (64, 64, 64), (RASTER,), "fp32", True),
    ("SegMamba slice order 64³", 2, 96, (64, 64, 64), (SLICE,), "bf16", True),
    ("SegMamba 3-order layer 64³", 2, 96, (64, 64, 64), SEGMAMBA, "bf16", True),
    ("SegMamba 3-order layer 32³", 2, 192, (32, 32, 32), SEGMAMBA, "bf16", True),
    ("SegMamba 3-order layer 16³", 2, 384, (16, 16, 16), SEGMAMBA, "bf16", True),
]


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def _grads(args, orders, backend: str, grad_out: torch.Tensor) -> list[torch.Tensor]:
    """The gradients of every input of one call (None inputs left out), in the inputs' order."""
    out, leaves = scan_call(args, orders, backend, grad=True)
    out.backward(grad_out)
    return [leaf.grad for leaf in leaves if leaf is not None]


def sweep(
    rows=SWEEP_ROWS,
    reps: tuple[int, int] = (10, 5),
    only: str | None = None,
    variants: str | None = None,
    graphs: bool = False,
) -> list[dict]:
    """Forward and forward+backward of each row under each of :func:`sweep_variants`, after a check of the output
    and of every input's gradient against the torch backend's (the largest relative error over the gradients: a
    variant whose backward reads stale values shows there, not in the output). ``only``: the rows whose name
    contains it; ``variants``: comma-separated parts of the variants' labels to run (the defaults always run);
    ``graphs``: also each variant's calls as CUDA-graph replays (:func:`graphed_calls`), the GPU's time where the
    eager call waits on the host (the 16³ rows)."""
    picked = [v.strip() for v in variants.split(",")] if variants else None
    results = []
    for row in rows:
        if only and only not in row[0]:
            continue
        name, batch, d, spatial, orders, dtname, z = row
        args = make_inputs(batch, d, spatial, orders, DTYPES[dtname], z)
        grad_out = torch.randn((batch, d, *spatial), device=DEVICE, dtype=DTYPES[dtname])
        with torch.no_grad():
            want = scan_call(args, orders, "torch").float()
        want_grads = _grads(args, orders, "torch", grad_out)
        for label, cfg in sweep_variants():
            if picked and cfg is not None and not any(part in label for part in picked):
                continue
            with configs.override(*cfg) if cfg is not None else configs.override():
                with torch.no_grad():
                    got = scan_call(args, orders, "triton").float()
                err = _rel_err(got, want)
                grad_err = max(map(_rel_err, _grads(args, orders, "triton", grad_out), want_grads))
                ms, _ = cuda_time(lambda args=args, orders=orders: scan_call(args, orders, "triton"), reps[0])

                step, _ = training_step(args, orders, grad_out)

                fb, _ = cuda_time(step, reps[1])
                replays = ""
                if graphs:
                    g_fwd, g_fwd_bwd, _ = graphed_calls(row)
                    g_ms, g_fb = cuda_time(g_fwd, reps[0], warmup=3)[0], cuda_time(g_fwd_bwd, reps[1], warmup=3)[0]
                    replays = f", graph replays {g_ms:.3f} / {g_fb:.3f} ms"
            results.append({"shape": name, "dtype": dtname, "config": label, "fwd_ms": ms, "fwd_bwd_ms": fb,
                            "rel_err_vs_torch": err, "grad_rel_err_vs_torch": grad_err,
                            **({"graph_fwd_ms": g_ms, "graph_fwd_bwd_ms": g_fb} if graphs else {})})  # fmt: skip
            print(f"sweep {name} {dtname} {label}: fwd {ms:.3f} ms, fwd+bwd {fb:.3f} ms, err {err:.1e}, "
                  f"grad err {grad_err:.1e}{replays}", flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    return results


def bench_layer(card):
    """MambaLayer, SegMamba's stage-0 mixer pair: d_model 48, 64³ tokens (128³ input), batch 2, bf16 autocast;
    triton vs torch backend; networks.md §10 gives the official pair at 34 ms forward / 90 ms forward+backward."""
    from medmamba.kernels import use_backend
    from medmamba.layers import MambaLayer

    results = []
    x = torch.randn(2, 48, 64, 64, 64, device="cuda")
    for ssm_fp32 in (True, False):
        torch.manual_seed(0)
        pair = torch.nn.Sequential(*(MambaLayer(48, orders=SEGMAMBA, residual=True, ssm_fp32=ssm_fp32)
                                     for _ in range(2))).cuda()  # fmt: skip
        for backend in ("triton", "torch"):
            with use_backend(backend):

                def fwd(pair=pair):
                    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                        return pair(x)

                def fwd_bwd(pair=pair):
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        out = pair(x)
                    out.float().square().mean().backward()

                reps = 10 if backend == "triton" else 2
                f_ms, _ = cuda_time(fwd, reps, warmup=1)
                torch.cuda.reset_peak_memory_stats()
                fb_ms, _ = cuda_time(fwd_bwd, reps, warmup=1)
                peak = torch.cuda.max_memory_allocated() / 2**20
            results.append({"ssm_fp32": ssm_fp32, "backend": backend, "fwd_ms": f_ms, "fwd_bwd_ms": fb_ms,
                            "peak_MiB": peak})  # fmt: skip
            print(f"layer pair ssm_fp32={ssm_fp32} {backend}: fwd {f_ms:.2f} ms, fwd+bwd {fb_ms:.2f} ms", flush=True)
        # same results on both backends (forward, bf16 autocast)
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            with use_backend("triton"):
                a = pair(x).float()
            with use_backend("torch"):
                b = pair(x).float()
        results.append({"ssm_fp32": ssm_fp32, "rel_err_triton_vs_torch": ((a - b).norm() / b.norm()).item()})
        del pair
        torch.cuda.empty_cache()
    return results


LAUNCH_ROWS = ("S1", "U-Mamba s2 32³", "U-Mamba s3 16³", "SegMamba s2 32³", "SegMamba s3 16³")


def host_us(fn, calls: int = 20) -> float:
    """Host time of one call in µs: issue ``calls`` calls back to back, without waiting for the GPU."""
    if DEVICE == "cpu":  # --dry-run
        calls = 1
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    us = (time.perf_counter() - t) / calls * 1e6
    torch.cuda.synchronize()
    return us


def launch_ab(rows, rounds: int = 2, reps=(30, 20)) -> list[dict]:
    """Each row with Triton's own launches (``jit``), the direct ones found by argument key (``keyed``) and by the
    call sites' memos through Triton's C launchers (``direct-triton``) and through the native one (``direct``,
    launch.Launcher.at, native_launch.c), interleaved ``rounds`` times; per call through ``selective_scan`` and as
    the backend's ops alone (``op_calls``, as the spec timed upstream).

    The lent machines' host speed drifts within minutes, so the modes alternate on the same inputs.
    """
    return [r for row in rows for r in _launch_row(row, rounds, reps)]


def row_calls(row):
    """``(fwd, fwd_bwd)``: a row's Triton forward (no grad) and forward+backward on fresh random inputs."""
    _, batch, d, spatial, orders, dtname, z = row
    dtype = DTYPES[dtname]
    args = make_inputs(batch, d, spatial, orders, dtype, z)
    grad_out = torch.randn((batch, d, *spatial), device=DEVICE, dtype=dtype)

    def fwd():
        return scan_call(args, orders, "triton")

    fwd_bwd, _ = training_step(args, orders, grad_out)

    return fwd, fwd_bwd


def _launch_row(row, rounds, reps) -> list[dict]:
    name, batch, d, spatial, orders, dtname, z = row
    args = make_inputs(batch, d, spatial, orders, DTYPES[dtname], z)
    grad_out = torch.randn((batch, d, *spatial), device=DEVICE, dtype=DTYPES[dtname])
    fwd_bwd, _ = training_step(args, orders, grad_out)
    ops_fwd, ops_fwd_bwd = op_calls(args, orders, grad_out)

    def fwd():
        return scan_call(args, orders, "triton")

    out = []
    for rnd in range(rounds):
        for mode in ("jit", "keyed", "direct-triton", "direct"):
            with launch.use_mode(mode):
                fwd_ms = cuda_time(fwd, reps[0], warmup=3)[0]
                fb_ms = cuda_time(fwd_bwd, reps[1], warmup=3)[0]
                ops_ms = cuda_time(ops_fwd, reps[0], warmup=3)[0]
                ops_fb_ms = cuda_time(ops_fwd_bwd, reps[1], warmup=3)[0]
                host = host_us(fwd)
            out.append({"shape": name, "dtype": dtname, "z": z, "mode": mode, "round": rnd, "fwd_ms": fwd_ms,
                        "fwd_bwd_ms": fb_ms, "ops_fwd_ms": ops_ms, "ops_fwd_bwd_ms": ops_fb_ms,
                        "host_us": host})  # fmt: skip
            print(f"launch {mode} {name} {dtname} z={z}: {fwd_ms:.3f} / {fb_ms:.3f} ms, ops alone {ops_ms:.3f} / "
                  f"{ops_fb_ms:.3f} ms, host {host:.0f} us", flush=True)  # fmt: skip
    return out


def graphed_calls(row):
    """``(fwd, fwd_bwd, matches)``: replays of CUDA graphs of a row's Triton forward (no grad) and forward+backward.

    Each call is captured once on static inputs (``torch.cuda.graph``, after warm-up on a side stream, as PyTorch's
    whole-network capture does), so a replay issues the same kernels with no Python between them: the call's GPU
    time. ``matches``: a replay on new input values gives the eager call's output and gradients, bit for bit.
    """
    _, batch, d, spatial, orders, dtname, z = row
    dtype = DTYPES[dtname]
    args = make_inputs(batch, d, spatial, orders, dtype, z)
    leaves = [a.detach().requires_grad_() if a is not None else None for a in args]
    grad_out = torch.randn((batch, d, *spatial), device=DEVICE, dtype=dtype)

    def fwd():
        return scan_call(args, orders, "triton")

    def fwd_bwd():
        for a in leaves:
            if a is not None:
                a.grad = None
        selective_scan(*leaves, orders=orders, backend="triton").out.backward(grad_out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fwd()
            fwd_bwd()
    torch.cuda.current_stream().wait_stream(side)
    g_fwd, g_fwd_bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g_fwd):
        static_out = fwd()
    with torch.cuda.graph(g_fwd_bwd):
        fwd_bwd()

    with torch.no_grad():  # new values in the static inputs: each one's own, shuffled (A stays negative)
        for a in [*args, grad_out]:
            if a is not None:
                a.copy_(a.flatten()[torch.randperm(a.numel(), device=a.device)].view_as(a))
    g_fwd.replay()
    g_fwd_bwd.replay()
    want = scan_call(args, orders, "triton")
    eager, eager_leaves = scan_call(args, orders, "triton", grad=True)
    eager.backward(grad_out)
    matches = torch.equal(static_out, want) and all(
        torch.equal(a.grad, b.grad) for a, b in zip(leaves, eager_leaves, strict=True) if a is not None
    )
    return g_fwd.replay, g_fwd_bwd.replay, matches


def graph_rows(rows, card, reps=(30, 20)) -> list[dict]:
    """Each row's forward and forward+backward per call, eager and as CUDA-graph replays (:func:`graphed_calls`),
    beside upstream's eager call on the same card kind."""
    out = []
    for row in rows:
        name, *_, dtname, z = row
        fwd, fwd_bwd = row_calls(row)
        g_fwd, g_fwd_bwd, matches = graphed_calls(row)
        r = {"shape": name, "dtype": dtname, "z": z, "graph_matches_eager": matches,
             "fwd_ms": cuda_time(fwd, reps[0], warmup=3)[0], "fwd_bwd_ms": cuda_time(fwd_bwd, reps[1], warmup=3)[0],
             "graph_fwd_ms": cuda_time(g_fwd, reps[0], warmup=3)[0],
             "graph_fwd_bwd_ms": cuda_time(g_fwd_bwd, reps[1], warmup=3)[0]}  # fmt: skip
        up = UPSTREAM.get(card, {}).get((name, dtname, z))
        if up is not None:
            r["upstream_fwd_ms"], r["upstream_fwd_bwd_ms"] = up[0], up[0] + up[1]
        out.append(r)
        print(
            f"graphs {name} {dtname} z={z}: eager {r['fwd_ms']:.3f} / {r['fwd_bwd_ms']:.3f} ms, graph "
            f"{r['graph_fwd_ms']:.3f} / {r['graph_fwd_bwd_ms']:.3f} ms, matches eager: {matches}",
            flush=True,
        )
        torch.cuda.empty_cache()
    return out


def launch_marks(rows, calls: int = 15) -> list[dict]:
    """When each kernel launch of a row's forward+backward is reached, in ms after the call's start.

    A CUDA event is recorded before every launch of the scan backend (``launch.Launcher``), medians of ``calls``
    calls. The first mark is the host's time before the GPU can start (at the large shapes the whole of what a call
    adds to its kernels); a later mark that lies past the previous kernel's end is the GPU waiting on the host.

    The host's own timeline of the same calls (``time.perf_counter``, ms after the start event was recorded): when
    each launch was called and returned, when autograd entered the backward Function and left it, and when the call
    returned. Between a launch's return and the next one's call is Python; between the forward's last launch and
    the backward's entry, autograd's engine and the harness's ``backward()``.
    """
    from medmamba.kernels.backends.triton_scan import autograd
    from medmamba.kernels.backends.triton_scan import launch as launch_module

    out = []
    real, real_backward = launch_module.Launcher.launch, autograd.TritonScan.backward
    clock = time.perf_counter
    for row in rows:
        name, batch, d, spatial, orders, dtname, z = row
        dtype = DTYPES[dtname]
        args = make_inputs(batch, d, spatial, orders, dtype, z)
        step, _ = training_step(args, orders, torch.randn((batch, d, *spatial), device=DEVICE, dtype=dtype))
        marks: list = []
        host: dict = {"launches": [], "backward": []}

        def marked(self, *a, marks=marks, host=host, **k):
            host["launches"].append(clock())
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)
            real(self, *a, **k)
            host["launches"].append(clock())

        def timed_backward(ctx, *grads, host=host):
            host["backward"].append(clock())
            grads = real_backward(ctx, *grads)
            host["backward"].append(clock())
            return grads

        launch_module.Launcher.launch = marked
        autograd.TritonScan.backward = staticmethod(timed_backward)
        try:
            for _ in range(3):
                step()
            runs, host_runs = [], []
            for _ in range(calls):
                step.reset()
                marks.clear()
                host["launches"].clear()
                host["backward"].clear()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                t0 = clock()
                step.run()
                returned = clock()
                end.record()
                end.synchronize()
                runs.append([start.elapsed_time(m) for m in marks] + [start.elapsed_time(end)])
                host_runs.append([(t - t0) * 1e3 for t in (*host["launches"], *host["backward"], returned)])
        finally:
            launch_module.Launcher.launch = real
            autograd.TritonScan.backward = real_backward
        med = [statistics.median(r[i] for r in runs) for i in range(len(runs[0]))]
        host_med = [statistics.median(r[i] for r in host_runs) for i in range(len(host_runs[0]))]
        n = len(med) - 1
        out.append({"shape": name, "dtype": dtname, "z": z, "launch_ms": med[:-1], "call_ms": med[-1],
                    "host_launch_ms": host_med[: 2 * n], "host_backward_ms": host_med[2 * n : -1],
                    "host_return_ms": host_med[-1]})  # fmt: skip
        pairs = zip(host_med[0 : 2 * n : 2], host_med[1 : 2 * n : 2], strict=True)
        print(f"marks {name} {dtname} z={z}: first launch at {med[0]:.3f} ms, call {med[-1]:.3f} ms, launches "
              + " ".join(f"{x:.3f}" for x in med[:-1]) + "; host: launches called/returned "
              + " ".join(f"{a:.3f}/{b:.3f}" for a, b in pairs)
              + f", backward {'/'.join(f'{x:.3f}' for x in host_med[2 * n : -1])}, returned {host_med[-1]:.3f}",
              flush=True)  # fmt: skip
        torch.cuda.empty_cache()
    return out


PROFILE_ROWS = ("S1", "U-Mamba s3 16³", "SegMamba s3 16³", "SegMamba 3-order layer 64³")


def layer_profile(
    spatial=(64, 64, 64), steps: int = 3, reps: int = 5, d_model: int = 48, linear: str = "default"
) -> dict:
    """SegMamba's stage-0 mixer pair (two ``MambaLayer``s, d_model 48, batch 2, bf16 autocast, the scan in bf16) on
    the triton backend: ms per training step (forward+backward, CUDA events, :func:`cuda_time`; and issued back to
    back, :func:`back_to_back_ms`, where the host's prologue of each step hides behind the GPU's work, as in a loop
    that does not wait for each step), each kernel's GPU time per step (torch.profiler) and each GEMM's by its
    shapes, against the official pair's 90 ms (networks.md §10). ``linear``: the layer's linears (in_proj,
    out_proj, x_proj, dt_proj) as they are (``"default"``) or as one of :data:`LINEAR_VARIANTS`, checked against
    the default on the same inputs first (``max_rel_err``)."""
    from medmamba.kernels import use_backend
    from medmamba.layers import MambaLayer, mamba

    torch.manual_seed(0)
    x = torch.randn(2, d_model, *spatial, device=DEVICE)
    pair = torch.nn.Sequential(*(MambaLayer(d_model, orders=SEGMAMBA, residual=True, ssm_fp32=False)
                                 for _ in range(2))).to(DEVICE)  # fmt: skip

    def step():
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = pair(x)
        out.float().square().mean().backward()
        return out

    def outputs():
        pair.zero_grad(set_to_none=True)
        out = step()
        return [out.detach().float(), *(p.grad.float() for p in pair.parameters())]

    default_linears = mamba.channel_linear, mamba.order_projections
    err = 0.0
    with use_backend("triton"):
        if linear != "default":
            want = outputs()
            mamba.channel_linear, mamba.order_projections = LINEAR_VARIANTS[linear]
            got = outputs()
            err = max(
                ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() for a, b in zip(got, want, strict=True)
            )
        try:
            step_ms, _ = cuda_time(step, reps)
            back_to_back = back_to_back_ms(step, 2 * reps)
            kernels = kernel_times(step, steps)
            ops = op_times(step, steps)
            gaps = idle_gaps(step)
        finally:
            mamba.channel_linear, mamba.order_projections = default_linears
    row = {"spatial": list(spatial), "linear": linear, "max_rel_err": err, "step_ms": step_ms,
           "back_to_back_ms": back_to_back, "kernels_ms": sum(k["ms"] for k in kernels), "official_fwd_bwd_ms": 90.0,
           "kernels": kernels, "ops": ops, "gaps": gaps}  # fmt: skip
    print(f"mixer pair {spatial}, linear {linear}: {step_ms:.2f} ms per training step ({back_to_back:.2f} back to "
          f"back), kernels {row['kernels_ms']:.2f} ms, err vs default {err:.1e}", flush=True)  # fmt: skip
    return row


def _linear_conv1d(linear, x):
    # the channel linear as a 1 × 1 convolution (cuDNN picks its own weight-gradient algorithm)
    return torch.nn.functional.conv1d(x, linear.weight[:, :, None], linear.bias)


def _order_linear_conv1d(weight, x):
    # the per-order linear as a grouped 1 × 1 convolution, a group per order
    B, K, I, L = x.shape
    return torch.nn.functional.conv1d(x.reshape(B, K * I, L), weight.reshape(-1, I, 1), groups=K).view(B, K, -1, L)


def _linear_autograd(linear, x):
    # the twenty-second pass's in_proj and out_proj: a batched GEMM through autograd (cuBLAS's skinny
    # weight-gradient kernels)
    out = torch.bmm(linear.weight.expand(x.shape[0], -1, -1), x)
    return out + linear.bias[:, None] if linear.bias is not None else out


def _projections_through(order_linear):
    """The twenty-second pass's x_proj and dt_proj (two per-order linears and slices, through autograd), with
    ``order_linear(weight (K, O, I), x (B, K, I, L))`` as their product."""

    def order_projections(u, x_proj_weight, dt_proj_weight):
        R, O = dt_proj_weight.shape[-1], x_proj_weight.shape[1]
        N, padded = (O - R) // 2, min(-(-R // 8) * 8, O)
        x_dbl = order_linear(x_proj_weight.to(u.dtype), u)
        dt_weight = torch.nn.functional.pad(dt_proj_weight.to(u.dtype), (0, padded - R))
        return u, order_linear(dt_weight, x_dbl[:, :, :padded]), x_dbl[:, :, R : R + N], x_dbl[:, :, R + N :]

    return order_projections


# name -> (the layer's channel_linear (in_proj, out_proj), its order_projections (x_proj, dt_proj))
LINEAR_VARIANTS = {
    "autograd": (_linear_autograd, _projections_through(torch.matmul)),
    "conv1d": (_linear_conv1d, _projections_through(_order_linear_conv1d)),
}


def kernel_times(fn, calls: int) -> list[dict]:
    """Each kernel of ``calls`` runs of ``fn`` (torch.profiler, CUDA activity): ``{"name", "ms", "per_call"}`` per
    call, the longest first."""
    from torch.profiler import ProfilerActivity, profile

    activity = ProfilerActivity.CUDA if DEVICE == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sorted(
        ({"name": e.key, "ms": e.device_time_total / calls / 1e3, "per_call": e.count / calls}
         for e in prof.key_averages() if e.device_time_total > 0),
        key=lambda k: -k["ms"],
    )  # fmt: skip


def idle_gaps(fn, min_us: float = 5.0, top: int = 10) -> dict:
    """Where the GPU waits inside one run of ``fn`` (after a warm-up), by torch.profiler's kernel timestamps.

    ``{"gaps", "total_us", "first_kernel_us", "top"}``: the idle stretches longer than ``min_us`` between kernels,
    their sum, when the first kernel started after the first host op, and the longest ``top`` with the kernels around
    them. The profiler slows the host, so the gaps come out longer than unprofiled; what they point at (the kernels
    the GPU waits for the host to launch) is what counts. Empty on the CPU (--dry-run).
    """
    from torch.profiler import ProfilerActivity, profile

    fn()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    kernels = [(e.name, e.time_range.start, e.time_range.end)
               for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # fmt: skip
    host = [e.time_range.start for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    return idle_stretches(kernels, min(host) if host else 0.0, min_us, top)


def idle_stretches(kernels: list[tuple[str, float, float]], host_start: float, min_us: float, top: int) -> dict:
    """:func:`idle_gaps` from ``(name, start, end)`` kernel intervals (µs) and the first host op's start: a stretch is
    idle where no kernel runs (kernels on several streams may overlap)."""
    if not kernels:
        return {"gaps": 0, "total_us": 0.0, "first_kernel_us": None, "top": []}
    kernels = sorted(kernels, key=lambda k: k[1])
    gaps, end = [], kernels[0][2]
    for prev, k in itertools.pairwise(kernels):
        idle = k[1] - end
        if idle > min_us:
            gaps.append({"us": idle, "after": prev[0][:60], "before": k[0][:60]})
        end = max(end, k[2])
    gaps.sort(key=lambda g: -g["us"])
    return {"gaps": len(gaps), "total_us": sum(g["us"] for g in gaps), "first_kernel_us": kernels[0][1] - host_start,
            "top": gaps[:top]}  # fmt: skip


def op_times(
    fn,
    calls: int,
    names=("aten::bmm", "aten::mm", "aten::addmm", "aten::baddbmm", "aten::convolution", "aten::convolution_backward"),
) -> list[dict]:
    """The GPU time of each of ``names``' calls per input shapes over ``calls`` runs of ``fn`` (torch.profiler,
    ``record_shapes``): ``{"name", "shapes", "ms", "per_call"}`` per call, the longest first. It tells which GEMM a
    cuBLAS kernel of :func:`kernel_times` serves."""
    from torch.profiler import ProfilerActivity, profile

    cuda = DEVICE == "cuda"
    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages(group_by_input_shape=True):
        if e.key in names:
            us = e.self_device_time_total if cuda else e.self_cpu_time_total
            out.append({"name": e.key, "shapes": str(e.input_shapes), "ms": us / calls / 1e3,
                        "per_call": e.count / calls})  # fmt: skip
    return sorted(out, key=lambda o: -o["ms"])


def kernel_profile(rows, calls: int = 5) -> list[dict]:
    """GPU time per kernel of each row's forward and forward+backward, per call (torch.profiler, CUDA activity),
    beside the call's CUDA-event median (:func:`cuda_time`): their difference is the host's share of a call."""
    out = []
    for row in rows:
        name, *_, dtname, z = row
        for tag, fn in zip(("fwd", "fwd+bwd"), row_calls(row), strict=True):
            per_call, _ = cuda_time(fn, 10)
            kernels = kernel_times(fn, calls)
            out.append({"shape": name, "dtype": dtname, "z": z, "pass": tag, "per_call_ms": per_call,
                        "kernels_ms": sum(k["ms"] for k in kernels), "kernels": kernels})  # fmt: skip
            print(f"profile {name} {dtname} z={z} {tag}: per call {per_call:.3f} ms, kernels "
                  f"{out[-1]['kernels_ms']:.3f} ms", flush=True)  # fmt: skip
    return out


def markdown(
    info, rows, torch_rows, sweep_rows, layer_rows, launch_rows=(), profile_rows=(), graph_rows=(), marks_rows=()
) -> str:
    head = (f"Card: {info['card_name']} ({info['card']}), torch {info['torch']}, triton {info['triton']}; "
            f"copy bandwidth {info['copy_TBps']:.2f} TB/s. Command: `{info['command']}`.")  # fmt: skip
    lines = [head]
    if rows:
        lines.append(
            "\n| shape | dtype | z | K | fwd ms | upstream fwd | × | fwd+bwd ms | upstream fwd+bwd | × | back to back: "
            "fwd / fwd+bwd ms | ops alone: fwd / fwd+bwd ms (×) | fwd GB/s | fwd × floor | extra MiB fwd / fwd+bwd | "
            "err vs torch |"
        )
        lines.append("|" + "---|" * 16)
    for r in rows:
        up_f = r.get("upstream_fwd_ms")
        up_fb = (r["upstream_fwd_ms"] + r["upstream_bwd_ms"]) if up_f is not None else None
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {'z' if r['z'] else '-'} | {r['K']} | {r['fwd_ms']:.3f} | "
            f"{up_f if up_f is not None else '-'} | {r.get('speedup_fwd', float('nan')):.2f} | {r['fwd_bwd_ms']:.3f} | "
            f"{f'{up_fb:.3f}' if up_fb is not None else '-'} | {r.get('speedup_fwd_bwd', float('nan')):.2f} | "
            f"{r.get('fwd_b2b_ms', float('nan')):.3f} / {r.get('fwd_bwd_b2b_ms', float('nan')):.3f} | "
            f"{r.get('fwd_op_ms', float('nan')):.3f} / {r.get('fwd_bwd_op_ms', float('nan')):.3f} "
            f"({r.get('speedup_op_fwd', float('nan')):.2f} / {r.get('speedup_op_fwd_bwd', float('nan')):.2f}) | "
            f"{r['fwd_GBps']:.0f} | {r['fwd_x_floor']:.1f} | {r['fwd_extra_MiB']:.0f} / {r['fwd_bwd_extra_MiB']:.0f} | "
            f"{r.get('rel_err_vs_torch', float('nan')):.1e} |"
        )
    if torch_rows:
        lines += ["", "| torch backend, same run | dtype | fwd ms | fwd+bwd ms |", "|---|---|---|---|"]
        for r in torch_rows:
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['torch_fwd_ms']:.1f} | {r['torch_fwd_bwd_ms']:.1f} |")
    if layer_rows:
        lines += ["", "| MambaLayer pair (SegMamba stage 0) | backend | fwd ms | fwd+bwd ms | peak MiB |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in layer_rows:
            if "backend" in r:
                lines.append(f"| ssm_fp32={r['ssm_fp32']} | {r['backend']} | {r['fwd_ms']:.2f} | "
                             f"{r['fwd_bwd_ms']:.2f} | {r['peak_MiB']:.0f} |")  # fmt: skip
        for r in layer_rows:
            if "step_ms" in r:
                head = (f"Mixer pair {tuple(r['spatial'])}, triton, channel linears {r.get('linear', 'default')} "
                        f"(max rel err vs default {r.get('max_rel_err', 0.0):.1e}), per training step: "
                        f"**{r['step_ms']:.2f} ms** "
                        f"({r['official_fwd_bwd_ms'] / r['step_ms']:.2f}× the official "
                        f"{r['official_fwd_bwd_ms']:.0f}); {r.get('back_to_back_ms', float('nan')):.2f} ms per "
                        f"step issued back to back (no host prologue per step); {r['kernels_ms']:.2f} ms of "
                        "kernels:")  # fmt: skip
                lines += ["", head, "", "| kernel | ms per step | launches per step |", "|---|---|---|"]
                for k in r["kernels"][:30]:
                    lines.append(f"| {k['name'][:90]} | {k['ms']:.3f} | {k['per_call']:.0f} |")
                gaps = r.get("gaps") or {}
                if gaps.get("top"):
                    lines += ["", (f"GPU idle inside one profiled step: {gaps['gaps']} gaps over 5 µs, "
                              f"{gaps['total_us'] / 1e3:.2f} ms in all; the first kernel "
                              f"{gaps['first_kernel_us'] / 1e3:.2f} ms after the first host op (the profiler slows "
                              "the host). The longest:"), "", "| µs | after | before |", "|---|---|---|"]  # fmt: skip
                    lines += [f"| {g['us']:.0f} | {g['after']} | {g['before']} |" for g in gaps["top"]]
                if r.get("ops"):
                    lines += ["", "| GEMM op | input shapes | ms per step | calls per step |", "|---|---|---|---|"]
                    lines += [f"| {o['name']} | {o['shapes']} | {o['ms']:.3f} | {o['per_call']:.0f} |"
                              for o in r["ops"]]  # fmt: skip
    if sweep_rows:
        graphed = any("graph_fwd_ms" in r for r in sweep_rows)
        head = "| sweep | dtype | setting | fwd ms | fwd+bwd ms |" + (" graph replays ms |" if graphed else "")
        lines += [
            "",
            head + " err vs torch | gradients' err vs torch |",
            "|---|---|---|---|---|" + "---|" * (2 + graphed),
        ]
        for r in sweep_rows:
            grad_err = r.get("grad_rel_err_vs_torch", float("nan"))
            replays = f" {r['graph_fwd_ms']:.3f} / {r['graph_fwd_bwd_ms']:.3f} |" if "graph_fwd_ms" in r else ""
            lines.append(f"| {r['shape']} | {r['dtype']} | {r['config']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} "
                         f"|{replays} {r['rel_err_vs_torch']:.1e} | {grad_err:.1e} |")  # fmt: skip
    if launch_rows:
        head = ("| launch A/B (medians over rounds; per call fwd / fwd+bwd ms; ops alone fwd / fwd+bwd ms; host µs "
                "of a no-grad call) | dtype | z | Triton's launch | direct, by argument key | direct, memos, Triton's "
                "C launchers | direct, memos, native launcher (default) |")  # fmt: skip
        lines += ["", head, "|---|---|---|---|---|---|---|"]
        keys = list(dict.fromkeys((r["shape"], r["dtype"], r["z"]) for r in launch_rows))
        fields = ("fwd_ms", "fwd_bwd_ms", "ops_fwd_ms", "ops_fwd_bwd_ms", "host_us")
        for key in keys:
            cells = []
            for mode in ("jit", "keyed", "direct-triton", "direct"):
                got = [r for r in launch_rows if (r["shape"], r["dtype"], r["z"]) == key and r["mode"] == mode]
                med = {f: statistics.median(r[f] for r in got) for f in fields}
                cells.append(f"{med['fwd_ms']:.3f} / {med['fwd_bwd_ms']:.3f}; {med['ops_fwd_ms']:.3f} / "
                             f"{med['ops_fwd_bwd_ms']:.3f}; {med['host_us']:.0f}")  # fmt: skip
            lines.append(f"| {key[0]} | {key[1]} | {'z' if key[2] else '-'} | {' | '.join(cells)} |")
    if graph_rows:
        lines += [
            "",
            (
                "| CUDA graph replay | dtype | z | eager fwd / fwd+bwd ms | graph fwd / fwd+bwd ms | upstream's ops "
                "(§4.1) fwd / fwd+bwd ms | graph × upstream | replay = eager, bit for bit |"
            ),
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in graph_rows:
            up = r.get("upstream_fwd_ms")
            ups = f"{up:.3f} / {r['upstream_fwd_bwd_ms']:.3f}" if up else "-"
            ratio = (f"{up / r['graph_fwd_ms']:.2f} / {r['upstream_fwd_bwd_ms'] / r['graph_fwd_bwd_ms']:.2f}"
                     if up else "-")  # fmt: skip
            lines.append(f"| {r['shape']} | {r['dtype']} | {'z' if r['z'] else '-'} | {r['fwd_ms']:.3f} / "
                         f"{r['fwd_bwd_ms']:.3f} | {r['graph_fwd_ms']:.3f} / {r['graph_fwd_bwd_ms']:.3f} | {ups} | "
                         f"{ratio} | {r['graph_matches_eager']} |")  # fmt: skip
    if profile_rows:
        head = ("| kernels of a call (torch.profiler) | dtype | z | pass | per call ms | kernels ms | largest kernels: "
                "ms per call (launches per call) |")  # fmt: skip
        lines += ["", head, "|---|---|---|---|---|---|---|"]
        for r in profile_rows:
            top = "; ".join(f"{k['name'][:40]} {k['ms']:.3f} (×{k['per_call']:g})" for k in r["kernels"][:5])
            lines.append(f"| {r['shape']} | {r['dtype']} | {'z' if r['z'] else '-'} | {r['pass']} | "
                         f"{r['per_call_ms']:.3f} | {r['kernels_ms']:.3f} | {top} |")  # fmt: skip
    if marks_rows:
        head = ("| launches reached (CUDA events) | dtype | z | first launch ms | call ms | every launch, ms after the "
                "call's start | host: each launch called / returned | host: backward entered / left | host: call "
                "returned |")  # fmt: skip
        lines += ["", head, "|---|---|---|---|---|---|---|---|---|"]
        for r in marks_rows:
            every = " ".join(f"{x:.3f}" for x in r["launch_ms"])
            hl = r.get("host_launch_ms", [])
            called = " ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(hl[0::2], hl[1::2], strict=True))
            bwd = " / ".join(f"{x:.3f}" for x in r.get("host_backward_ms", []))
            back = r.get("host_return_ms")
            lines.append(f"| {r['shape']} | {r['dtype']} | {'z' if r['z'] else '-'} | {r['launch_ms'][0]:.3f} | "
                         f"{r['call_ms']:.3f} | {every} | {called} | {bwd} | "
                         f"{'' if back is None else f'{back:.3f}'} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def dry_run(args) -> int:
    """Exercise every code path of this script on tiny shapes on the CPU (TRITON_INTERPRET=1)."""
    global DEVICE
    DEVICE = "cpu"
    torch.cuda.synchronize = lambda: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.memory_allocated = lambda: 0
    torch.cuda.max_memory_allocated = lambda: 0
    torch.cuda.reset_peak_memory_stats = lambda: None
    tiny = configs.PassConfig(sub=1, num_warps=1)
    info = {"card_name": "cpu", "card": "H100", "torch": torch.__version__, "triton": "-", "command": "dry",
            "copy_TBps": 1.0}  # fmt: skip
    with configs.override(tiny, tiny):
        rows = [bench_shape(("S1", 1, 4, (40,), (RASTER,), "fp32", True), 1e12, "H100", 1, 1),
                bench_shape(("SegMamba 3-order layer 64³", 1, 2, (3, 4, 5), SEGMAMBA, "bf16", True), 1e12, "H100",
                            1, 1)]  # fmt: skip
    sweep_rows = sweep([("SegMamba 3-order layer 64³", 1, 4, (16, 1, 8), SEGMAMBA, "fp32", True)], reps=(1, 1))
    with configs.override(tiny, tiny):
        launch_rows = launch_ab([("S1", 1, 4, (40,), (RASTER,), "fp32", True)], rounds=1, reps=(1, 1))
        profile_rows = kernel_profile([("S1", 1, 4, (40,), (RASTER,), "fp32", True)], calls=1)
    layer_rows = [
        layer_profile(spatial=(2, 2, 4), steps=1, reps=1, d_model=4, linear=name)
        for name in ("default", *LINEAR_VARIANTS)
    ]
    print(markdown(info, rows, [], sweep_rows, layer_rows, launch_rows, profile_rows))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true", help="compare the default settings with each opt-in path")
    ap.add_argument("--only", help="only the rows whose name contains this (e.g. SegMamba), in every table")
    ap.add_argument(
        "--variants", help="--sweep: only the variants whose label contains one of these comma-separated parts"
    )
    ap.add_argument("--layer", action="store_true", help="the mixer pair on both backends (slow: the torch one)")
    ap.add_argument(
        "--layer-profile",
        action="store_true",
        help="the mixer pair's training step on the triton backend, with each kernel's GPU time (torch.profiler)",
    )
    ap.add_argument(
        "--linear",
        help="--layer-profile: also with the layer's linears (in_proj, out_proj; x_proj and dt_proj) as each of these "
        "comma-separated variants "
        f"({', '.join(LINEAR_VARIANTS)}), checked against the default first",
    )
    ap.add_argument("--launch", action="store_true", help="A/B of Triton's own and the direct kernel launches")
    ap.add_argument("--profile", action="store_true", help="GPU time per kernel of a call (torch.profiler)")
    ap.add_argument(
        "--graphs",
        action="store_true",
        help="per call as CUDA-graph replays beside eager (host-bound rows or --only); with --sweep, each variant too",
    )
    ap.add_argument(
        "--marks",
        action="store_true",
        help="when each launch of a forward+backward is reached, ms after the call's start (CUDA events; host-bound "
        "rows or --only)",
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-shapes", action="store_true")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under TRITON_INTERPRET=1")
    args = ap.parse_args()
    unknown = [n for n in filter(None, (args.linear or "").split(",")) if n not in LINEAR_VARIANTS]
    if unknown:
        ap.error(f"--linear: unknown variant(s) {', '.join(unknown)}; known: {', '.join(LINEAR_VARIANTS)}")
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("scan_gpu.py needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    name = torch.cuda.get_device_name()
    card = "H200" if "H200" in name else ("H100" if "H100" in name else name)
    info = {"card_name": name, "card": card, "torch": torch.__version__, "triton": triton.__version__,
            "command": " ".join(["python", *sys.argv])}  # fmt: skip
    bw = copy_bandwidth()
    info["copy_TBps"] = bw / 1e12
    print(json.dumps(info), flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, torch_rows, sweep_rows, layer_rows, launch_rows, profile_rows, graph_rows_ = [], [], [], [], [], [], []
    marks_rows = []

    def save():
        payload = {"info": info, "rows": rows, "torch": torch_rows, "sweep": sweep_rows, "layer": layer_rows,
                   "launch": launch_rows, "profile": profile_rows, "graphs": graph_rows_,
                   "marks": marks_rows}  # fmt: skip
        (out_dir / "scan_gpu.json").write_text(json.dumps(payload, indent=1))
        md = markdown(info, rows, torch_rows, sweep_rows, layer_rows, launch_rows, profile_rows, graph_rows_,
                      marks_rows)  # fmt: skip
        (out_dir / "scan_gpu.md").write_text(md)

    t0 = time.time()
    if args.sweep:
        # with --only, any row of the table or the sweep's own whose name contains it
        table = list({r[0]: r for r in [*shapes(False), *SWEEP_ROWS]}.values()) if args.only else SWEEP_ROWS
        sweep_rows.extend(sweep(rows=table, only=args.only, variants=args.variants, graphs=args.graphs))
        save()
    if not args.no_shapes:
        for row in shapes(args.quick):
            if args.only and args.only not in row[0]:
                continue
            r = bench_shape(row, bw, card, reps_fwd=20, reps_bwd=10)
            rows.append(r)
            print(f"{r['shape']} {r['dtype']} z={r['z']}: fwd {r['fwd_ms']:.3f} ms (x{r.get('speedup_fwd', 0):.2f}), "
                  f"fwd+bwd {r['fwd_bwd_ms']:.3f} ms (x{r.get('speedup_fwd_bwd', 0):.2f}), "
                  f"err {r.get('rel_err_vs_torch', 0):.1e}, {time.time() - t0:.0f}s", flush=True)  # fmt: skip
            save()
        if not args.only:  # the whole table: the torch backend too
            torch_rows.extend(bench_torch_backend(card))
            save()
    if args.layer:
        layer_rows.extend(bench_layer(card))
        save()
    if args.layer_profile:
        names = ("default", *filter(None, (args.linear or "").split(",")))
        layer_rows.extend(layer_profile(linear=name) for name in names)
        save()
    if args.launch:
        picked = [r for r in shapes(False) if r[0] in LAUNCH_ROWS and (r[0] != "S1" or not r[6])]
        picked = [r for r in picked if args.only in r[0]] if args.only else picked
        launch_rows.extend(launch_ab(picked))
        save()
    if args.profile:
        candidates = {r[0]: r for r in [*shapes(False), *SWEEP_ROWS]}.values()
        picked = [r for r in candidates if (args.only in r[0] if args.only else r[0] in PROFILE_ROWS)]
        profile_rows.extend(kernel_profile(picked))
        save()
    if args.graphs:
        candidates = {r[0]: r for r in [*shapes(False), *SWEEP_ROWS]}.values()
        picked = [r for r in candidates if (args.only in r[0] if args.only else r[0] in LAUNCH_ROWS)]
        graph_rows_.extend(graph_rows(picked, card))
        save()
    if args.marks:
        candidates = {r[0]: r for r in [*shapes(False), *SWEEP_ROWS]}.values()
        picked = [r for r in candidates if (args.only in r[0] if args.only else r[0] in LAUNCH_ROWS)]
        marks_rows.extend(launch_marks(picked))
        save()
    print(markdown(info, rows, torch_rows, sweep_rows, layer_rows, launch_rows, profile_rows, graph_rows_, marks_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
