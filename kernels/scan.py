"""``selective_scan``: the one entry point through which every network runs its selective scan.

It validates the arguments once, brings them to one canonical set of shapes (``canonical.py``), picks a backend
and returns a :class:`ScanResult`. Backends trust what it hands them. A call whose signature it has seen goes
straight to what the backend remembered for it (``_NO_GRAD``, and ``_GRAD`` for calls that record gradients: the
small stages are host-bound, and at the large ones this is time before the first kernel starts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, NamedTuple

import torch
from torch._subclasses.fake_tensor import FakeTensor

from .canonical import canonical_views
from .dispatch import OWN_AUTOGRAD, BackendName, choice_key, grad_hook, no_grad_hook, resolve_backend
from .errors import ScanInputError
from .orders import RASTER, ScanOrder

__all__ = ["ScanResult", "selective_scan"]


class ScanResult(NamedTuple):
    """What ``selective_scan`` returns.

    Attributes:
        out: ``merge="sum"``: ``(B, C, *S)``; ``merge="stack"``: ``(B, K, C, *S)``; dtype of ``u``.
        last_state: the state after each order's last step, fp32 (float64 for float64 inputs):
            ``(B, C, N)`` for one order, ``(B, K, C, N)`` for several; ``None`` unless asked for.
    """

    out: torch.Tensor
    last_state: torch.Tensor | None


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    *,
    orders: Sequence[ScanOrder] = (RASTER,),
    delta_softplus: bool = True,
    merge: Literal["sum", "stack"] = "sum",
    return_last_state: bool = False,
    backend: BackendName | None = None,
) -> ScanResult:
    r"""Mamba-1 selective scan over a feature map, along one or several scan orders (Gu & Dao, arXiv:2312.00752).

    For each order k, along that order's sequence t (state fp32, or float64 for float64 inputs)::

        Δ_t = softplus(delta_t + delta_bias)        (softplus only when delta_softplus)
        h_t = exp(Δ_t·A)·h_{t-1} + Δ_t·B_t·u_t,      y_t = C_t·h_t + D·u_t
        out = Σ_k y_k·silu(z)   (merge="sum")        out_k = y_k·silu(z)   (merge="stack")

    With one order and the 1D layout the arguments mean exactly what they mean in mamba_ssm's
    ``selective_scan_fn`` (only the default of ``delta_softplus`` differs: every Mamba block uses it).

    Args:
        u: the input map. One order: ``(B, C, *S)`` with ``S`` = ``(L,)``, ``(H, W)``, ``(D, H, W)`` or
            ``(T, H, W)`` for video. Several orders: ``(B, K, C, *S)``, each order's own input in the natural
            layout (``u.unsqueeze(1).expand(-1, K, ...)`` shares one).
        delta: Δ before bias and softplus, same shape as ``u``.
        A: ``(C, N)`` for one order, ``(K, C, N)`` per order; real.
        B: input-dependent ``(B, N, *S)`` or ``(B, G, N, *S)`` (one order), ``(B, K, G, N, *S)`` (several);
            or constant ``(C, N)`` / ``(K, C, N)``. Channel c uses group ``c // (C / G)``.
        C: like ``B``.
        D: skip weights ``(C,)`` / ``(K, C)``.
        z: gate ``(B, C, *S)``, shared by all orders.
        delta_bias: ``(C,)`` / ``(K, C)``, added to ``delta`` before the softplus.
        orders: the K scan orders (``medmamba.kernels.orders``).
        delta_softplus: apply softplus to ``delta + delta_bias``.
        merge: ``"sum"`` returns Σ over orders in the input's layout; ``"stack"`` keeps the K outputs.
        return_last_state: also return the state after each order's last step.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"``; ``None`` follows ``use_backend`` and
            ``MEDMAMBA_SCAN_BACKEND``, else ``"auto"``.

    Returns:
        :class:`ScanResult` ``(out, last_state)``.

    Raises:
        ScanInputError: an argument's shape, dtype or device does not fit; the message names it.
        BackendUnavailableError: the requested backend cannot run on these tensors.
    """
    orders = tuple(orders)
    K = len(orders)
    given = (u, delta, A, B, C, D, z, delta_bias)
    grad = torch.is_grad_enabled()
    fast_key = _call_key(given, orders, delta_softplus, merge, backend, grad)
    memo = _GRAD if grad else _NO_GRAD
    known = fast_key is not None and fast_key in memo
    if known:  # a signature seen before: its forward without the checks and views (host time)
        fast = memo[fast_key]
        got = fast(*given) if fast is not None else None
        if got is not None:
            return _result(*got, K, return_last_state)
    if K == 0 or not all(isinstance(o, ScanOrder) for o in orders):
        raise ScanInputError(f"orders must be a non-empty sequence of ScanOrder, got {orders!r}")
    if merge not in ("sum", "stack"):
        raise ScanInputError(f"merge must be 'sum' or 'stack', got {merge!r}")
    if grad:  # unrecorded views first: autograd would walk a node per view in every backward (host time)
        with torch.no_grad():
            canonical = canonical_views(*given, orders)
        grad = any(x is not None and x.requires_grad for x in given)
    else:
        canonical = canonical_views(*given, orders)
    for order in orders:
        order.resolve(canonical[0].ndim - 3)
    name, run = resolve_backend(backend, u.device)
    if grad and name in OWN_AUTOGRAD:  # its Function maps the gradients back (canonical.grads_as_given)
        out, last = run(*canonical, orders=orders, delta_softplus=delta_softplus, merge=merge,
                        return_last_state=return_last_state, given=given)  # fmt: skip
        if fast_key is not None and (not known or fast is not None):
            _remember(memo, fast_key, grad_hook(name), canonical, orders, delta_softplus, merge, given=given)
    else:
        if grad:  # recorded views: these backends differentiate through them
            canonical = canonical_views(*given, orders)
        out, last = run(*canonical, orders=orders, delta_softplus=delta_softplus, merge=merge,
                        return_last_state=return_last_state)  # fmt: skip
        # nothing to record (gradients off, or no argument requires them): the memo of either kind holds the
        # backend's plain forward
        if fast_key is not None and not grad and (not known or fast is not None):  # new, or its settings changed
            _remember(memo, fast_key, no_grad_hook(name), canonical, orders, delta_softplus, merge)
    return _result(out, last, K, return_last_state)


#: no-grad calls: signature -> the backend's forward of the arguments as given (``no_grad_forward``), or None where
#: the backend declined (those take the full path, and are not asked again)
_NO_GRAD: dict[tuple, Callable | None] = {}
#: calls that record gradients (with each argument's requires_grad in the signature): the backend's
#: ``grad_forward``, or None
_GRAD: dict[tuple, Callable | None] = {}
_MAX_REMEMBERED = 256


def _remember(memo: dict, key: tuple, hook, canonical, orders, delta_softplus, merge, **extra) -> None:
    if len(memo) >= _MAX_REMEMBERED:
        memo.clear()
    memo[key] = hook(canonical, orders=orders, delta_softplus=delta_softplus, merge=merge, **extra) if hook else None


def _call_key(given: tuple, orders: tuple, delta_softplus, merge, backend, grad: bool) -> tuple | None:
    # what a call's checks, views, backend and launch settings follow from: each tensor's shape, strides, dtype,
    # device and 16-byte alignment (and, with gradients on, whether it requires them), the flags and the backend's
    # choice. Fake tensors (shape tracing, memory estimates) have no memory: they take the full path, remembered nowhere
    try:
        if isinstance(given[0], FakeTensor):
            return None
        tensors = tuple(
            [None if x is None else (x.shape, x.stride(), x.dtype, x.device, x.data_ptr() % 16,
                                     grad and x.requires_grad) for x in given]
        )  # fmt: skip
        return (tensors, orders, delta_softplus, merge, choice_key(backend, given[0].device))
    except (AttributeError, TypeError, RuntimeError):  # not tensors (or no storage), unhashable flags: the full path
        return None


def _result(out: torch.Tensor, last: torch.Tensor | None, K: int, return_last_state: bool) -> ScanResult:
    if not return_last_state:  # no view of an unused output (with gradients on, autograd would record it)
        return ScanResult(out, None)
    return ScanResult(out, last[:, 0] if last is not None and K == 1 else last)
