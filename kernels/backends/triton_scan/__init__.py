"""Triton backend of the selective scan: all scan orders of a call in one launch, in the natural layout.

Exposes ``scan(...)`` with the common backend signature (kernels/scan.py) and ``unavailable_reason(device)``.
The algorithm, the numbers and how to reproduce them: ``kernels/README.md``; the long form: ``kernels/DESIGN.md``.
Modules: ``forward.py`` and ``backward.py`` (kernels and launchers), ``autograd.py`` (the Function), ``layout.py``
(stride tables, blocking, segments), ``configs.py`` (launch settings), ``common.py`` (scan operators, addressing and
tile loads shared by the kernels), ``ptx.py`` (inline PTX of the GPU path: 16-byte loads and stores, warp
shuffles), ``tokens.py`` (the per-token paths on the GPU), ``lines.py`` and ``lines_backward.py`` (strided orders
as line vectors), ``conv.py`` and ``norm.py`` (the layer's causal conv and LayerNorm), ``launch.py`` (direct
launches).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from medmamba.kernels.orders import ScanOrder

__all__ = ["causal_conv", "channel_layer_norm", "grad_forward", "no_grad_forward", "scan", "unavailable_reason"]

_modules: tuple = ()


def _import_modules() -> tuple:
    # imported on the first call (not with the package: triton may be missing), then kept: an import statement in
    # the call costs host time on every scan
    global _modules
    from . import forward, layout
    from .autograd import TritonScan

    _modules = (forward, layout, TritonScan)
    return _modules


def unavailable_reason(device: torch.device) -> str | None:
    """``None`` when the Triton scan can run on ``device``, else why not and what to do instead."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton); use backend='torch'"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"triton needs a CUDA tensor, got {device.type}; use backend='torch', or TRITON_INTERPRET=1 in tests"


def scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    *,
    orders: Sequence[ScanOrder],
    delta_softplus: bool,
    merge: str,
    return_last_state: bool,
    given: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Selective scan over canonical shapes (kernels/canonical.py) with the Triton kernels.

    State and sums in fp32, output in the dtype of ``u``. float64 inputs run on the torch backend: the kernels
    compute in fp32 and would silently lose the precision asked for.

    ``given``: the arguments of ``selective_scan`` as given, when gradients are on. The canonical tensors are then
    views that autograd did not record, and the autograd Function connects the outputs to ``given`` instead.
    """
    if u.dtype == torch.float64:
        from medmamba.kernels.backends import torch_scan
        from medmamba.kernels.canonical import canonical_views

        if given is not None:  # torch's ops differentiate through the views: record them
            u, delta, A, B, C, D, z, delta_bias = canonical_views(*given, orders)
        return torch_scan.scan(
            u, delta, A, B, C, D, z, delta_bias,
            orders=orders, delta_softplus=delta_softplus, merge=merge, return_last_state=return_last_state,
        )  # fmt: skip
    _forward, layout, TritonScan = _modules or _import_modules()
    u, delta, B, C, z = layout.natural_inputs(u, delta, B, C, z)
    orders = tuple(orders)
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if given is None and torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in tensors):
        given = tensors  # called with recorded views (or directly): they are the Function's inputs
    if given is not None:
        out, last = TritonScan.apply(tensors, *given, orders, delta_softplus, merge, None)
    else:
        res = _forward.forward(*tensors, orders=orders, delta_softplus=delta_softplus, merge=merge, save=False)
        out, last = res.out, res.last_state
    return out, (last if return_last_state else None)


def _remembered_settings(canonical: tuple, orders: tuple, delta_softplus: bool, merge: str, save: bool):
    """``(launch, current)`` for a memo of ``selective_scan``: the forward's launch settings, and a check of them.

    The settings are this call's signature's; ``current()`` tells that they still hold (no ``configs.override``
    since, the settings memo not cleared).

    ``None`` where such a call needs more than its settings: float64 inputs, a copy of an input with a strided
    spatial block.
    """
    forward, layout, _ = _modules or _import_modules()
    from . import configs

    u, delta, A, B, C, D, z, delta_bias = canonical
    if u.dtype == torch.float64:
        return None
    natural = layout.natural_inputs(u, delta, B, C, z)
    if any(a is not b for a, b in zip(natural, (u, delta, B, C, z), strict=True)):
        return None
    key, launch, cfg = forward.settings(u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, merge, save)
    memo = forward._LAUNCHES
    return launch, lambda: configs.forward_config() is cfg and memo.get(key) is launch


def no_grad_forward(canonical: tuple, *, orders: Sequence[ScanOrder], delta_softplus: bool, merge: str):
    """For ``selective_scan``'s no-grad memo: a forward of the eight arguments as given, for this call's signature.

    ``None`` where such a call needs more: float64 inputs, a copy of an input with a strided spatial block, groups
    of orders. The function returns ``(out, last_state)`` as :func:`scan` does before ``selective_scan``'s own steps, or
    ``None`` when the settings have changed since (``configs.override``, a cleared memo): then the caller takes
    the full path.
    """
    forward, _, _ = _modules or _import_modules()
    remembered = _remembered_settings(canonical, tuple(orders), delta_softplus, merge, False)
    if remembered is None or type(remembered[0]) is not forward._Launch:
        return None
    launch, current = remembered

    def run(u, delta, A, B, C, D, z, delta_bias):
        if not current():
            return None
        res = forward.run(launch, u, delta, A, B, C, D, z, delta_bias, False)
        return res.out, res.last_state

    return run


def grad_forward(canonical: tuple, *, orders: Sequence[ScanOrder], delta_softplus: bool, merge: str, given: tuple):
    """For ``selective_scan``'s memo of calls that record gradients: the call through the autograd Function.

    It runs for this call's signature, on the arguments as given, with the forward's launch settings derived once
    and the canonical views made without the checks (``canonical.view_maker`` of ``given``, this call's arguments).

    ``None`` where such a call needs more (float64 inputs, a copy of an input with a strided spatial block). The
    function returns ``(out, last_state)``, or ``None`` when the settings have changed since (``configs.override``,
    a cleared memo): then the caller takes the full path.
    """
    from medmamba.kernels.canonical import view_maker

    _, _, TritonScan = _modules or _import_modules()
    orders = tuple(orders)
    remembered = _remembered_settings(canonical, orders, delta_softplus, merge, True)
    if remembered is None:
        return None
    launch, current = remembered
    views = view_maker(*given, orders)

    def run(*args):
        if not current():
            return None
        if views is None:  # every argument is its canonical view (several orders)
            tensors = args
        else:
            with torch.no_grad():  # unrecorded views, as selective_scan's full path hands them
                tensors = views(*args)
        return TritonScan.apply(tensors, *args, orders, delta_softplus, merge, launch)

    return run


def causal_conv(x, weight, bias, *, orders, silu):  # noqa: D103 (documented in conv.py)
    from .conv import causal_conv as run

    return run(x, weight, bias, orders=orders, silu=silu)


def channel_layer_norm(x, weight, bias, eps, out_dtype=None):  # noqa: D103 (documented in norm.py)
    from .norm import channel_layer_norm as run

    return run(x, weight, bias, eps, out_dtype)
