"""Building blocks shared by the networks (``nn.Module``s used by two or more networks)."""

from __future__ import annotations

from .gsc import GatedSpatialConv
from .mamba import MambaLayer

__all__ = ["GatedSpatialConv", "MambaLayer"]
