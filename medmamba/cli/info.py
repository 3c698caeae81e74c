"""``medmamba info``: versions, devices and which scan backends can run."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``info``."""
    parser = subparsers.add_parser(
        "info",
        help="print versions, devices and available scan backends",
        description="Print the versions of medmamba and its libraries, the devices seen, which "
        "selective-scan backends can run on each device (and why not, where not), and, with a GPU, whether the "
        "triton backend launches its kernels through medmamba's native C launcher. With --check-scan, also run a "
        "SegMamba-style three-order Mamba layer (raster, reversed, inter-slice) with each backend that can run, "
        "compare it with the float64 reference scan and time it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--check-scan", action="store_true", help="check and time every runnable scan backend")
    parser.add_argument("--device", default="auto", help="device for --check-scan: auto, cpu, cuda or cuda:N")
    parser.add_argument("--size", type=int, default=16, help="--check-scan: edge of the cubic feature map (voxels)")
    parser.add_argument("--channels", type=int, default=32, help="--check-scan: channels of the feature map")
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=("torch", "triton"),
        default=None,
        help="--check-scan: backends to run (default: every one that can run on the device)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the report to stdout."""
    import importlib.metadata as md

    import torch

    from medmamba import __version__
    from medmamba.kernels import available_backends

    print(f"medmamba {__version__}")
    installed = {dist.metadata["Name"].lower(): dist.version for dist in md.distributions()}
    for package in ("torch", "triton", "monai", "nnunetv2", "nibabel", "SimpleITK", "pydicom"):
        print(f"{package} {installed.get(package.lower(), 'not installed')}")
    devices = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    for device in devices:
        name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "CPU"
        print(f"device {device} ({name})")
        for backend, reason in available_backends(device).items():
            print(f"  scan backend {backend}: {'ok' if reason is None else reason}")
    if torch.cuda.device_count() and available_backends("cuda:0").get("triton") is None:
        print(f"triton kernel launcher: {_launcher()}")
    if args.check_scan:
        _check_scan(args)
    return 0


def _launcher() -> str:
    """Which C launcher the Triton backend's direct launches use, and why Triton's where it is not ours."""
    from medmamba.kernels import triton_launcher

    reason = triton_launcher()
    return "native (medmamba's)" if reason is None else f"Triton's: the native one is {reason}"


def _check_scan(args: argparse.Namespace) -> None:
    """One line per backend: max deviation of a 3-order MambaLayer from the float64 reference, and forward time."""
    import time

    import torch

    from medmamba.kernels import RASTER, REVERSED, SLICE, available_backends, use_backend
    from medmamba.layers import MambaLayer

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    torch.manual_seed(0)
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
