"""The package installs as DEVELOPERS.md fixes it: medmamba.kernels from kernels/, medmamba.plans from plans/."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import medmamba

ROOT = Path(__file__).resolve().parents[1]
MAPPING = {"medmamba": ROOT / "medmamba", "medmamba.kernels": ROOT / "kernels", "medmamba.plans": ROOT / "plans"}


def packages_in_tree() -> set[str]:
    found = set()
    for name, folder in MAPPING.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            dotted = ".".join((name, *rel.parts))
            # a mapped sub-package is found under its own folder, not under medmamba/
            if not any(dotted.startswith(other) and other != name for other in MAPPING if other.startswith(name + ".")):
                found.add(dotted)
    return found


def test_pyproject_lists_every_package_of_the_tree():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(config["packages"]) == packages_in_tree()
    assert {k: ROOT / v for k, v in config["package-dir"].items()} == MAPPING


def test_editable_install_maps_kernels_and_plans():
    import medmamba.kernels
    import medmamba.plans

    assert Path(medmamba.kernels.__file__).parent == ROOT / "kernels"
    assert Path(medmamba.plans.__file__).parent == ROOT / "plans"
    assert callable(medmamba.kernels.selective_scan)


@pytest.mark.slow
def test_wheel_installs_and_imports_the_mapped_packages(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("medmamba-*.whl")
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True
    )
    probe = (
        "import medmamba, medmamba.kernels, medmamba.plans, medmamba.layers, medmamba.cli;"
        "print(medmamba.kernels.__file__); print(medmamba.plans.__file__);"
        "import torch; from medmamba.kernels import selective_scan;"
        "u = torch.randn(1, 2, 5); A = -torch.ones(2, 3); B = torch.randn(1, 3, 5);"
        "print(selective_scan(u, u, A, B, B).out.shape);"
        "from medmamba.kernels.backends.triton_scan import native;"  # its C source ships and builds
        "print(native._SOURCE.is_file(), native.load() is not None)"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, check=True
    )
    kernels_file, plans_file, shape, native_launcher = out.stdout.split("\n")[:4]
    assert Path(kernels_file).is_relative_to(site) and Path(plans_file).is_relative_to(site)
    assert shape == "torch.Size([1, 2, 5])"
    assert native_launcher == "True True"


def test_console_script_reports_version_and_help():
    exe = Path(sys.executable).with_name("medmamba")
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"medmamba {medmamba.__version__}"
    help_text = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "demo" in help_text and "info" in help_text
    module = subprocess.run([sys.executable, "-m", "medmamba", "--version"], capture_output=True, text=True, check=True)
    assert module.stdout == out.stdout
