"""Options shared by subcommands: one parent parser."""

from __future__ import annotations

import argparse

__all__ = ["common_parser", "scan_backend_context"]


def common_parser() -> argparse.ArgumentParser:
    """Parent parser with --device, --num-workers, -v/-q, --no-progress and --scan-backend."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--device", default="auto", help="where to run: auto (CUDA when present), cpu, cuda or cuda:N")
    parent.add_argument("--num-workers", type=int, default=None, help="worker processes (default: from cores and RAM)")
    parent.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeatable)")
    parent.add_argument("-q", "--quiet", action="count", default=0, help="less log output (repeatable)")
    parent.add_argument("--no-progress", action="store_true", help="no progress bars (also off without a TTY or in CI)")
    parent.add_argument(
        "--scan-backend",
        choices=("auto", "reference", "torch", "triton"),
        default=None,
        help="selective-scan backend for every Mamba layer (default: $MEDMAMBA_SCAN_BACKEND, else auto: "
        "triton on CUDA, torch otherwise)",
    )
    return parent


def scan_backend_context(args: argparse.Namespace):
    """A context manager that runs the command's scans on ``--scan-backend`` (a no-op when not given)."""
    from contextlib import nullcontext

    from medmamba.kernels import use_backend

    name = getattr(args, "scan_backend", None)
    return use_backend(name) if name else nullcontext()
