"""README.md is a newcomer's manual: every command in it must be real.

Each shell line that runs medmamba (directly, under torchrun, or inside a docker/apptainer container) must parse
with the real parser, and each subcommand it uses must be run by some test (found by reading the tests' calls of
``main([...])`` and ``python -m medmamba ...``). The two set-up commands must be Makefile targets (the first is
``.ci/run``'s), the Python example runs as printed, and container lines name files that exist.
"""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from medmamba.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
CONTAINER_IMAGES = ("medmamba:gpu", "medmamba.sif", "localhost/medmamba:ci")


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.DOTALL)


def shell_commands() -> list[list[str]]:
    """Every command of the README's bash blocks as tokens (continuations joined, comments and `&&` split)."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            while tokens:
                head, _, tokens = _split(tokens, "&&")
                commands.append(head)
    return [c for c in commands if c]


def _split(tokens: list[str], separator: str) -> tuple[list[str], str, list[str]]:
    if separator in tokens:
        i = tokens.index(separator)
        return tokens[:i], separator, tokens[i + 1 :]
    return tokens, "", []


def medmamba_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments medmamba receives from one shell command, or None if it does not run medmamba."""
    if tokens[0] == "medmamba":
        return tokens[1:]
    if tokens[0] == "torchrun":
        i = tokens.index("-m")
        assert tokens[i + 1] == "medmamba", tokens
        return tokens[i + 2 :]
    if tokens[0] in ("docker", "podman", "apptainer") and tokens[1] == "run":
        image = next(i for i, t in enumerate(tokens) if t in CONTAINER_IMAGES)
        return tokens[image + 1 :]
    return None


MEDMAMBA_COMMANDS = [a for a in map(medmamba_arguments, shell_commands()) if a is not None]


def subcommands_run_by_tests() -> set[str]:
    """Subcommands the test suite runs: ``main(["sub", …])`` and ``[…, "-m", "medmamba", "sub", …]`` literals."""
    found: set[str] = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        if path.name == Path(__file__).name:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main" and node.args:
                first = node.args[0]
                if isinstance(first, ast.List) and first.elts and isinstance(first.elts[0], ast.Constant):
                    found.add(str(first.elts[0].value))
            if isinstance(node, ast.List):
                values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                for i in range(len(values) - 2):
                    if values[i] == "-m" and values[i + 1] == "medmamba" and isinstance(values[i + 2], str):
                        found.add(values[i + 2])
    return found


def test_the_readme_runs_medmamba_in_every_workflow():
    used = {argv[0] for argv in MEDMAMBA_COMMANDS if argv}
    assert {
        "demo",
        "info",
        "convert",
        "verify",
        "plan-and-preprocess",
        "train",
        "predict",
        "register",
        "evaluate",
    } <= used
    assert len(MEDMAMBA_COMMANDS) >= 25


@pytest.mark.parametrize("argv", MEDMAMBA_COMMANDS, ids=[" ".join(a)[:60] for a in MEDMAMBA_COMMANDS])
def test_each_readme_command_parses_with_the_real_parser(argv):
    if argv == ["--version"]:
        return  # argparse's own action; tests/cli/test_main.py runs it
    args = build_parser().parse_args(argv)
    assert callable(args.run)


def test_each_readme_subcommand_is_run_by_a_test():
    used = {argv[0] for argv in MEDMAMBA_COMMANDS if argv and not argv[0].startswith("-")}
    missing = used - subcommands_run_by_tests()
    assert not missing, f"README commands no test runs: {sorted(missing)}"


def test_the_two_setup_commands_are_make_targets_and_ci_runs_the_second():
    setup = [c for c in shell_commands() if c[0] == "make"]
    assert setup[:2] == [["make", "demo"], ["make", "test"]]
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:.*\n\t\$\(BIN\)/medmamba demo", makefile, flags=re.MULTILINE)
    assert re.search(r"^test:", makefile, flags=re.MULTILINE)
    assert "exec make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_container_lines_name_files_that_exist():
    for tokens in shell_commands():
        if tokens[:2] == ["docker", "build"]:
            assert (ROOT / tokens[tokens.index("-f") + 1]).is_file()
    for link in re.findall(r"\]\(([^)#]+)\)", README):
        if not link.startswith("http"):
            assert (ROOT / link).exists(), link


def test_the_python_example_runs_as_printed():
    (code,) = [b for b in blocks("python") if "selective_scan" in b]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert tuple(scope["out"].shape) == (2, 64, 8, 16, 16)
