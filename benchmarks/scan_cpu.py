"""CPU selective scan: medmamba's torch backend vs a float32 per-step loop vs mambapy's pscan.

Run: ``make bench-cpu`` or ``python benchmarks/scan_cpu.py [--quick]``. Every measurement runs in its own
subprocess, so that its peak memory (growth of the peak resident set over the inputs) is its own. Times are the
best of ``--repeats`` after one warm-up. Results replace the "CPU selective scan" section of
benchmarks/RESULTS.md, with the machine they came from.

All three compute the same thing: ``y = selective_scan(u, delta, A, B, C, delta_bias=..., delta_softplus=True)``
(one order, no D, no z), fp32, random inputs with Mamba's Δ initialisation. Each result is also checked against
the float64 reference on the first 2048 steps (the loop's and pscan's too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
BEGIN, END = "<!-- scan_cpu:begin -->", "<!-- scan_cpu:end -->"

SHAPES = [  # (batch, d_inner, N, L)
    (1, 64, 16, 32768),  # the anchor
    (2, 128, 16, 4096),
    (1, 96, 16, 65536),
]
QUICK_SHAPES = [(1, 16, 16, 2048)]


def make_inputs(batch, d, N, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, d, L, generator=g)
    delta = torch.randn(batch, d, L, generator=g) * 0.5
    dt = 1e-3 * 100 ** torch.rand(d, generator=g)  # log-uniform in [1e-3, 0.1], Mamba's Δ initialisation
    delta_bias = dt + torch.log(-torch.expm1(-dt))
    A = -torch.arange(1, N + 1, dtype=torch.float32).repeat(d, 1) * (1 + 0.1 * torch.rand(d, N, generator=g))
    B = torch.randn(batch, N, L, generator=g)
    C = torch.randn(batch, N, L, generator=g)
    return u, delta, A, B, C, delta_bias


def medmamba_torch(u, delta, A, B, C, delta_bias):
    from medmamba.kernels import selective_scan

    return selective_scan(u, delta, A, B, C, delta_bias=delta_bias, backend="torch").out


def loop_fp32(u, delta, A, B, C, delta_bias):
    """The recurrence one step at a time, vectorised over (batch, d, N): what a naive PyTorch port does."""
    dt = torch.nn.functional.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[..., t, None] * A) * h + (dt[..., t] * u[..., t])[..., None] * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1)


def mambapy_pscan(u, delta, A, B, C, delta_bias):
    """mambapy's Blelloch scan (alxndrTL/mamba.py) on the (batch, L, d, N) tensors it needs."""
    from mambapy.pscan import pscan

    dt = torch.nn.functional.softplus(delta + delta_bias[:, None]).transpose(1, 2)  # (B, L, d)
    decay = torch.exp(dt.unsqueeze(-1) * A)  # (B, L, d, N)
    x = dt.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(2) * u.transpose(1, 2).unsqueeze(-1)
    h = pscan(decay, x)
    return (h @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


IMPLS = {"medmamba torch": medmamba_torch, "fp32 loop": loop_fp32, "mambapy pscan": mambapy_pscan}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(impl: str, shape: tuple[int, ...], backward: bool, repeats: int, threads: int) -> dict:
    """Runs in a child process: time and peak-memory growth of one implementation at one shape."""
    if threads:
        torch.set_num_threads(threads)
    fn = IMPLS[impl]
    inputs = make_inputs(*shape)
    args = [x.clone().requires_grad_(backward) for x in inputs]

    def step():
        out = fn(*args)
        if backward:
            out.backward(torch.ones_like(out))
        return out

    base = peak_rss_bytes()
    out = step()  # warm-up, and the peak
    peak = peak_rss_bytes() - base
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    # agreement with the float64 reference on the first steps
    from medmamba.kernels import selective_scan

    n = min(shape[3], 2048)
    head = [x.detach()[..., :n].double() if x.ndim == 3 else x.detach().double() for x in inputs]
    ref = selective_scan(*head[:5], delta_bias=head[5], backend="reference").out
    error = ((out.detach()[..., :n].double() - ref).abs().max() / ref.abs().max()).item()
    return {
        "impl": impl,
        "shape": shape,
        "backward": backward,
        "seconds": min(times),
        "peak_bytes": peak,
        "rel_error": error,
    }


def run_child(impl, shape, backward, repeats, timeout, threads) -> dict | None:
    cmd = [sys.executable, __file__, "--child", json.dumps([impl, shape, backward, repeats, threads])]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except subprocess.TimeoutExpired:
        return {"impl": impl, "shape": shape, "backward": backward, "timeout": timeout}
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({threads or torch.get_num_threads()} threads)"


def table(rows: list[dict]) -> str:
    lines = [
        "| shape (B, d, N, L) | pass | implementation | time (s) | vs mambapy | peak extra MB | rel. error |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        key = (tuple(row["shape"]), row["backward"])
        base = next(
            (r for r in rows if r["impl"] == "mambapy pscan" and (tuple(r["shape"]), r["backward"]) == key), None
        )
        pass_ = "fwd+bwd" if row["backward"] else "fwd"
        if "timeout" in row:
            lines.append(f"| {tuple(row['shape'])} | {pass_} | {row['impl']} | > {row['timeout']} (stopped) | | | |")
            continue
        speedup = f"{base['seconds'] / row['seconds']:.2f}x" if base and "seconds" in base else ""
        lines.append(
            f"| {tuple(row['shape'])} | {pass_} | {row['impl']} | {row['seconds']:.3f} | {speedup} | "
            f"{row['peak_bytes'] / 2**20:.0f} | {row['rel_error']:.1e} |"
        )
    return "\n".join(lines)


def write_section(body: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    section = f"{BEGIN}\n{body}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="one small shape, no RESULTS.md update")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up (best is kept)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds allowed to one measurement")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per measurement (0: torch's default, one per core)"
    )
    parser.add_argument("--anchor-only", action="store_true", help="only the issue's anchor shape (1, 64, 16, 32768)")
    args = parser.parse_args()
    if args.child:
        impl, shape, backward, repeats, threads = json.loads(args.child)
        print(json.dumps(measure(impl, tuple(shape), backward, repeats, threads)))
        return
    rows = []
    shapes = QUICK_SHAPES if args.quick else SHAPES[:1] if args.anchor_only else SHAPES
    for shape in shapes:
        for backward in (False, True):
            for impl in IMPLS:
                if impl == "fp32 loop" and backward and shape[3] > 4096:
                    continue  # autograd through L Python steps: minutes, and not a contender
                row = run_child(impl, shape, backward, args.repeats, args.timeout, args.threads)
                rows.append(row)
                print(json.dumps(row), flush=True)
    body = (
        "## CPU selective scan (`benchmarks/scan_cpu.py`)\n\n"
        f"Machine: {machine(args.threads)}. Command: `python {' '.join(sys.argv)}`. "
        "fp32, one order, delta_bias + softplus, "
        "no D/z; best of 3 after a warm-up; peak extra memory = growth of the process's peak RSS over its inputs "
        "(each measurement in its own process); error = max |y − y_ref| / max |y_ref| over the first 2048 steps "
        "against the float64 reference.\n\n" + table(rows)
    )
    print(body)
    if not args.quick:
        write_section(body)


if __name__ == "__main__":
    main()
