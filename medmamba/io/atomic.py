"""Atomic writes: a file or a folder appears complete under its final name, or not at all.

A temporary name in the *same* folder (so the final ``os.replace`` is a rename on one file system), data
flushed with ``fsync`` before the rename, and the folder entry synced after it; on any error the temporary is
removed. Readers therefore never see half a NIfTI or half a dataset, and an interrupted run leaves only a
hidden ``.*.tmp-*`` entry behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_write", "write_json"]

#: multi-part endings kept at the end of temporary names, so writers that pick the format by ending still work
_ENDINGS = (".nii.gz", ".seg.nrrd", ".tar.gz")


def _ending(name: str) -> str:
    for ending in _ENDINGS:
        if name.endswith(ending):
            return ending
    return Path(name).suffix


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is synced and renamed onto ``path``.

    The temporary name keeps ``path``'s ending (``.nii.gz``, ``.nrrd`` …) so libraries that choose the format by
    ending write the right one. The parent folder must exist.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> with atomic_write(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", suffix=_ending(path.name), dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp's 0600 would hide results from other users and container UIDs
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``path``; on success it is renamed to ``path``.

    Args:
        path: the folder to create; its parent is created if missing.
        overwrite: replace an existing ``path`` (the old folder is removed only after the new one is complete).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false (checked before and after the work).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700, as above
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            if not overwrite:
                raise FileExistsError(path)
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            path.replace(old / path.name)
            tmp.replace(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.replace(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented UTF-8 JSON, atomically; returns the path."""
    path = Path(path)
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back (process-wide, momentarily).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    # Directory fsync makes the rename itself durable; not every platform allows opening a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            with open(Path(folder) / name, "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(Path(folder))
