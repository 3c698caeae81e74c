"""Segmentation training and inference on top of nnunetv2."""

from __future__ import annotations
