"""The ``medmamba`` command: one argparse parser, one module per subcommand.

Each subcommand module has ``add_parser(subparsers)`` and ``run(args) -> int``; heavy imports (torch, monai,
nnunetv2) happen inside ``run`` so that ``medmamba --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from medmamba import __version__
from medmamba.errors import MedmambaError

__all__ = ["build_parser", "main"]

#: subcommand modules under medmamba.cli, in the order ``--help`` lists them (a module may register a name of its
#: own, e.g. ``plan`` registers ``plan-and-preprocess``)
SUBCOMMANDS = ("convert", "demo", "evaluate", "info", "plan", "predict", "register", "train", "verify")

_EPILOG = (
    "Cite: U-Mamba (Ma et al., arXiv:2401.04722), SegMamba (Xing et al., MICCAI 2024, arXiv:2401.13560), "
    "Vivim (Yang et al., arXiv:2401.14168), MambaMorph (Guo et al., arXiv:2401.13934), "
    "Mamba (Gu & Dao, arXiv:2312.00752)."
)


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand (used by ``main`` and by the tests of ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="medmamba",
        description="Mamba networks for medical image segmentation and registration.",
        epilog=_EPILOG,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"medmamba {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the subcommand and map errors to exit codes (2 user error, 1 bug, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * getattr(args, "verbose", 0) + 10 * getattr(args, "quiet", 0)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if getattr(args, "no_progress", False):
        from medmamba._progress import disable_progress

        disable_progress()
    try:
        return int(args.run(args) or 0)
    except MedmambaError as err:
        print(f"medmamba {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        print(
            "\nThis is a bug in medmamba; please report it with the command line and the output above.",
            file=sys.stderr,
        )
        return 1
