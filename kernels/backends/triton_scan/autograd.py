"""The autograd Function of the Triton selective scan."""

from __future__ import annotations

import torch

from medmamba.kernels.canonical import grads_as_given

from . import backward as _backward
from . import forward as _forward

__all__ = ["TritonScan"]


class TritonScan(torch.autograd.Function):
    """``(out, last_state) = scan(u, delta, A, B, C, D, z, delta_bias)`` over canonical shapes (kernels/canonical.py).

    ``apply(canonical, u, delta, A, B, C, D, z, delta_bias, orders, delta_softplus, merge, launch)``: the kernels
    read the eight ``canonical`` tensors (views of the arguments, not recorded by autograd); the gradients go to the
    arguments as given, in their shapes (``canonical.grads_as_given``). ``launch``: the forward's launch settings
    for these tensors (``forward.settings``), or ``None`` to derive them.

    Saved for backward: the canonical views (no copies), the fp32 chunk-start states ``(B, K, nchunks, N, C)``
    (``N/BLOCK_T`` of an fp32 copy of u: one full copy at N = 16, BLOCK_T = 16) and, with a gate, the pre-gate
    output in the input dtype (``(B, C, *S)`` for ``merge="sum"``, ``(B, K, C, *S)`` for ``"stack"``; with one
    order and ``PassConfig(save_pre_gate=False)`` none: the backward rebuilds it), and with
    ``PassConfig.mid_states`` the chunks' middle states. A call run as groups of orders (``PassConfig.split_orders``)
    saves each group's states and the summed pre-gate output.
    """

    @staticmethod
    def forward(ctx, canonical, *given_and_flags):  # type: ignore[override]
        """Run the forward kernels, saving the chunk-start states."""
        *given, orders, delta_softplus, merge, launch = given_and_flags
        u, delta, A, B, C, D, z, delta_bias = canonical
        res = _forward.forward(
            u, delta, A, B, C, D, z, delta_bias, orders=orders, delta_softplus=delta_softplus, merge=merge, save=True,
            launch=launch,
        )  # fmt: skip
        # after the launches (host time before the first kernel): an unused last state's gradient stays None (no
        # zeros materialised by the engine on every call)
        ctx.set_materialize_grads(False)
        ctx.given_shapes = tuple(x.shape if x is not None else None for x in given)
        states = [part.states for part in res.parts] if res.parts else [res.states]
        mids = [part.mids for part in res.parts] if res.parts else [res.mids]
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, res.pre_gate, *states, *mids)
        ctx.plan, ctx.orders, ctx.delta_softplus, ctx.merge = res.plan, orders, delta_softplus, merge
        ctx.parts = tuple((part.start, part.stop, part.plan) for part in res.parts)
        return res.out, res.last_state

    @staticmethod
    def backward(ctx, grad_out, grad_last):  # type: ignore[override]
        """Gradients of all eight inputs by recomputation from the saved chunk states."""
        u, delta, A, B, C, D, z, delta_bias, pre_gate, *saved = ctx.saved_tensors
        states, mids = saved[: len(saved) // 2], saved[len(saved) // 2 :]
        if ctx.parts:
            parts = [_forward.Part(a, b, s, p, m) for (a, b, p), s, m in zip(ctx.parts, states, mids, strict=True)]
            grads = _backward.grouped_backward(
                grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, parts, pre_gate,
                orders=ctx.orders, delta_softplus=ctx.delta_softplus,
            )  # fmt: skip
        else:
            grads = _backward.backward(
                grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, states[0], pre_gate,
                p=ctx.plan, orders=ctx.orders, delta_softplus=ctx.delta_softplus, merge=ctx.merge,
                given_shapes=ctx.given_shapes, mids=mids[0],
            )  # fmt: skip
        return (None, *grads_as_given(grads, ctx.given_shapes), None, None, None, None)
