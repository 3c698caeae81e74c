"""medmamba: Mamba networks for medical image segmentation and registration."""

from __future__ import annotations

__version__ = "0.1.0"
