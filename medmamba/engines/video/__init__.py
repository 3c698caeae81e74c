"""Video segmentation training and inference (Vivim)."""

from __future__ import annotations
