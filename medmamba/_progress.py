"""Progress bars: tqdm on stderr, off without a TTY, under ``--no-progress`` or when ``CI`` is set."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

__all__ = ["disable_progress", "progress"]

T = TypeVar("T")
_disabled = False


def disable_progress(disabled: bool = True) -> None:
    """Turn every progress bar of this process off (``--no-progress``)."""
    global _disabled
    _disabled = disabled


def _enabled() -> bool:
    return not _disabled and not os.environ.get("CI") and sys.stderr.isatty()


def progress(iterable: Iterable[T], *, desc: str = "", total: int | None = None, **kwargs) -> Iterator[T]:
    """Wrap ``iterable`` in a bar on stderr when bars are enabled, else return it unchanged."""
    if not _enabled():
        yield from iterable
        return
    yield from tqdm(iterable, desc=desc, total=total, file=sys.stderr, dynamic_ncols=True, **kwargs)
