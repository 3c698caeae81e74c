"""Import direction of style.md §3.2, checked on every source file (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package prefix -> prefixes it must never import
BANNED: dict[str, tuple[str, ...]] = {
    "medmamba.kernels": ("medmamba.errors", "medmamba.layers", "medmamba.networks", "medmamba.io", "medmamba.plans",
                         "medmamba.engines", "medmamba.metrics", "medmamba.cli", "monai", "nnunetv2"),
    "medmamba.errors": ("medmamba.",),
    "medmamba._progress": ("medmamba.",),
    "medmamba._deprecate": ("medmamba.",),
    "medmamba.layers": ("medmamba.kernels.backends", "medmamba.networks", "medmamba.io", "medmamba.plans",
                        "medmamba.engines", "medmamba.cli", "nnunetv2"),
    "medmamba.networks": ("medmamba.kernels.backends", "medmamba.io", "medmamba.plans", "medmamba.engines",
                          "medmamba.cli", "nnunetv2"),
    "medmamba.io": ("torch", "monai", "medmamba.layers", "medmamba.networks", "medmamba.plans", "medmamba.engines",
                    "medmamba.cli", "medmamba.kernels"),
    "medmamba.metrics": ("medmamba.io", "medmamba.plans", "medmamba.engines", "medmamba.cli"),
    "medmamba.plans": ("medmamba.engines", "medmamba.cli", "medmamba.kernels.backends"),
    "medmamba.engines": ("medmamba.cli", "medmamba.kernels.backends"),
    "medmamba.cli": ("medmamba.kernels.backends",),
}  # fmt: skip


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("kernels", "plans"):
        parts = ["medmamba", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.append(target)
            found += [f"{target}.{alias.name}" for alias in node.names]
    return found


def violations(path: Path, module: str) -> list[str]:
    """Every import of ``module`` (the file ``path``) that the house plan forbids."""
    rules = [banned for prefix, banned in BANNED.items() if module == prefix or module.startswith(prefix + ".")]
    in_kernels = module.startswith("medmamba.kernels")
    found = []
    for target in imports_of(path, module):
        for banned in (b for rule in rules for b in rule):
            hit = target == banned.rstrip(".") or target.startswith(banned if banned.endswith(".") else banned + ".")
            if hit and not (in_kernels and target.startswith("medmamba.kernels")):
                found.append(f"{module} imports {target}, which style.md §3.2 forbids")
        if target.startswith("triton") and not module.startswith("medmamba.kernels.backends.triton_scan"):
            found.append(f"{module} imports {target}: only kernels/backends/triton_scan may import triton")
        if target.startswith("medmamba.kernels.backends") and not in_kernels:
            found.append(f"{module} imports a scan backend; call medmamba.kernels.selective_scan instead")
    return found


SOURCES = sorted(p for d in ("medmamba", "kernels", "plans") for p in (ROOT / d).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_house_plan(path):
    assert violations(path, module_name(path)) == []


def test_the_layering_check_catches_violations(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom medmamba.networks import build\n\ndef f():\n    import triton\n")
    found = " | ".join(violations(probe, "medmamba.io.probe"))
    assert "imports torch" in found and "imports medmamba.networks" in found and "imports triton" in found
    assert violations(probe, "medmamba.engines.probe") == [
        "medmamba.engines.probe imports triton: only kernels/backends/triton_scan may import triton"
    ]
    backend = tmp_path / "backend.py"
    backend.write_text("from medmamba.kernels import backends\n")
    assert any("scan backend" in v for v in violations(backend, "medmamba.layers.backend"))
    relative = tmp_path / "__init__.py"
    relative.write_text("from ..io import read_image\n")
    assert any("medmamba.io" in v for v in violations(relative, "medmamba.networks"))
