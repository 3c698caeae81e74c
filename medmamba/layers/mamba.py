"""MambaLayer: the Mamba-1 mixer over a feature map, along one or several scan orders.

The only caller of :func:`medmamba.kernels.selective_scan` in medmamba.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Literal

import torch
from torch import nn

from medmamba.kernels import RASTER, ScanOrder, causal_conv, channel_layer_norm, selective_scan
from medmamba.layers.token_linear import channel_linear, order_projections

__all__ = ["MambaLayer"]


class MambaLayer(nn.Module):
    """Mamba-1 selective-state-space mixer over a feature map (Gu & Dao, arXiv:2312.00752).

    Tokens are the voxels of the map in raster order (``networks.md`` §1.2), pre-normalised by ``LayerNorm(C)``.
    One ``in_proj`` and one ``out_proj`` are shared by the K scan orders; each order has its own causal depthwise
    conv1d (run along that order's sequence), ``x_proj``, ``dt_proj``, ``A_log`` and ``D``, as in SegMamba's
    tri-orientated Mamba and Vivim's ST-Mamba (K = 3) or plain Mamba (K = 1: U-Mamba, MambaMorph). The K gated
    outputs are summed (``merge="sum"``, SegMamba) or averaged (``"mean"``, Vivim) before ``out_proj``.

    Initialisation follows mamba_ssm's ``Mamba``: Δ bias = softplus⁻¹(dt), dt log-uniform in [dt_min, dt_max];
    S4D-real ``A_log = log(1..N)``; ``D = 1``; ``A_log`` and ``D`` are fp32 and flagged ``_no_weight_decay``.

    Parameters: ``3·expand·d_model² + K·d_inner·(d_conv + 2·dt_rank + 3·d_state + 3)`` (+ ``2·d_model`` for the
    norm); e.g. ``d_model=384, K=3``: 1,122,816 with the norm (one SegMamba layer).

    Args:
        d_model: channels C of the feature map.
        orders: the scan orders (``medmamba.kernels``: ``RASTER``, ``REVERSED``, ``SLICE``, ``TEMPORAL`` …).
        d_state: N, state size per channel.
        d_conv: kernel size of the causal depthwise convolution.
        expand: ``d_inner = expand·d_model``.
        dt_rank: rank of the Δ projection; ``"auto"`` = ``ceil(d_model / 16)``.
        dt_min: smallest initial Δ. dt_max: largest initial Δ. dt_init_floor: lower clamp of the initial Δ.
        dt_scale: scale of the ``dt_proj`` weight init.
        conv_bias: bias in the depthwise convolutions. bias: bias in ``in_proj``/``out_proj``.
        merge: ``"sum"`` or ``"mean"`` over orders.
        norm: apply the pre-norm ``LayerNorm(d_model)`` to the tokens.
        residual: return ``x + mixer(x)`` instead of ``mixer(x)``.
        ssm_fp32: run the convolution, projections of the SSM branch and the scan in fp32 even under autocast
            (in/out projections still follow autocast); keeps mixed-precision training free of NaNs.

    Shapes:
        input ``(B, d_model, *S)`` with ``S`` of any length ≥ 1 (``(L,)``, ``(H, W)``, ``(D, H, W)``, ``(T, H, W)``);
        output the same shape and dtype.

    Example:
        >>> from medmamba.kernels import RASTER, REVERSED, SLICE
        >>> layer = MambaLayer(32, orders=(RASTER, REVERSED, SLICE))
        >>> layer(torch.randn(2, 32, 4, 6, 6)).shape
        torch.Size([2, 32, 4, 6, 6])
    """

    def __init__(
        self,
        d_model: int,
        *,
        orders: Sequence[ScanOrder] = (RASTER,),
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | Literal["auto"] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        merge: Literal["sum", "mean"] = "sum",
        norm: bool = True,
        residual: bool = False,
        ssm_fp32: bool = True,
    ) -> None:
        super().__init__()
        if d_model < 1 or d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError(
                f"d_model, d_state, d_conv and expand must be positive, got {d_model}, {d_state}, {d_conv}, {expand}"
            )
        if merge not in ("sum", "mean"):
            raise ValueError(f"merge must be 'sum' or 'mean', got {merge!r}")
        self.orders = tuple(orders)
        if not self.orders:
            raise ValueError("orders must name at least one scan order")
        K = len(self.orders)
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.merge, self.residual, self.ssm_fp32 = merge, residual, ssm_fp32

        self.norm = nn.LayerNorm(d_model) if norm else nn.Identity()
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias)
        # Per-order parameters are stacked on a leading K axis (one batched op per step instead of K).
        conv_bound = 1.0 / math.sqrt(d_conv)  # nn.Conv1d's default init for a depthwise kernel
        self.conv_weight = nn.Parameter(torch.empty(K, d_inner, d_conv).uniform_(-conv_bound, conv_bound))
        self.conv_bias = nn.Parameter(torch.empty(K, d_inner).uniform_(-conv_bound, conv_bound)) if conv_bias else None
        x_bound = 1.0 / math.sqrt(d_inner)  # nn.Linear's default init
        self.x_proj_weight = nn.Parameter(
            torch.empty(K, self.dt_rank + 2 * d_state, d_inner).uniform_(-x_bound, x_bound)
        )
        dt_bound = self.dt_rank**-0.5 * dt_scale
        self.dt_proj_weight = nn.Parameter(torch.empty(K, d_inner, self.dt_rank).uniform_(-dt_bound, dt_bound))
        dt = torch.exp(torch.rand(K, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_proj_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(K, d_inner, 1))
        self.D = nn.Parameter(torch.ones(K, d_inner))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Mix the tokens of ``x`` ``(B, d_model, *S)``; returns the same shape."""
        if x.ndim < 3 or x.shape[1] != self.d_model:
            raise ValueError(f"MambaLayer expects (B, {self.d_model}, *spatial), got {tuple(x.shape)}")
        spatial = x.shape[2:]
        # Channels stay first all the way through (per-voxel matmuls, order-aware conv and scan): no transposed or
        # permuted copy of the feature map is ever made.
        tokens = self._layer_norm(x.flatten(2))  # (B, C, L)
        xz = channel_linear(self.in_proj, tokens)  # (B, 2·d_inner, L)
        precision = torch.autocast(device_type=x.device.type, enabled=False) if self.ssm_fp32 else nullcontext()
        with precision:
            if self.ssm_fp32:  # upcast half precision; float64 stays float64
                xz = xz.to(torch.promote_types(xz.dtype, torch.float32))
            # chunked while 3-D: autograd joins the halves' gradients with one batched copy kernel, which takes at
            # most 4 dimensions (the 5-D map's join fell back to strided copies: 0.49 -> 0.19 ms per step, H200)
            u, z = (t.unflatten(-1, spatial) for t in xz.chunk(2, dim=1))  # (B, d_inner, *S)
            y = self._ssm(u, z)
        y = y.flatten(2)
        if not torch.is_autocast_enabled(x.device.type):
            # under autocast the matmul casts y itself: a bf16 y cast up to fp32 for the matmul to cast it back down
            # would cost two full-size casts forward and two backward, for the same values
            y = y.to(tokens.dtype)
        out = channel_linear(self.out_proj, y)  # (B, C, L)
        out = out.view(x.shape)
        return x + out if self.residual else out

    def _layer_norm(self, flat: torch.Tensor) -> torch.Tensor:
        """``self.norm`` over the channel axis of ``(B, C, L)``: nn.LayerNorm's math, in fp32."""
        if not isinstance(self.norm, nn.LayerNorm):
            return flat
        # Under autocast in_proj would cast the fp32 output to the autocast dtype: the kernel writes that directly.
        out_dtype = None
        if torch.is_autocast_enabled(flat.device.type) and flat.dtype != torch.float64:
            out_dtype = torch.get_autocast_dtype(flat.device.type)
        return channel_layer_norm(flat, self.norm.weight, self.norm.bias, self.norm.eps, out_dtype=out_dtype)

    def _ssm(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per order: causal conv along the order, x_proj, dt_proj; then one multi-order selective scan."""
        spatial = x.shape[2:]
        K = len(self.orders)
        conv_bias = None if self.conv_bias is None else self.conv_bias.to(x.dtype)
        u = causal_conv(x, self.conv_weight.to(x.dtype), conv_bias, orders=self.orders)  # (B, K, d_inner, *S)
        # x_proj then dt_proj: Δ (before its bias) and B, C (views of x_proj's output), each (B, K, ·, L)
        u, delta, B, C = order_projections(u.flatten(3), self.x_proj_weight, self.dt_proj_weight)
        u, delta = u.unflatten(-1, spatial), delta.unflatten(-1, spatial)  # (B, K, d_inner, *S)
        B, C = B.unflatten(-1, spatial).unsqueeze(2), C.unflatten(-1, spatial).unsqueeze(2)  # (B, K, 1, N, *S)
        state_dtype = torch.promote_types(x.dtype, torch.float32)
        A = -torch.exp(self.A_log.to(state_dtype))  # (K, d_inner, N)
        D, delta_bias = self.D.to(state_dtype), self.dt_proj_bias.to(state_dtype)
        if K == 1:  # mamba_ssm's layout for a single order, by squeeze: indexing's backward (select_backward) would
            # fill a zero map and copy the gradient into it, for u and Δ each
            u, delta, B, C = (t.squeeze(1) for t in (u, delta, B, C))
            A, D, delta_bias = (t.squeeze(0) for t in (A, D, delta_bias))
        y = selective_scan(u, delta, A, B, C, D, z, delta_bias, orders=self.orders, delta_softplus=True).out
        return y / K if self.merge == "mean" else y
