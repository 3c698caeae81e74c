"""The seam to nnunetv2: its folders for the duration of a call, and its prints turned into log records.

nnunetv2 2.8.1 reads ``nnUNet_raw``/``nnUNet_preprocessed`` from the environment lazily, at use
(``nnunetv2/paths.py``), and its planner and preprocessor take a dataset *name* under those folders. Library
functions here take paths as arguments (style.md §2.8), so they point nnunetv2 at them for the call only.
nnunetv2 also prints its plans and progress to stdout, which carries only results in medmamba (§2.7).
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

__all__ = ["nnunet_folders", "stdout_to_log"]

_VARS = ("nnUNet_raw", "nnUNet_preprocessed")


@contextmanager
def nnunet_folders(raw_root: str | os.PathLike[str], preprocessed_root: str | os.PathLike[str]) -> Iterator[None]:
    """Point nnunetv2 at ``raw_root`` and ``preprocessed_root`` inside the block; restore the previous values after."""
    previous = {name: os.environ.get(name) for name in _VARS}
    os.environ[_VARS[0]] = str(Path(raw_root).resolve())
    os.environ[_VARS[1]] = str(Path(preprocessed_root).resolve())
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class _LogStream(io.TextIOBase):
    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.buffer_text = ""

    def write(self, text: str) -> int:
        self.buffer_text += text
        *lines, self.buffer_text = self.buffer_text.split("\n")
        for line in lines:
            if line.strip():
                self.logger.debug("%s", line)
        return len(text)


@contextmanager
def stdout_to_log(logger: logging.Logger) -> Iterator[None]:
    """Send what nnunetv2 prints inside the block to ``logger`` at DEBUG instead of stdout."""
    stream = _LogStream(logger)
    with redirect_stdout(stream):
        yield
    if stream.buffer_text.strip():
        logger.debug("%s", stream.buffer_text)
