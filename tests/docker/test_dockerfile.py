"""docker/: the Dockerfile lints clean and follows the image rules; its pins agree with pyproject; the documented
container commands are valid medmamba command lines. Seconds, no container tool needed."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from medmamba.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def instructions() -> list[dict]:
    return DockerfileParser(str(DOCKER / "Dockerfile")).structure


def values(instructions: list[dict], name: str) -> list[str]:
    return [i["value"] for i in instructions if i["instruction"] == name]


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "-c", str(DOCKER / ".hadolint.yaml"), str(DOCKER / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""


def test_base_image_is_a_build_argument_defaulting_to_cuda_pytorch(instructions):
    arg = next(i for i in instructions if i["instruction"] == "ARG")
    assert arg["value"].startswith("BASE_IMAGE=")
    default = arg["value"].split("=", 1)[1]
    assert "cuda" in default and "pytorch" in default and ":" in default and not default.endswith(":latest")
    froms = values(instructions, "FROM")
    assert froms == ["${BASE_IMAGE}"]
    assert instructions.index(arg) < next(i for i, x in enumerate(instructions) if x["instruction"] == "FROM")


def test_runs_as_a_numeric_non_root_user_with_the_medmamba_entrypoint(instructions):
    user = values(instructions, "USER")[-1]
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0)
    assert json.loads(values(instructions, "ENTRYPOINT")[-1]) == ["medmamba"]  # exec form
    assert json.loads(values(instructions, "CMD")[-1]) == ["--help"]
    assert set(json.loads(values(instructions, "VOLUME")[-1])) == {"/data", "/results"}
    # the last instruction that changes who runs comes after every RUN (nothing runs as root afterwards)
    kinds = [i["instruction"] for i in instructions]
    assert max(i for i, k in enumerate(kinds) if k == "RUN") < max(i for i, k in enumerate(kinds) if k == "USER")


def test_no_weights_or_data_are_baked_in(instructions):
    assert values(instructions, "ADD") == []
    for run in values(instructions, "RUN"):
        assert not re.search(r"\b(curl|wget)\b|https?://|\.pth\b|\.safetensors\b|\.nii", run), run
    copied = [shlex.split(v)[:-1] for v in values(instructions, "COPY")]
    assert sorted(src for sources in copied for src in sources) == sorted(
        ["docker/requirements-docker.txt", "pyproject.toml", "README.md", "medmamba", "kernels", "plans"]
    )


def test_every_cache_points_into_tmp_and_paths_into_the_volumes(instructions):
    env = DockerfileParser(str(DOCKER / "Dockerfile")).envs
    for name in ("MEDMAMBA_HOME", "XDG_CACHE_HOME", "TORCH_HOME", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        assert env[name].startswith("/tmp/"), name
    assert env["MEDMAMBA_RESULTS"] == "/results"
    assert env["MEDMAMBA_RAW"].startswith("/data/") and env["MEDMAMBA_PREPROCESSED"].startswith("/data/")


def test_dockerignore_lets_only_the_copied_sources_in():
    lines = [x for x in (ROOT / ".dockerignore").read_text().splitlines() if x and not x.startswith("#")]
    assert lines[0] == "**"
    allowed = {x[1:].rstrip("/") for x in lines if x.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "medmamba", "kernels", "plans", "docker/requirements-docker.txt"}


def test_docker_requirements_pin_pyprojects_dependencies_without_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {canonicalize_name(r.name): r for r in map(Requirement, project["dependencies"])}
    lines = [x for x in (DOCKER / "requirements-docker.txt").read_text().splitlines() if x and x[0] != "#"]
    pins = {canonicalize_name(r.name): r for r in map(Requirement, lines)}
    assert set(pins) == set(ranges) - {"torch", "triton"}
    for name, pin in pins.items():
        (spec,) = pin.specifier
        assert spec.operator == "==", f"{name} is not pinned"
        assert ranges[name].specifier.contains(spec.version), f"{name}=={spec.version} outside {ranges[name]}"


def test_ci_build_script_is_valid_bash_and_builds_the_same_dockerfile():
    script = DOCKER / "ci-build.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    assert '-f "$ROOT/docker/Dockerfile"' in text and "BASE_IMAGE=" in text and "exit 77" in text


def documented_commands() -> list[list[str]]:
    """The medmamba argument lists of docker/README.md's `$RUN $IMG …` lines and of docker/compose.yaml."""
    text = (DOCKER / "README.md").read_text().replace("\\\n", " ")
    commands = [
        shlex.split(line.split("$IMG", 1)[1].split("#")[0]) for line in text.splitlines() if "$RUN $IMG" in line
    ]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    default = re.compile(r"\$\{\w+:-([^}]*)\}")  # ${NAME:-value} → value
    commands.extend([default.sub(r"\1", part) for part in s["command"]] for s in compose["services"].values())
    return commands


def test_documented_container_commands_parse_with_the_real_parser():
    commands = documented_commands()
    assert len(commands) >= 8
    parser = build_parser()
    for argv in commands:
        args = parser.parse_args(argv)
        assert callable(args.run), argv


def test_compose_services_mount_the_volumes_read_only_root_and_gpus():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    assert list(compose["services"]) == ["demo-data", "plan", "train", "predict"]
    for service in compose["services"].values():
        assert service["build"]["dockerfile"] == "docker/Dockerfile" and service["read_only"] is True
        assert {v.split(":")[-1] for v in service["volumes"]} == {"/data", "/results"}
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"]
