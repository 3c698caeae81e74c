"""Registration training and inference (MambaMorph)."""

from __future__ import annotations
