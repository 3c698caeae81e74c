"""Test-wide set-up.

Triton kernels run on the CPU only through its interpreter, and ``TRITON_INTERPRET`` must be set before triton is
first imported — and ``import monai`` and nnunetv2's trainer import triton. So: import torch (which does not),
then set it when there is no CUDA device, before anything else is imported.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (make test: one worker per core) each worker's torch would start one intra-op thread per core,
# and the workers' threads would contend for the same cores: on the 2-core CI machine the segmentation learning test
# took 231 s beside another worker against 98 s alone. Each worker, and the commands it runs, gets its share.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip without a CUDA device (and only those)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
