"""Building blocks shared by the networks (``nn.Module``s used by two or more networks)."""

from __future__ import annotations

from .mamba import MambaLayer

__all__ = ["MambaLayer"]
