"""Test-wide set-up.

Triton kernels run on the CPU only through its interpreter, and ``TRITON_INTERPRET`` must be set before triton is
first imported — and ``import monai`` and nnunetv2's trainer import triton. So: import torch (which does not),
then set it when there is no CUDA device, before anything else is imported.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _patch_language_once_per_launch() -> None:
    """Triton's interpreter patches ``triton.language`` for the interpreter at every kernel launch, and again at every
    call of a jitted function inside the kernel (``InterpretedFunction.__call__`` -> ``_patch_lang``, for the
    language modules in that function's globals): the same module attributes, re-set each time through
    ``inspect.getmembers``. The per-token GPU-path emulation calls helpers tens of thousands of times per test, and
    that re-patching took 36 % of such a test's time (cProfile, triton 3.8). Here it is done once per launch and
    module of functions: the launch restores the language when it ends, as before. Any other Triton (names missing)
    keeps its own behaviour."""
    try:
        from triton.runtime import interpreter

        launch, patch, empty = interpreter.GridExecutor.__call__, interpreter._patch_lang, interpreter._LangPatchScope
    except (ImportError, AttributeError):
        return
    launches: list[set[int]] = []  # per launch in progress: the modules (their globals) whose languages are patched

    def patch_once(fn):
        if launches and id(fn.__globals__) in launches[-1]:
            return empty()
        scope = patch(fn)
        if launches:
            launches[-1].add(id(fn.__globals__))
        return scope

    def launch_patching_once(self, *args, **kwargs):
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch_patching_once


if os.environ.get("TRITON_INTERPRET") == "1":
    _patch_language_once_per_launch()

# Under pytest-xdist (make test: one worker per core) each worker's torch would start one intra-op thread per core,
# and the workers' threads would contend for the same cores: on the 2-core CI machine the segmentation learning test
# took 231 s beside another worker against 98 s alone. Each worker, and the commands it runs, gets its share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


#: The longest test files, seconds on the 2-core CI machine under ``make test`` (2026-11-28: 1,468 s of tests in all,
#: 12:41 on two workers). pytest-xdist's ``--dist loadfile --no-loadscope-reorder`` (the Makefile) hands whole files
#: to the workers in collection order, so these go first, longest first: the workers then end on short files and
#: finish together. A file missing here only runs in its usual place.
LONGEST_FILES = {
    "e2e/test_segmentation_learns.py": 266,
    "kernels/test_triton_lines.py": 164,
    "kernels/test_triton_scan.py": 141,
    "kernels/test_triton_split_orders.py": 136,
    "test_benchmark_scripts.py": 118,
    "kernels/test_triton_gpu_path.py": 106,
    "e2e/test_crash_safety.py": 104,
    "docker/test_container.py": 67,
    "engines/video/test_video.py": 59,
    "engines/registration/test_train.py": 56,
    "engines/segmentation/test_trainer.py": 45,
    "e2e/test_demo.py": 44,
    "networks/test_umamba.py": 27,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest files first (:data:`LONGEST_FILES`); tests marked ``gpu`` skip without a CUDA device (and only
    those)."""
    tests = Path(__file__).parent

    def seconds(item: pytest.Item) -> int:
        return LONGEST_FILES.get(item.path.relative_to(tests).as_posix(), 0) if item.path.is_relative_to(tests) else 0

    items.sort(key=lambda item: -seconds(item))  # stable: the other files, and each file's tests, keep their order
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
