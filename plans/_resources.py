"""How many worker processes a machine affords, from its cores and its available RAM.

nnU-Net defaults to 8 fingerprint and 4-8 preprocessing workers whatever the machine; every worker re-imports
torch (~300 MB, seconds), and RAM × workers is behind most of its "killed"/"6 feet under" reports
(``plans-and-pipeline.md`` §6.1). Here the count follows the cores this process may use and the memory the
kernel says is available, and stays at 1 — in-process, no pool — when the work is too small to pay for a pool.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from medmamba._progress import progress

__all__ = ["available_memory_bytes", "run_jobs", "usable_cores", "worker_count"]

#: what a spawned worker costs before it does anything: the interpreter with numpy, torch and nnunetv2 imported
WORKER_BASE_BYTES = 400 * 2**20
#: keep this share of the available memory free for the parent and the page cache
_RAM_SHARE = 0.7
#: a spawned pool costs seconds to start (re-imports); below this many voxels of work it cannot pay back
POOL_MIN_VOXELS = 50_000_000


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def available_memory_bytes() -> int:
    """``MemAvailable`` from /proc/meminfo (what can be allocated without swapping); else free physical memory."""
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def worker_count(
    jobs: int, bytes_per_job: int, *, total_voxels: int | None = None, requested: int | None = None
) -> int:
    """Worker processes for ``jobs`` independent jobs of ``bytes_per_job`` peak memory each.

    Args:
        jobs: number of jobs (cases).
        bytes_per_job: peak memory of one job inside a worker (besides the worker's own start-up cost).
        total_voxels: the whole job's size; below ``POOL_MIN_VOXELS`` the answer is 1 (no pool).
        requested: an explicit user choice (``--num-workers``); still capped by the job count.

    Returns:
        at least 1; 1 means "run in this process".
    """
    if requested is not None:
        return max(1, min(int(requested), jobs))
    if jobs <= 1 or (total_voxels is not None and total_voxels < POOL_MIN_VOXELS):
        return 1
    by_ram = int(available_memory_bytes() * _RAM_SHARE // (WORKER_BASE_BYTES + bytes_per_job))
    return max(1, min(usable_cores(), jobs, by_ram))


def run_jobs(
    function: Callable[..., Any],
    jobs: Sequence[tuple[Any, ...]],
    workers: int,
    *,
    desc: str,
    on_done: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """``function(*job)`` for every job; results in job order.

    Runs here when ``workers == 1``, else in a spawn pool (as nnU-Net: forking a process that already runs torch or
    OpenMP threads can deadlock the child). ``on_done(index, result)`` is called in this process as each job
    finishes, so finished work can be committed before the rest is done.
    """
    results: list[Any] = [None] * len(jobs)
    if workers == 1:
        for index, job in enumerate(progress(jobs, desc=desc, total=len(jobs))):
            results[index] = function(*job)
            if on_done is not None:
                on_done(index, results[index])
        return results
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(function, *job): index for index, job in enumerate(jobs)}
        for future in progress(as_completed(futures), desc=desc, total=len(futures)):
            index = futures[future]
            results[index] = future.result()
            if on_done is not None:
                on_done(index, results[index])
    return results
