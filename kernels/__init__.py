"""medmamba.kernels — the selective scan behind every Mamba layer.

One entry point, :func:`selective_scan`, with backends behind it: ``reference`` (sequential, the golden model for
tests), ``torch`` (chunked pure-PyTorch scan, CPU and fallback) and ``triton`` (GPU); :func:`causal_conv` is the
order-aware convolution that precedes it and :func:`channel_layer_norm` the norm before it, on the same backends.
Scan orders (:class:`ScanOrder`, ``RASTER``, ``REVERSED``, ``SLICE``, ``TEMPORAL``, :func:`cross_scan`) say in
which order a feature map's voxels are visited; inputs stay in their natural layout.

This package imports nothing else of medmamba (and only torch; triton lazily, on use).
"""

from __future__ import annotations

from .conv import causal_conv
from .dispatch import available_backends, triton_launcher, use_backend
from .errors import BackendUnavailableError, ScanInputError
from .norm import channel_layer_norm
from .orders import RASTER, REVERSED, SLICE, TEMPORAL, ScanOrder, cross_scan, from_sequence, order_indices, to_sequence
from .scan import ScanResult, selective_scan

__all__ = [
    "RASTER",
    "REVERSED",
    "SLICE",
    "TEMPORAL",
    "BackendUnavailableError",
    "ScanInputError",
    "ScanOrder",
    "ScanResult",
    "available_backends",
    "causal_conv",
    "channel_layer_norm",
    "cross_scan",
    "from_sequence",
    "order_indices",
    "selective_scan",
    "to_sequence",
    "triton_launcher",
    "use_backend",
]
