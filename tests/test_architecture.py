"""The layout's rules hold: a service depends only on libraries, never on another
service; what it imports is what it declares (so its image has it); and a service
exports only its own metric families, besides the shared ones of libs/core."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
SERVICES = {p.name: p.parent.parent for p in sorted(ROOT.glob("services/*/src/*")) if p.is_dir()}
"""Service package (``ingest``, ``stow_forwarder``, ...) → its project directory."""
SOURCES = sorted(str(p) for p in ROOT.glob("*/*/src"))
METRIC_PREFIX = {
    "ingest": "radflow_ingest_",
    "transcode": "radflow_transcode_",
    "router": "radflow_router_",
    "stow_forwarder": "radflow_forwarder_",
    "report_return": "radflow_report_return_",
    "ledger": "radflow_ledger_",
    "worklist": "radflow_worklist_",
}
"""The family name prefix each service owns; every other radflow_* family is shared
(libs/core's radflow_kafka_*, radflow_consumer_*, radflow_blob_*, ...)."""


def _imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in a module."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((SERVICES[package] / "src" / package).rglob("*.py"))


def test_every_service_has_its_metric_prefix_listed() -> None:
    assert set(METRIC_PREFIX) == set(SERVICES)


@pytest.mark.parametrize("package", sorted(SERVICES))
def test_a_service_imports_no_other_service(package: str) -> None:
    others = set(SERVICES) - {package}
    found = {
        f"{module.relative_to(ROOT)} imports {name}"
        for module in _modules(package)
        for name in _imports(module) & others
    }
    assert not found, "a concept two services need belongs in libs/: " + "; ".join(sorted(found))


def test_no_library_imports_a_service() -> None:
    found = {
        f"{module.relative_to(ROOT)} imports {name}"
        for module in sorted(ROOT.glob("libs/*/src/**/*.py"))
        for name in _imports(module) & set(SERVICES)
    }
    assert not found, "; ".join(sorted(found))


def _closure(distribution: str) -> set[str]:
    """The distribution and everything it needs at run time: the workspace's packages
    as their pyproject.toml says (not as last installed), third-party ones as installed."""
    local = {
        canonicalize_name(tomllib.loads(p.read_text())["project"]["name"]): p
        for p in [*ROOT.glob("libs/*/pyproject.toml"), *ROOT.glob("services/*/pyproject.toml")]
    }
    found: set[str] = set()
    pending = [distribution]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in found:
            continue
        found.add(name)
        if name in local:
            requires = tomllib.loads(local[name].read_text())["project"]["dependencies"]
        else:
            requires = metadata.requires(name) or []
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                pending.append(req.name)
    return found


def _local_packages() -> dict[str, list[str]]:
    """Import name → distribution of the workspace's packages (installed editable, so
    their metadata does not list what they provide)."""
    found = {}
    for pyproject in [*ROOT.glob("libs/*/pyproject.toml"), *ROOT.glob("services/*/pyproject.toml")]:
        data = tomllib.loads(pyproject.read_text())
        for package in data["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]:
            found[Path(package).name] = [data["project"]["name"]]
    return found


@pytest.mark.parametrize("package", sorted(SERVICES))
def test_a_service_imports_only_what_it_declares(package: str) -> None:
    # Its image installs its pyproject's dependencies and theirs, nothing else.
    project = tomllib.loads((SERVICES[package] / "pyproject.toml").read_text())["project"]
    needed = _closure(project["name"])
    providers = {**metadata.packages_distributions(), **_local_packages()}
    undeclared = set()
    for module in _modules(package):
        for name in _imports(module) - set(sys.stdlib_module_names) - {package, "__future__"}:
            dists = {canonicalize_name(d) for d in providers.get(name, [])}
            if not dists & needed:
                undeclared.add(f"{module.relative_to(ROOT)} imports {name} ({sorted(dists)})")
    assert not undeclared, "; ".join(sorted(undeclared))


_LIST_FAMILIES = """
import importlib, json, pkgutil, sys
from prometheus_client import REGISTRY
package = importlib.import_module(sys.argv[1])
importlib.import_module(sys.argv[1] + ".__main__")
for info in pkgutil.walk_packages(package.__path__, sys.argv[1] + "."):
    importlib.import_module(info.name)
print(json.dumps(sorted(family.name for family in REGISTRY.collect())))
"""


@pytest.mark.parametrize("package", sorted(SERVICES))
def test_a_service_exports_only_its_own_metric_families(package: str) -> None:
    # A fresh process per service: what one service's modules register, at import,
    # in the registry its /metrics serves. The checkout's sources come first.
    done = subprocess.run(
        [sys.executable, "-c", _LIST_FAMILIES, package],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={"PYTHONPATH": ":".join(SOURCES), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    families = json.loads(done.stdout)
    own = METRIC_PREFIX[package]
    assert any(f.startswith(own) for f in families), f"{package} exports no {own}* family"
    foreign = [
        f for f in families if f.startswith(tuple(METRIC_PREFIX.values())) and not f.startswith(own)
    ]
    assert not foreign, f"{package} exports other services' families: {foreign}"


def test_every_test_module_has_a_name_of_its_own() -> None:
    """The test folders are not packages, so pytest imports each module by its file
    name: two modules of one name stop the whole collection (as the CI run found)."""
    seen: dict[str, Path] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        assert path.name not in seen, f"{path} and {seen[path.name]} share a name"
        seen[path.name] = path
