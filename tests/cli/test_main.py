from __future__ import annotations

import argparse

import pytest

import medmamba
from medmamba.cli import build_parser, main
from medmamba.errors import PlanError


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"medmamba {medmamba.__version__}"


def test_help_documents_every_option_of_every_subcommand():
    parser = build_parser()
    commands = subparsers(parser)
    assert {"demo", "info"} <= set(commands)
    for name, sub in commands.items():
        assert sub.description, f"{name} has no description"
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name}: {action.dest} has no help text"


def test_a_user_error_is_one_line_and_exit_code_2(monkeypatch, capsys):
    import medmamba.cli.info as info

    def broken(args):
        raise PlanError("plans.json: no configuration '3d_fullres_umamba_bot'. Run plan-and-preprocess first.")

    monkeypatch.setattr(info, "run", broken)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "medmamba info: error: plans.json: no configuration '3d_fullres_umamba_bot'. Run plan-and-preprocess first."
    )
    assert "Traceback" not in err


def test_a_bug_exits_1_with_the_traceback(monkeypatch, capsys):
    import medmamba.cli.info as info

    monkeypatch.setattr(info, "run", lambda args: 1 / 0)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert "ZeroDivisionError" in err and "this is a bug" in err.lower()


def test_info_lists_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "scan backend torch: ok" in out and "scan backend reference: ok" in out


def test_info_check_scan_compares_every_backend_with_the_reference(capsys):
    assert (
        main(["info", "--check-scan", "--device", "cpu", "--size", "6", "--channels", "8", "--backends", "torch"]) == 0
    )
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.strip().startswith("backend torch"))
    error = float(line.split("reference")[1].split()[0])
    assert error < 1e-10


def test_info_names_the_kernel_launcher(monkeypatch):
    import medmamba.cli.info as info
    import medmamba.kernels as kernels

    assert kernels.triton_launcher() is None  # the native launcher builds here (gcc and Python's headers)
    assert info._launcher() == "native (medmamba's)"
    monkeypatch.setenv("MEDMAMBA_NATIVE_LAUNCH", "0")
    assert info._launcher() == "Triton's: the native one is off (MEDMAMBA_NATIVE_LAUNCH=0)"
