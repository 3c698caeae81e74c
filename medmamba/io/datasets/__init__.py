"""Dataset formats: nnU-Net raw, registration pairs, video; converters and the shipped demo datasets."""

from __future__ import annotations
