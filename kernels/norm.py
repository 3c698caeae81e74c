"""``channel_layer_norm``: LayerNorm over the channel axis of a channels-first map, the norm before each Mamba mixer.

``nn.LayerNorm`` normalises the last axis, which for a ``(B, C, *S)`` map would take a transposed copy. Here the
statistics run over axis 1 in place. Same backend choice as :func:`selective_scan`: the triton path is one kernel
forward and one backward; the torch path is the same math in plain tensor ops (CPU, float64, the reference).
"""

from __future__ import annotations

import torch

from .dispatch import BackendName, _load, resolve_backend
from .errors import ScanInputError

__all__ = ["channel_layer_norm"]


def channel_layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
    backend: BackendName | None = None,
) -> torch.Tensor:
    """``nn.LayerNorm(C)`` applied at every voxel of ``x`` ``(B, C, *S)``, over its channels.

    ``y = (x − mean_c x) / sqrt(var_c x + eps) · weight + bias`` with the biased variance, as ``nn.LayerNorm``.

    Args:
        x: ``(B, C, *S)``.
        weight: ``(C,)`` or None (no affine part).
        bias: ``(C,)`` or None.
        eps: added to the variance.
        out_dtype: the output's dtype (the statistics stay in fp32 or float64): e.g. the autocast dtype when the
            output only feeds a linear that would cast it so (MambaLayer's in_proj), which saves that cast's pass
            over the map forward and its gradient's backward. ``None``: as described under Returns.
        backend: as for :func:`medmamba.kernels.selective_scan`.

    Returns:
        ``(B, C, *S)`` in fp32 for half-precision or fp32 inputs (as ``nn.LayerNorm`` under autocast), float64 for
        float64.

    Raises:
        ScanInputError: shapes do not fit; the message names the argument.
    """
    if x.ndim < 2:
        raise ScanInputError(f"x must be (B, C, *S), got {tuple(x.shape)}")
    channels = x.shape[1]
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise ScanInputError(f"out_dtype must be a floating-point dtype, got {out_dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (channels,):
            raise ScanInputError(f"{name} must be ({channels},), got {tuple(p.shape)}")
    name, _ = resolve_backend(backend, x.device)
    if name == "triton" and x.dtype != torch.float64 and x.numel() > 0:
        return _load("triton").channel_layer_norm(x, weight, bias, eps, out_dtype)
    out = _norm_torch(x, weight, bias, eps)
    return out if out_dtype is None else out.to(out_dtype)


def _norm_torch(x, weight, bias, eps):
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    mean = xf.mean(dim=1, keepdim=True)
    var = (xf - mean).square().mean(dim=1, keepdim=True)
    out = (xf - mean) * torch.rsqrt(var + eps)
    shape = (-1,) + (1,) * (x.ndim - 2)
    if weight is not None:
        out = out * weight.to(out.dtype).view(shape)
    if bias is not None:
        out = out + bias.to(out.dtype).view(shape)
    return out
