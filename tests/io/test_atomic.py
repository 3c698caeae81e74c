from __future__ import annotations

import os
import stat

import pytest

from medmamba.io.atomic import atomic_dir, atomic_write, write_json


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_folders_get_the_umask_mode_not_mkstemps_0600(tmp_path, umask_022):
    # a model trained on the host must be readable by the container's UID and by colleagues (umask 022)
    with atomic_write(tmp_path / "a.pth") as tmp:
        tmp.write_bytes(b"x")
    assert mode(tmp_path / "a.pth") == 0o644
    assert mode(write_json(tmp_path / "b.json", {})) == 0o644
    with atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "c.txt").write_text("y")
    assert mode(tmp_path / "folder") == 0o755


def test_a_restrictive_umask_is_respected(tmp_path):
    previous = os.umask(0o077)
    try:
        with atomic_write(tmp_path / "a.pth") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(previous)
    assert mode(tmp_path / "a.pth") == 0o600


def test_a_failed_write_leaves_nothing(tmp_path):
    def killed_while_writing():
        with atomic_write(tmp_path / "a.nii.gz") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        killed_while_writing()
    assert list(tmp_path.iterdir()) == []
