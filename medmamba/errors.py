"""User-facing errors. A ``MedmambaError`` is a user's mistake: the CLI prints its message and exits with code 2.

Message shape: ``"<path>: <problem>. <fix>"``. Anything else that escapes is a bug (traceback, exit 1).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CheckpointError",
    "DatasetError",
    "GeometryError",
    "ImageReadError",
    "MedmambaError",
    "PlanError",
    "Problem",
    "UsageError",
]


class MedmambaError(Exception):
    """Base of every user-facing error; ``str()`` is the whole message."""

    exit_code = 2


class UsageError(MedmambaError):
    """An option combination that argparse cannot express."""


@dataclass(frozen=True)
class Problem:
    """One finding of a dataset check: the file, what is wrong, how to fix it."""

    path: str
    what: str
    fix: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.what}." + (f" {self.fix}" if self.fix else "")


class DatasetError(MedmambaError):
    """A dataset failed verification; carries every problem found."""

    def __init__(self, problems: list[Problem], header: str = "the dataset has problems") -> None:
        self.problems = list(problems)
        lines = [f"{header} ({len(self.problems)}):", *(f"  - {p}" for p in self.problems)]
        super().__init__("\n".join(lines))


class ImageReadError(MedmambaError):
    """An image file cannot be read (missing, truncated, unsupported, NaN voxels …)."""


class GeometryError(MedmambaError):
    """An image's geometry is invalid or does not match another image's."""


class PlanError(MedmambaError):
    """Plans are missing, incompatible, or a preset is unknown."""


class CheckpointError(MedmambaError):
    """A checkpoint is of the wrong network or channels, or not loadable with weights_only=True."""
