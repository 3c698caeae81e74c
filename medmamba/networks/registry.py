"""The network registry: every network by name, with its task and the spatial dims it supports."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

__all__ = ["NetworkSpec", "build_network", "list_networks", "register_network", "spec"]

Task = Literal["segmentation", "registration", "video"]
N = TypeVar("N", bound=type[nn.Module])


@dataclass(frozen=True)
class NetworkSpec:
    """What the registry knows about a network.

    Attributes:
        name: registry name (lower_snake, e.g. ``"umamba_bot"``).
        cls: the canonical (MONAI-style) class.
        task: which engine trains it.
        spatial_dims: the ``spatial_dims`` values it accepts.
    """

    name: str
    cls: type[nn.Module]
    task: Task
    spatial_dims: tuple[int, ...]


_REGISTRY: dict[str, NetworkSpec] = {}


def register_network(name: str, *, task: Task, spatial_dims: tuple[int, ...]) -> Callable[[N], N]:
    """Class decorator: record the class under ``name``; a duplicate name is an error."""

    def decorate(cls: N) -> N:
        if name in _REGISTRY:
            raise ValueError(f"network {name!r} is already registered by {_REGISTRY[name].cls.__qualname__}")
        _REGISTRY[name] = NetworkSpec(name, cls, task, tuple(spatial_dims))
        return cls

    return decorate


def spec(name: str) -> NetworkSpec:
    """The spec of ``name``; an unknown name raises ``ValueError`` with a did-you-mean."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown network {name!r}; {hint}known: {', '.join(sorted(_REGISTRY))}") from None


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Build the network registered as ``name`` with the constructor's keyword arguments."""
    return spec(name).cls(**kwargs)


def list_networks(task: Task | None = None, pattern: str = "*") -> list[str]:
    """Registered names, sorted, optionally filtered by task and an fnmatch pattern."""
    return sorted(n for n, s in _REGISTRY.items() if (task is None or s.task == task) and fnmatch.fnmatch(n, pattern))
