"""Which backend runs a scan: the table of backends, the "auto" policy and the overrides.

Precedence: an explicit ``backend=`` argument, then the innermost ``with use_backend(name):``, then the
environment variable ``MEDMAMBA_SCAN_BACKEND``, then ``"auto"`` (triton for CUDA tensors when it is
importable, torch otherwise).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Literal

import torch

from .errors import BackendUnavailableError

__all__ = [
    "BACKENDS", "OWN_AUTOGRAD", "BackendName", "available_backends", "resolve_backend", "triton_launcher",
    "use_backend",
]  # fmt: skip

BackendName = Literal["auto", "reference", "torch", "triton"]

#: backend name -> module under medmamba.kernels.backends exposing ``scan`` (and optionally ``unavailable_reason``)
BACKENDS: dict[str, str] = {
    "reference": "reference",
    "torch": "torch_scan",
    "triton": "triton_scan",
}

#: backends whose ``scan`` is one autograd Function: with gradients on, ``selective_scan`` hands them views that
#: autograd did not record plus the arguments as given (``given=``), and they map their gradients back
#: (``canonical.grads_as_given``); the others get recorded views and differentiate through them
OWN_AUTOGRAD = frozenset({"triton"})

_override_stack: list[str] = []


@contextmanager
def use_backend(name: BackendName) -> Iterator[None]:
    """Run every ``selective_scan`` inside the block on ``name`` unless a call passes ``backend=``."""
    _check_name(name)
    _override_stack.append(name)
    try:
        yield
    finally:
        _override_stack.pop()


def _check_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise BackendUnavailableError(f"unknown scan backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")


def _load(name: str) -> ModuleType:
    try:
        return importlib.import_module(f"{__package__}.backends.{BACKENDS[name]}")
    except ImportError as err:
        raise BackendUnavailableError(f"scan backend {name!r} cannot be imported ({err}); use backend='torch'") from err


def _unavailable_reason(name: str, device: torch.device) -> str | None:
    try:
        module = _load(name)
    except BackendUnavailableError as err:
        return str(err)
    reason: Callable[[torch.device], str | None] | None = getattr(module, "unavailable_reason", None)
    return reason(device) if reason is not None else None


_RESOLVED: dict[tuple, tuple[str, Callable[..., object]]] = {}


def choice_key(requested: str | None, device: torch.device) -> tuple:
    """Everything :func:`resolve_backend`'s answer depends on (the request, the override, the environment)."""
    name = requested or (_override_stack[-1] if _override_stack else os.environ.get("MEDMAMBA_SCAN_BACKEND", "auto"))
    return (name, device.type, os.environ.get("TRITON_INTERPRET") if device.type == "cpu" else None)


def resolve_backend(requested: str | None, device: torch.device) -> tuple[str, Callable[..., object]]:
    """The backend name that will run on ``device`` and its ``scan`` function."""
    # remembered per answer's inputs: the import checks cost host time on every scan call
    key = choice_key(requested, device)
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _RESOLVED[key] = _resolve(key[0], device)
    return resolved


def no_grad_hook(name: str) -> Callable[..., object] | None:
    """The backend's ``no_grad_forward`` (see triton_scan), if it has one: ``selective_scan``'s no-grad memo."""
    return getattr(_load(name), "no_grad_forward", None)


def grad_hook(name: str) -> Callable[..., object] | None:
    """The backend's ``grad_forward`` (see triton_scan), if it has one: ``selective_scan``'s memo of grad calls."""
    return getattr(_load(name), "grad_forward", None)


def _resolve(name: str, device: torch.device) -> tuple[str, Callable[..., object]]:
    _check_name(name)
    if name == "auto":
        name = "triton" if device.type == "cuda" and _unavailable_reason("triton", device) is None else "torch"
    else:
        reason = _unavailable_reason(name, device)
        if reason is not None:
            raise BackendUnavailableError(reason)
    return name, _load(name).scan


def triton_launcher() -> str | None:
    """Why the triton backend keeps Triton's C launcher, or ``None`` when it launches through medmamba's native one.

    For ``medmamba info``; builds the native launcher if it was not built yet.
    """
    from .backends.triton_scan import native

    return native.status()


def available_backends(device: torch.device | str = "cpu") -> dict[str, str | None]:
    """For each backend, ``None`` if it can run on ``device``, else the reason it cannot (for ``medmamba info``)."""
    dev = torch.device(device)
    return {name: _unavailable_reason(name, dev) for name in BACKENDS}
