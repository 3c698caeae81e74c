"""Building blocks shared by the networks (``nn.Module``s used by two or more networks)."""

from __future__ import annotations

from .decoders import UNetDecoder, UpsampleConv
from .gsc import GatedSpatialConv
from .mamba import MambaLayer
from .residual import BasicResBlock, residual_stage
from .tokens import ChannelTokenMamba

__all__ = [
    "BasicResBlock",
    "ChannelTokenMamba",
    "GatedSpatialConv",
    "MambaLayer",
    "UNetDecoder",
    "UpsampleConv",
    "residual_stage",
]
