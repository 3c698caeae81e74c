"""``medmamba demo``: the main job on data that ships.

Until the full pipeline lands (issue 8: MNI-derived dataset → plan → train → predict/register → report), the
demo runs a SegMamba-style three-order Mamba layer on a 3D feature map with every scan backend that can run
here, checks each against the float64 reference and prints the timings.
"""

from __future__ import annotations

import argparse

from medmamba.cli.common import common_parser

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``demo``."""
    parser = subparsers.add_parser(
        "demo",
        parents=[common_parser()],
        help="run the demo on data that ships (for now: the selective-scan check and timing)",
        description="Run a three-order (raster, reversed, inter-slice) Mamba layer on a 3D feature map with each "
        "available scan backend, compare every backend with the float64 reference scan and print timings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", type=int, default=16, help="edge of the cubic feature map (voxels)")
    parser.add_argument("--channels", type=int, default=32, help="channels of the feature map (d_model)")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=("torch", "triton"),
        default=None,
        help="scan backends to run (default: every one that can run on the device)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print one line per backend: max deviation from the reference and forward time."""
    import time

    import torch

    from medmamba.kernels import RASTER, REVERSED, SLICE, available_backends, use_backend
    from medmamba.layers import MambaLayer

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    layer = MambaLayer(args.channels, orders=(RASTER, REVERSED, SLICE), residual=True).to(device)
    x = torch.randn(1, args.channels, args.size, args.size, args.size, device=device)
    small = x[:, :, :4, :4, :4].double()
    with torch.no_grad(), use_backend("reference"):
        reference = layer.double()(small)
    layer.float()
    print(f"MambaLayer(d_model={args.channels}, orders=raster+reversed+slice) on {tuple(x.shape)}, {device}")
    for backend, reason in available_backends(device).items():
        if reason is not None or backend == "reference" or (args.backends and backend not in args.backends):
            continue
        with torch.no_grad(), use_backend(backend):
            error = (layer.double()(small) - reference).abs().max().item()
            layer.float()
            layer(x)
            start = time.perf_counter()
            layer(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        print(f"  backend {backend:<9} max |Δ| vs float64 reference {error:.1e}   forward {seconds * 1e3:8.1f} ms")
    return 0
