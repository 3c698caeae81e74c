"""Engines: everything that loops over epochs or cases with a model (train, predict, register, evaluate)."""

from __future__ import annotations
