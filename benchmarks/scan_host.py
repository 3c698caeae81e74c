"""Host time of the Triton scan's Python per call, on any machine, with the kernels stubbed out.

    python benchmarks/scan_host.py [--rows "SegMamba s3 16³,U-Mamba s3 16³"] [--modes keyed,direct] [--profile]
                                   [--first-launch]

At the 16³ and 32³ stages the GPU waits for the host (``benchmarks/RESULTS.md``): what a call costs there is the
Python around the kernels. This script runs that Python on CPU tensors, with every launcher of the scan backend
(``launch.Launcher``) taking a stand-in for Triton: a "compiled kernel" per argument key whose C launcher does
nothing. No GPU, no compiler, no kernel runs; the direct-launch path, the memos, the launch settings, the
allocations and autograd run as on the GPU.

For each row of ``scan_gpu.py`` (the host-bound ones by default) and each launch mode (``launch.use_mode``) it
prints the microseconds per call, median of ``--repeats`` runs of ``--calls`` calls: the no-grad forward through
``selective_scan``, forward+backward through autograd, and the backend's forward and backward entry points alone
(``scan_gpu.op_calls``). Modes alternate, as the machine's speed drifts. Caveats: CPU tensors are allocated by
the CPU allocator, not CUDA's caching one, and the stand-in's C launcher costs nothing (Triton's is 7-16 µs on
the lent hosts, whose Python also runs 4-5× slower than the CI machine's). ``--profile`` adds the functions
with the most own time (cProfile) for the last mode; ``--first-launch`` the Python before each call's first launch
(the GPU idles that long at the short stages) and when each later launch is reached.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _scan_gpu():
    spec = importlib.util.spec_from_file_location("scan_gpu", ROOT / "benchmarks" / "scan_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DEVICE = "cpu"
    return module


_LAUNCHED: list[float] | None = None  # when a list: each stub launch's perf_counter (--first-launch)


class _Compiled:
    """What a compiled Triton kernel offers the direct launch; its C launcher does nothing."""

    function = packed_metadata = "stub"

    def run(self, *call):
        if _LAUNCHED is not None:
            _LAUNCHED.append(time.perf_counter())

    def launch_metadata(self, *args):
        return None


class _Triton:
    """Stands in for a ``triton.JITFunction``: one stub kernel per argument key, as Triton specialises."""

    def __init__(self, name: str, key) -> None:
        self.__name__, self._key, self._kernels = name, key, {}

    def __getitem__(self, grid):
        return lambda *args, **meta: self._kernels.setdefault(self._key(args) + tuple(meta.items()), _Compiled())


class _Knobs:
    class runtime:  # noqa: N801 (mirrors triton.knobs.runtime)
        launch_enter_hook = None
        launch_exit_hook = None


def stub_kernels() -> None:
    """Every launcher of the scan backend launches stub kernels, on CPU tensors, from now on."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("scan_host.py stubs the kernels: run it without TRITON_INTERPRET=1")
    from medmamba.kernels.backends import triton_scan
    from medmamba.kernels.backends.triton_scan import launch

    triton_scan.unavailable_reason = lambda device: None  # CPU tensors take the Triton backend
    launch._load_all()
    for launcher in launch._LAUNCHERS:
        launcher.fn = _Triton(launcher.fn.__name__, launch.argument_key)
        launcher._runtime = (lambda: 0, lambda device: 0, _Knobs)
        launcher.mode = "direct"


def row_calls(scan_gpu, row) -> dict:
    """The four timed calls of a ``scan_gpu.py`` row, on CPU tensors."""
    _, batch, d, spatial, orders, dtname, z = row
    dtype = scan_gpu.DTYPES[dtname]
    args = scan_gpu.make_inputs(batch, d, spatial, orders, dtype, z)
    grad_out = torch.randn((batch, d, *spatial), dtype=dtype)

    fwd_bwd, _ = scan_gpu.training_step(args, orders, grad_out)  # as scan_gpu.py times it

    ops_fwd, ops_fwd_bwd = scan_gpu.op_calls(args, orders, grad_out)
    return {
        "fwd": lambda: scan_gpu.scan_call(args, orders, "triton"),
        "fwd+bwd": fwd_bwd,
        "ops fwd": ops_fwd,
        "ops fwd+bwd": ops_fwd_bwd,
    }


def per_call_us(fn, calls: int, repeats: int) -> float:
    for _ in range(max(2, calls // 10)):
        fn()
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(runs)


def first_launch_us(fn, calls: int) -> tuple[float, list[float]]:
    """``(µs from a call's start to its first launch, each launch's µs after the first)``, medians over ``calls``.

    At the short stages the GPU idles until the first launch of a call and whenever the host falls behind.
    """
    global _LAUNCHED
    for _ in range(max(2, calls // 10)):
        fn()
    firsts, offsets = [], []
    try:
        for _ in range(calls):
            _LAUNCHED = []
            start = time.perf_counter()
            fn()
            firsts.append((_LAUNCHED[0] - start) * 1e6)
            offsets.append([(t - _LAUNCHED[0]) * 1e6 for t in _LAUNCHED])
    finally:
        _LAUNCHED = None
    return statistics.median(firsts), [statistics.median(col) for col in zip(*offsets, strict=True)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", help="comma-separated scan_gpu.py row names; default: its host-bound rows")
    ap.add_argument("--modes", default="keyed,direct", help="launch modes to compare (launch.use_mode)")
    ap.add_argument("--calls", type=int, default=100, help="calls per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per call and mode (the median is reported)")
    ap.add_argument("--profile", action="store_true", help="cProfile's top functions for the last mode")
    ap.add_argument("--first-launch", action="store_true",
                    help="also the µs from each call's start to its first launch, and every launch's µs after it "
                         "(last mode)")  # fmt: skip
    args = ap.parse_args(argv)

    scan_gpu = _scan_gpu()
    stub_kernels()
    from medmamba.kernels.backends.triton_scan import launch

    names = args.rows.split(",") if args.rows else [n for n in scan_gpu.LAUNCH_ROWS if n != "S1"]
    rows = {r[0]: r for r in scan_gpu.shapes(False)}
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; scan_gpu.py has {sorted(rows)}")
    modes = args.modes.split(",")
    print(f"| row | dtype | z | call | {' | '.join(f'{m} µs' for m in modes)} |")
    print("|---|---|---|---|" + "---|" * len(modes))
    for name in names:
        row = rows[name]
        calls = row_calls(scan_gpu, row)
        for label, fn in calls.items():
            times = []
            for mode in modes:
                with launch.use_mode(mode):
                    times.append(per_call_us(fn, args.calls, args.repeats))
            cells = " | ".join(f"{t:.0f}" for t in times)
            print(f"| {name} | {row[5]} | {'z' if row[6] else '-'} | {label} | {cells} |", flush=True)
        if args.first_launch:
            with launch.use_mode(modes[-1]):
                for label, fn in calls.items():
                    first, offsets = first_launch_us(fn, args.calls)
                    print(f"| {name} | {label}: first launch after {first:.0f} µs ({modes[-1]}); launches at "
                          f"{', '.join(f'{t:.0f}' for t in offsets)} µs after it |", flush=True)  # fmt: skip
        if args.profile:
            with launch.use_mode(modes[-1]):
                for label in ("fwd", "fwd+bwd"):
                    profiler = cProfile.Profile()
                    profiler.runcall(lambda fn=calls[label]: [fn() for _ in range(args.calls)])
                    print(f"\n{name}, {label}, {args.calls} calls ({modes[-1]}):")
                    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(12)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
