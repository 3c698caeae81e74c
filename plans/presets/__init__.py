"""Plan presets for the papers' set-ups, one JSON file each."""

from __future__ import annotations
