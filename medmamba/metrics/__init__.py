"""Metrics: arrays in, numbers out (segmentation and registration), and their tables."""

from __future__ import annotations
