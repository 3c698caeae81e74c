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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``gpu`` skip without a CUDA device (and only those)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
