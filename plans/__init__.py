"""medmamba.plans: self-configuring plans on top of nnunetv2 (fingerprint, planner, preprocessing, presets)."""

from __future__ import annotations
