"""Networks: U-Mamba, SegMamba, Vivim, MambaMorph, and the registry that builds them by name."""

from __future__ import annotations
