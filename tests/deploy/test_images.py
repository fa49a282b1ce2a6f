"""`make images` builds one image per service Dockerfile with the names the manifests
use, says clearly when there is no container tool; every Dockerfile is the template's
output (deploy/images/dockerfiles.py) and installs exactly the radflow packages its
service needs; and the images' pinned versions satisfy what each package asks for."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy.manifests import ROOT, of_kind, render

DOCKERFILES = sorted(ROOT.glob("services/*/Dockerfile"))


def _needs(project: Path) -> set[Path]:
    """The project and the radflow packages it needs, followed through pyproject.toml."""
    local = {
        canonicalize_name(tomllib.loads(p.read_text())["project"]["name"]): p.parent
        for p in [*ROOT.glob("libs/*/pyproject.toml"), *ROOT.glob("services/*/pyproject.toml")]
    }
    found: set[Path] = set()
    pending = [project]
    while pending:
        directory = pending.pop()
        if directory in found:
            continue
        found.add(directory)
        meta = tomllib.loads((directory / "pyproject.toml").read_text())["project"]
        for text in meta["dependencies"]:
            name = canonicalize_name(Requirement(text).name)
            if name in local:
                pending.append(local[name])
    return found


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def test_make_images_without_a_container_tool_fails_and_says_why() -> None:
    done = _make("images", "CONTAINER_TOOL=radflow-no-such-builder")
    assert done.returncode != 0
    assert "'radflow-no-such-builder' not found" in done.stderr
    assert "CONTAINER_TOOL" in done.stderr


@pytest.fixture
def image_context() -> Iterator[Path]:
    context = ROOT / ".run" / "image-context"
    yield context
    shutil.rmtree(context, ignore_errors=True)  # a copy of the sources: not left behind


def test_make_images_builds_every_service_the_manifests_run(image_context: Path) -> None:
    # `echo` stands in for docker: the commands it would run are printed.
    done = _make("images", "CONTAINER_TOOL=echo", "IMAGE_TAG=t1", "IMAGE_PREFIX=reg/radflow")
    assert done.returncode == 0, done.stderr
    builds = [line for line in done.stdout.splitlines() if line.startswith("build ")]
    tags = {line.split(" -t ")[1].split()[0] for line in builds}
    assert tags == {f"reg/radflow/{p.parent.name}:t1" for p in DOCKERFILES}
    context = image_context
    for line in builds:
        dockerfile = ROOT / line.split(" -f ")[1].split()[0]
        assert dockerfile.is_file() and dockerfile.is_relative_to(context)
    assert not list(context.rglob("__pycache__")), "caches in the build context"
    images = {
        c["image"].split(":")[0]
        for d in of_kind(render("dev"), "Deployment")
        for c in d["spec"]["template"]["spec"]["containers"]
        if c["image"].startswith("radflow/")
    }
    assert images == {f"radflow/{p.parent.name}" for p in DOCKERFILES}


def test_every_dockerfile_is_written_from_the_one_template() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "deploy/images/dockerfiles.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert {p.parent for p in DOCKERFILES} == {p for p in ROOT.glob("services/*") if p.is_dir()}


def test_every_dockerfile_runs_as_non_root_from_pinned_versions() -> None:
    assert len(DOCKERFILES) >= 4
    for path in DOCKERFILES:
        text = path.read_text()
        assert "USER 10001:10001" in text, path
        assert "--constraint constraints.txt" in text, path
        assert "COPY deploy/images/constraints.txt" in text, path
        assert "TMPDIR=/tmp" in text and "STOPSIGNAL SIGTERM" in text, path


def test_every_image_installs_exactly_the_radflow_packages_its_service_needs() -> None:
    for path in DOCKERFILES:
        lines = path.read_text().splitlines()
        copied = {
            ROOT / line.split()[1]
            for line in lines
            if line.startswith("COPY ") and not line.startswith(("COPY --from", "COPY deploy/"))
        }
        (install,) = [line for line in lines if "pip install" in line]
        installed = {ROOT / arg for arg in install.split() if arg.startswith("./")}
        assert copied == installed == _needs(path.parent), path
    no_codecs = {"ingest", "router", "report-return"}
    for name in no_codecs:
        assert "libs/codecs" not in (ROOT / "services" / name / "Dockerfile").read_text(), name


def test_pinned_versions_satisfy_every_package_s_requirements() -> None:
    pins = {}
    for line in (ROOT / "deploy/images/constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    projects = sorted(set().union(*(_needs(p.parent) for p in DOCKERFILES)))
    for project in projects:
        meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
        for text in meta["dependencies"]:
            req = Requirement(text)
            name = canonicalize_name(req.name)
            if name.startswith("radflow-"):
                continue
            assert name in pins, f"{project.name} needs {name}: run make constraints"
            assert req.specifier.contains(pins[name], prereleases=True), (
                f"{project.name} asks {text}, images pin {pins[name]}: run make constraints"
            )
