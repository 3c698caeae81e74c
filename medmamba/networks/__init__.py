"""Networks: U-Mamba, SegMamba, Vivim, MambaMorph, and the registry that builds them by name.

``build(name, **kwargs)`` builds a registered network, ``list(task=None, pattern="*")`` lists the names and
``spec(name)`` tells its task and spatial dims. The registry is filled by the explicit imports below.
"""

from __future__ import annotations

from . import mambamorph, segmamba, umamba, vivim  # noqa: F401 - importing them fills the registry
from .registry import NetworkSpec, build_network, list_networks, register_network, spec

build = build_network
list = list_networks

__all__ = ["NetworkSpec", "build", "build_network", "list_networks", "register_network", "spec"]
