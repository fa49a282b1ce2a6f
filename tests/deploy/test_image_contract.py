"""Each service image's environment, built as its Dockerfile says (a fresh venv, the
Dockerfile's pip install line, the images' constraints), starts: --help and
--check-config exit 0 with the image's environment, and every radflow module imports
from that venv alone (deploy/images/contract.py, make image-contract). And the check
catches what it exists for: a service that imports a package its pyproject.toml does
not declare."""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from deploy.manifests import ROOT


def _load_contract() -> ModuleType:
    """deploy/images/contract.py is a script (make image-contract), not a package."""
    spec = importlib.util.spec_from_file_location(
        "image_contract", ROOT / "deploy/images/contract.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


contract = _load_contract()

SERVICES = sorted(p.parent.name for p in ROOT.glob("services/*/Dockerfile"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("image-contract")
    yield path
    shutil.rmtree(path, ignore_errors=True)  # ~150 MB per service


@pytest.fixture(scope="module")
def results(work: Path) -> dict[str, Any]:
    """Every service's environment built in ``work`` and checked, two at a time (one
    to two minutes on a shared 2-core machine)."""
    return {r.service: r for r in contract.run(work=work, jobs=2)}


def test_every_service_dockerfile_is_understood() -> None:
    for service in SERVICES:
        recipe = contract.read_dockerfile(ROOT / "services" / service / "Dockerfile")
        assert recipe.entrypoint[:2] == ("python", "-m"), service
        assert recipe.constraints == ("constraints.txt",), service
        assert contract.in_context(recipe, "constraints.txt") == "deploy/images/constraints.txt"
        assert f"./services/{service}" in recipe.packages, service
        assert any(p.startswith("./libs/core") for p in recipe.packages), service
        for variable, in_image in recipe.mounts.items():
            assert contract.mounted_file(service, in_image).is_file(), (service, variable)
    mounts = {
        s: contract.read_dockerfile(ROOT / "services" / s / "Dockerfile").mounts for s in SERVICES
    }
    assert mounts["router"] == {"RADFLOW_ROUTER_RULES_FILE": "/etc/radflow/rules/rules.yaml"}
    assert set(mounts["report-return"]) == {
        "RADFLOW_REPORT_RETURN_SITES_FILE",
        "RADFLOW_REPORT_RETURN_RULES_FILE",
    }


@pytest.mark.timeout(900)  # the first one builds them all; a loaded machine is slow
@pytest.mark.parametrize("service", SERVICES)
def test_service_image_environment_starts_and_imports_every_module(
    results: dict[str, Any], service: str
) -> None:
    result = results[service]
    assert result.problems == [], "\n".join(result.problems)
    assert "usage: python -m" in result.help
    assert result.modules >= 10  # the service's package and the radflow libraries


@pytest.mark.timeout(900)
def test_router_image_without_its_rule_file_mount_fails_check_config(
    results: dict[str, Any], work: Path
) -> None:
    # The contract's --check-config passes with the mount; without it the same image
    # environment refuses, naming the file: the mount is what made it pass.
    assert results["router"].problems == []
    recipe = contract.read_dockerfile(ROOT / "services/router/Dockerfile")
    unmounted = dataclasses.replace(recipe, mounts={})
    home = work / "router"
    env = contract.image_env(unmounted, home / "venv", home)
    done = subprocess.run(
        [str(home / "venv" / "bin" / "python"), "-m", "router", "--check-config"],
        env=env,
        cwd=home / "cwd",
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "rules.yaml" in done.stderr and "cannot read" in done.stderr


FAKE_DOCKERFILE = """\
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY deploy/images/constraints.txt constraints.txt
COPY services/fake services/fake
RUN python -m venv /opt/venv \\
 && /opt/venv/bin/pip install --constraint constraints.txt ./services/fake

FROM python:3.11-slim-bookworm
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \\
    RADFLOW_FAKE_GREETING=hello
ENTRYPOINT ["python", "-m", "fake"]
"""

FAKE_PYPROJECT = """\
[build-system]
requires = ["hatchling>=1.25"]
build-backend = "hatchling.build"

[project]
name = "radflow-fake"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = []  # forgets PyYAML, which fake.rules imports

[tool.hatch.build.targets.wheel]
packages = ["src/fake"]
"""

FAKE_MAIN = """\
import argparse, os, sys

def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m fake")
    parser.add_argument("--check-config", action="store_true")
    parser.parse_args()
    return 0 if os.environ.get("RADFLOW_FAKE_GREETING") == "hello" else 2

if __name__ == "__main__":
    sys.exit(main())
"""


def test_a_service_importing_a_package_it_does_not_declare_fails_naming_it(
    tmp_path: Path,
) -> None:
    # A service whose --help and --check-config work, but one module of which imports
    # PyYAML: present in the workspace's venv, absent from the image.
    repo = tmp_path / "repo"
    package = repo / "services" / "fake" / "src" / "fake"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text(FAKE_MAIN)
    (package / "rules.py").write_text("import yaml\n")
    (repo / "services" / "fake" / "pyproject.toml").write_text(FAKE_PYPROJECT)
    (repo / "services" / "fake" / "Dockerfile").write_text(FAKE_DOCKERFILE)
    (repo / "deploy" / "images").mkdir(parents=True)
    shutil.copy(ROOT / "deploy/images/constraints.txt", repo / "deploy/images")

    (result,) = contract.run(root=repo, work=tmp_path / "work")

    assert "help" in result.seconds and "check-config" in result.seconds
    assert result.problems == [
        "fake: import fake.rules fails: package 'yaml' is not installed (PyPI: PyYAML): "
        "declare it in the pyproject.toml of the package that imports it"
    ]
