"""``causal_conv``: the depthwise causal convolution that precedes each Mamba scan, along each scan order.

Like :func:`selective_scan` it reads and writes the natural layout and follows the same backend choice
(``backend=``, ``use_backend``, ``MEDMAMBA_SCAN_BACKEND``, else triton on CUDA and torch otherwise). The torch
path lays each order's sequence out with ``to_sequence`` and runs ``F.conv1d``; the triton path addresses the
tokens through the order's stride table and makes no copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .dispatch import BackendName, _load, resolve_backend
from .errors import ScanInputError
from .orders import ScanOrder, from_sequence, to_sequence

__all__ = ["causal_conv"]


def causal_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    orders: Sequence[ScanOrder],
    activation: str | None = "silu",
    backend: BackendName | None = None,
) -> torch.Tensor:
    """Depthwise causal convolution of a feature map along each of K scan orders (mamba_ssm's conv1d).

    For order k with kernel width W, along that order's sequence t (zero before its first token)::

        y_k[t] = act(bias_k + Σ_{j<W} weight_k[j]·x_k[t − W + 1 + j])

    Args:
        x: ``(B, C, *S)``, shared by the orders; natural layout.
        weight: ``(K, C, W)``.
        bias: ``(K, C)`` or None.
        orders: the K scan orders.
        activation: ``"silu"`` or None.
        backend: as for :func:`medmamba.kernels.selective_scan`.

    Returns:
        ``(B, K, C, *S)`` in the dtype of ``x`` (fp32 sums on the triton path).

    Raises:
        ScanInputError: shapes or orders do not fit; the message names the argument.
    """
    orders = tuple(orders)
    K = len(orders)
    if K == 0 or not all(isinstance(o, ScanOrder) for o in orders):
        raise ScanInputError(f"orders must be a non-empty sequence of ScanOrder, got {orders!r}")
    if activation not in ("silu", None):
        raise ScanInputError(f"activation must be 'silu' or None, got {activation!r}")
    if weight.ndim != 3 or weight.shape[0] != K:
        raise ScanInputError(f"weight must be (K={K}, C, W), got {tuple(weight.shape)}")
    channels = weight.shape[1]
    if x.ndim < 3 or x.shape[1] != channels:
        raise ScanInputError(f"x must be (B, {channels}, *S) with at least one spatial axis, got {tuple(x.shape)}")
    x4 = x.unsqueeze(1).expand(-1, K, *x.shape[1:])  # a view: every order reads the same map
    if bias is not None and tuple(bias.shape) != (K, channels):
        raise ScanInputError(f"bias must be ({K}, {channels}), got {tuple(bias.shape)}")
    nd = x4.ndim - 3
    for order in orders:
        order.resolve(nd)
    name, _ = resolve_backend(backend, x.device)
    if name == "triton" and x.dtype != torch.float64:
        return _load("triton").causal_conv(x, weight, bias, orders=orders, silu=activation == "silu")
    return _conv_torch(x4, weight, bias, orders, activation)


def _conv_torch(x4, weight, bias, orders, activation):
    channels, spatial = x4.shape[2], tuple(x4.shape[3:])
    width = weight.shape[-1]
    outs = []
    for k, order in enumerate(orders):
        seq = to_sequence(x4[:, k], order, len(spatial))  # (B, C, L)
        y = F.conv1d(
            seq,
            weight[k].unsqueeze(1).to(seq.dtype),
            None if bias is None else bias[k].to(seq.dtype),
            padding=width - 1,
            groups=channels,
        )[..., : seq.shape[-1]]
        if activation == "silu":
            y = F.silu(y)
        outs.append(from_sequence(y, order, spatial))
    return torch.stack(outs, dim=1)
