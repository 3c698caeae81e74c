"""``medmamba info``: versions, devices and which scan backends can run."""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``info``."""
    parser = subparsers.add_parser(
        "info",
        help="print versions, devices and available scan backends",
        description="Print the versions of medmamba and its libraries, the devices seen, and which "
        "selective-scan backends can run on each device (and why not, where not).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    return 0
