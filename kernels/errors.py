"""Errors of the selective-scan package (it imports nothing else of medmamba)."""

from __future__ import annotations

__all__ = ["BackendUnavailableError", "ScanInputError"]


class ScanInputError(ValueError):
    """An argument of ``selective_scan`` has the wrong shape, dtype or device; the message names it."""


class BackendUnavailableError(RuntimeError):
    """The requested scan backend cannot run here; the message says why and what to use instead."""
