"""The canonical shapes that ``selective_scan`` hands a backend, and the way back for gradients.

Canonical shapes (K orders, C channels, G groups, N states, S the spatial shape)::

    u, delta     (B, K, C, *S)   natural layout per order (a stride-0 expand when shared)
    A            (K, C, N)       real, negative for a decaying state
    B, C         (B, K, G, N, *S)
    D, delta_bias (K, C) or None
    z            (B, C, *S) or None, shared by all orders

Every canonical tensor is a view of the argument as given: an added axis of size one, or, for a constant B or C,
a broadcast over batch and space. A backend whose autograd Function takes the arguments as given (triton) gets
views that autograd did not record and maps its gradients back with :func:`grads_as_given`.
"""

from __future__ import annotations

import functools
import math

import torch

from .errors import ScanInputError

__all__ = ["canonical_views", "grads_as_given", "view_maker"]


def grads_as_given(grads, shapes) -> tuple:
    """Gradients of the canonical views (:func:`canonical_views`) as gradients of the arguments as given.

    ``shapes`` holds the given arguments' shapes (``None`` for an absent one). An added axis is dropped; a constant
    B or C, broadcast to ``(B, K, C, N, *S)``, gets its gradient summed over batch and space.
    """
    out = []
    for g, shape in zip(grads, shapes, strict=True):
        if g is not None and shape is not None and g.shape != shape:
            if g.numel() != math.prod(shape):  # a constant B/C: the broadcast's gradient is the sum
                g = g.sum(dim=(0, *range(4, g.ndim)))
            g = g.reshape(shape)
        out.append(g)
    return tuple(out)


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


#: signature of checked arguments -> how each becomes its canonical view (see canonical_views)
_VIEWS: dict[tuple, tuple] = {}
_MAX_VIEWS = 256


def _signature(args: tuple, K: int) -> tuple | None:
    # everything the checks read: each argument's shape, dtype and device (None for an absent one)
    try:
        return (K, *[None if x is None else (x.shape, x.dtype, x.device) for x in args])
    except AttributeError:  # not a tensor: the checks say which
        return None


def canonical_views(u, delta, A, B, C, D, z, delta_bias, orders) -> tuple:
    """Check the arguments of ``selective_scan`` and return them as canonical views (module docstring); no copies.

    The checks run once per signature (each argument's shape, dtype and device): at the small stages a call's
    host time is what the GPU waits for. They yield each argument's view as a function of it, kept for the next
    calls of that signature.

    Raises:
        ScanInputError: an argument's type, shape, dtype or device does not fit; the message names it.
    """
    args = (u, delta, A, B, C, D, z, delta_bias)
    key = _signature(args, len(orders))
    recipe = _VIEWS.get(key) if key is not None else None
    if recipe is None:
        recipe = _checked_recipe(*args, orders)
        if key is not None:
            if len(_VIEWS) >= _MAX_VIEWS:
                _VIEWS.clear()
            _VIEWS[key] = recipe
    return _views(args, recipe)


def _views(args: tuple, recipe: tuple) -> tuple:
    return tuple([x if how is None else how(x) for x, how in zip(args, recipe, strict=True)])


def view_maker(u, delta, A, B, C, D, z, delta_bias, orders):
    """A function of the eight arguments that returns their canonical views, for arguments of this call's signature.

    It checks this call's arguments as :func:`canonical_views` does; the function it returns skips the checks and
    the signature (``selective_scan``'s memos call it only for arguments of a signature they have seen). ``None``
    where every argument already is its canonical view.
    """
    args = (u, delta, A, B, C, D, z, delta_bias)
    recipe = _checked_recipe(*args, orders)
    if all(how is None for how in recipe):
        return None
    return lambda *given: _views(given, recipe)


# how an argument becomes its canonical view (None: it already is)
def _unsqueeze0(x):
    return x.unsqueeze(0)


def _unsqueeze1(x):
    return x.unsqueeze(1)


def _unsqueeze11(x):
    return x.unsqueeze(1).unsqueeze(1)


def _broadcast(x, shape):  # a constant B or C, (C, N) or (K, C, N), over batch and space
    return x.reshape(1, *shape[1:4], *([1] * (len(shape) - 4))).expand(shape)


def _checked_recipe(u, delta, A, B, C, D, z, delta_bias, orders) -> tuple:
    K = len(orders)
    for name, x in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        if not isinstance(x, torch.Tensor):
            raise ScanInputError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.is_complex():
            raise ScanInputError(f"{name} is complex ({x.dtype}); only real selective scans are supported")
        if not x.is_floating_point():
            raise ScanInputError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.device != u.device:
            raise ScanInputError(f"{name} is on {x.device} but u is on {u.device}; put all inputs on one device")

    per_order = K > 1
    nd = u.ndim - (3 if per_order else 2)
    layout = "(B, K, C, *S)" if per_order else "(B, C, *S)"
    if nd < 1:
        raise ScanInputError(f"u must be {layout} with at least one spatial axis, got shape {_shape(u)}")
    how_u = None if per_order else _unsqueeze1  # u and delta
    batch, orders_axis, channels, *spatial = u.shape if per_order else u.unsqueeze(1).shape
    if per_order and orders_axis != K:
        raise ScanInputError(f"u has {orders_axis} orders on axis 1 but {K} orders were given; expected {layout}")
    if _shape(delta) != _shape(u):
        raise ScanInputError(f"delta must have the shape of u {_shape(u)}, got {_shape(delta)}")

    how_a = None if A.ndim == 3 else _unsqueeze0
    A3 = A if how_a is None else how_a(A)
    if A3.ndim != 3 or A3.shape[:2] != (K, channels):
        expected = f"({K}, {channels}, N)" + (f" or ({channels}, N)" if K == 1 else "")
        raise ScanInputError(f"A must be {expected}, got {_shape(A)}")
    N = A3.shape[2]

    how_b, how_c = (_checked_bc(name, x, batch, K, channels, N, spatial) for name, x in (("B", B), ("C", C)))
    groups_b, groups_c = ((x if how is None else how(x)).shape[2] for x, how in ((B, how_b), (C, how_c)))
    if groups_b != groups_c:
        raise ScanInputError(f"B and C must have the same number of groups, got {groups_b} and {groups_c}")

    def per_channel(name: str, x: torch.Tensor | None):
        if x is None:
            return None
        how = None if x.ndim == 2 else _unsqueeze0
        if (x if how is None else how(x)).shape != (K, channels) or x.device != u.device:
            expected = f"({K}, {channels})" + (f" or ({channels},)" if K == 1 else "")
            raise ScanInputError(f"{name} must be {expected} on {u.device}, got {_shape(x)} on {x.device}")
        return how

    if z is not None and (_shape(z) != (batch, channels, *spatial) or z.device != u.device):
        raise ScanInputError(f"z must be {(batch, channels, *spatial)} on {u.device}, got {_shape(z)} on {z.device}")
    return how_u, how_u, how_a, how_b, how_c, per_channel("D", D), None, per_channel("delta_bias", delta_bias)


def _checked_bc(name, x, batch, K, channels, N, spatial):
    nd = len(spatial)
    if x.ndim == (2 if K == 1 else 3):  # constant per channel: one group per channel, broadcast over S
        if (x.shape if x.ndim == 3 else (1, *x.shape)) != (K, channels, N):
            raise ScanInputError(f"constant {name} must be {(K, channels, N)[3 - x.ndim :]}, got {_shape(x)}")
        return functools.partial(_broadcast, shape=(batch, K, channels, N, *spatial))
    extra = x.ndim - nd
    if K == 1 and extra in (2, 3):
        how = _unsqueeze11 if extra == 2 else _unsqueeze1
    elif extra == 4:
        how = None
    else:
        how = False
    x5 = None if how is False else (x if how is None else how(x))
    ok = (
        x5 is not None
        and x5.shape[0] == batch
        and x5.shape[1] == K
        and x5.shape[3] == N
        and tuple(x5.shape[4:]) == tuple(spatial)
        and channels % x5.shape[2] == 0
    )
    if not ok:
        S = ", ".join(map(str, spatial))
        forms = f"({batch}, {N}, {S}) or ({batch}, G, {N}, {S})" if K == 1 else f"({batch}, {K}, G, {N}, {S})"
        raise ScanInputError(f"{name} must be {forms} with G dividing C={channels}, or constant; got {_shape(x)}")
    return how
