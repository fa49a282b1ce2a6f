"""Prove that every service image's environment starts, without a container tool
(make image-contract).

``make images`` needs Docker and a registry for its base image; neither is at hand in
CI or on a developer's machine, and a service whose ``pyproject.toml`` forgets a
package it imports passes every test run in the workspace's venv (which holds the
union of all packages) and then crashes in its pod. So this builds each service's
runtime environment the way its Dockerfile says, read from the Dockerfile itself:
a fresh venv, from a clean copy of the sources, installing exactly the paths of its
``pip install`` line with its constraints file. Then, with the image's ENV lines and
the files a deployment mounts where the Dockerfile's note names them:

1. the ENTRYPOINT with ``--help`` exits 0 and prints usage;
2. the ENTRYPOINT with ``--check-config`` exits 0;
3. every module of the installed radflow packages imports (``__main__`` modules
   aside: importing one runs it; step 1 imports the service's), and all that was
   loaded came from that venv or the standard library (nothing from the workspace).

What differs from ``docker build``, none of it changing which packages and versions
are installed (a few seconds each, times six services, on a 2-core machine):

- the radflow packages are built into wheels once, in one build venv, and each
  service's venv installs the wheels built from its Dockerfile's paths; their
  third-party dependencies are still resolved per service with the constraints file,
  but from a wheelhouse gathered once (``--no-index``) rather than from the index;
- the venvs are made without pip and setuptools (pip runs from outside with
  ``--python``): stricter than the image, whose venv has them;
- nothing is byte-compiled at install; the import step writes the bytecode of what
  it imports, so the entrypoint's runs read it as they would in the image;
- the processes run as the current user, not as the image's USER, and with the
  Python that runs this script (a note is printed if its version is not the image's).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path, PurePosixPath

import yaml

ROOT = Path(__file__).resolve().parents[2]
CONTEXT_DIRS = ("libs", "services", "deploy/images")
"""What make images copies into its build context."""
CONTEXT_IGNORE = shutil.ignore_patterns("__pycache__", "*.egg-info")
TIMEOUT_S = 300
_MOUNT_NOTE = re.compile(r"^#\s+([A-Z][A-Z0-9_]*)=(/\S+)\s*$")


@dataclass(frozen=True)
class Recipe:
    """What one Dockerfile says about the environment it builds and runs."""

    service: str
    python: str
    """The base image's Python version (major.minor), from ARG PYTHON_IMAGE."""
    venv: str
    """Where the image's venv lives (python -m venv DIR)."""
    copies: dict[str, str]
    """Build-stage COPY destination (relative to WORKDIR) → source in the context."""
    constraints: tuple[str, ...]
    """The --constraint files of the pip install line, as written there."""
    packages: tuple[str, ...]
    """The requirements of the pip install line, as written there (./libs/core...)."""
    env: dict[str, str]
    """The run stage's ENV, as written there (may refer to $PATH)."""
    entrypoint: tuple[str, ...]
    mounts: dict[str, str]
    """Variables the mount note asks to set → the in-image file they point to."""


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuations joined."""
    joined = re.sub(r"\\\n", " ", text)
    found = []
    for line in joined.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def read_dockerfile(path: Path) -> Recipe:
    """Parse a service's Dockerfile (the shape deploy/images/dockerfiles.py writes)."""
    text = path.read_text()
    python = venv = ""
    copies: dict[str, str] = {}
    constraints: list[str] = []
    packages: list[str] = []
    env: dict[str, str] = {}
    entrypoint: tuple[str, ...] = ()
    stage = 0
    for keyword, rest in _instructions(text):
        if keyword == "ARG" and rest.startswith("PYTHON_IMAGE="):
            match = re.search(r"python:(\d+\.\d+)", rest)
            python = match.group(1) if match else ""
        elif keyword == "FROM":
            stage += 1
        elif keyword == "COPY" and not rest.startswith("--"):
            source, destination = shlex.split(rest)
            copies[str(PurePosixPath(destination))] = source
        elif keyword == "RUN" and stage == 1:
            for command in rest.split("&&"):
                words = shlex.split(command)
                if words[1:3] == ["-m", "venv"]:
                    venv = words[3]
                elif "pip" in words[0] and words[1:2] == ["install"]:
                    constraints, packages = _pip_install(words[2:])
        elif keyword == "ENV" and stage == 2:
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = value
        elif keyword == "ENTRYPOINT":
            entrypoint = tuple(json.loads(rest))
    mounts = {}
    for line in text.splitlines():
        match = _MOUNT_NOTE.match(line)
        if match:
            mounts[match.group(1)] = match.group(2)
    if not (venv and packages and entrypoint):
        raise ValueError(f"{path}: no venv, pip install line or ENTRYPOINT found")
    return Recipe(
        service=path.parent.name,
        python=python,
        venv=venv,
        copies=copies,
        constraints=tuple(constraints),
        packages=tuple(packages),
        env=env,
        entrypoint=entrypoint,
        mounts=mounts,
    )


def _pip_install(words: list[str]) -> tuple[list[str], list[str]]:
    constraints, packages = [], []
    args = iter(words)
    for word in args:
        if word in ("--constraint", "-c"):
            constraints.append(next(args))
        elif word.startswith("--constraint="):
            constraints.append(word.split("=", 1)[1])
        elif word.startswith("-"):
            raise ValueError(f"pip install option not understood here: {word}")
        else:
            packages.append(word)
    return constraints, packages


def in_context(recipe: Recipe, written: str) -> str:
    """The context path a path of the pip install line was copied from (COPY lines)."""
    relative = str(PurePosixPath(written))
    for destination, source in recipe.copies.items():
        if relative == destination or relative.startswith(destination + "/"):
            return source + relative[len(destination) :]
    raise ValueError(f"{recipe.service}: {written} is not copied into the build stage")


def mounted_file(service: str, in_image: str, root: Path = ROOT) -> Path:
    """The repository file a deployment mounts at ``in_image``: the Deployment in
    deploy/k8s/base/<service>.yaml mounts a ConfigMap there, and the base kustomization
    generates that ConfigMap from files under deploy/k8s/base."""
    base = root / "deploy" / "k8s" / "base"
    wanted = PurePosixPath(in_image)
    deployment = next(
        d
        for d in yaml.safe_load_all((base / f"{service}.yaml").read_text())
        if d and d["kind"] == "Deployment"
    )
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    generators = {
        g["name"]: g
        for g in yaml.safe_load((base / "kustomization.yaml").read_text())["configMapGenerator"]
    }
    for container in pod["containers"]:
        for mount in container.get("volumeMounts", []):
            directory = PurePosixPath(mount["mountPath"])
            if wanted.parent != directory:
                continue
            config_map = volumes[mount["name"]].get("configMap", {}).get("name")
            for entry in generators.get(config_map, {}).get("files", []):
                key, _, source = entry.rpartition("=")
                if (key or PurePosixPath(source).name) == wanted.name:
                    return base / str(source)
    raise ValueError(f"{service}: nothing in deploy/k8s/base mounts {in_image}")


def copy_context(destination: Path, root: Path = ROOT) -> None:
    """A clean copy of what make images copies (no venv, caches or egg-info)."""
    shutil.rmtree(destination, ignore_errors=True)
    for name in CONTEXT_DIRS:
        if (root / name).is_dir():
            shutil.copytree(root / name, destination / name, ignore=CONTEXT_IGNORE)


def _pip_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env.pop("PIP_NO_CACHE_DIR", None)
    return env


def _run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        argv, capture_output=True, text=True, check=False, timeout=TIMEOUT_S, **kwargs
    )


def build_wheels(recipes: list[Recipe], context: Path, work: Path) -> dict[str, Path]:
    """Build every radflow package the recipes install (into ``work/radflow-wheels``),
    and gather every third-party wheel they need at the constrained versions (into
    ``work/wheels``), once for all services: context path of each radflow package → its
    wheel.

    pip would build each local package in its own isolated environment, installing
    the build backend nine times; one build venv holding every package's
    ``build-system.requires`` does the same builds once.
    """
    sources = sorted({in_context(r, p) for r in recipes for p in r.packages})
    constraints = sorted({in_context(r, c) for r in recipes for c in r.constraints})
    builder = work / "build-venv"
    wheelhouse = work / "wheels"
    own = work / "radflow-wheels"
    for directory in (builder, wheelhouse, own):
        shutil.rmtree(directory, ignore_errors=True)
    requires = sorted(
        {
            text
            for source in sources
            for text in tomllib.loads((context / source / "pyproject.toml").read_text())[
                "build-system"
            ]["requires"]
        }
    )
    pip = [sys.executable, "-m", "pip", "--python", str(builder / "bin" / "python")]
    steps = [
        [sys.executable, "-m", "venv", "--without-pip", str(builder)],
        [*pip, "install", "-q", *requires],
        [*pip, "wheel", "-q", "--no-build-isolation", "-w", str(wheelhouse)]
        + [arg for c in constraints for arg in ("--constraint", str(context / c))]
        + [str(context / s) for s in sources],
    ]
    for argv in steps:
        done = _run(argv, env=_pip_env())
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(argv[:4])}... failed:\n{done.stderr}")
    shutil.rmtree(builder, ignore_errors=True)
    # Apart from the third-party ones: an image installs a radflow package only from
    # its own pip install line, never found as a dependency.
    own.mkdir()
    wheels = {}
    for source in sources:
        name = tomllib.loads((context / source / "pyproject.toml").read_text())["project"]["name"]
        stem = re.sub(r"[-_.]+", "_", name).lower()
        (wheel,) = wheelhouse.glob(f"{stem}-*.whl")
        wheels[source] = wheel.rename(own / wheel.name)
    return wheels


@dataclass
class Result:
    service: str
    problems: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    modules: int = 0
    """How many modules the import step imported."""
    help: str = ""


def build_env(recipe: Recipe, context: Path, wheels: dict[str, Path], home: Path) -> Path:
    """A fresh venv holding what the Dockerfile's pip install line installs."""
    venv = home / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    done = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], env=_pip_env())
    if done.returncode != 0:
        raise RuntimeError(f"{recipe.service}: python -m venv failed:\n{done.stderr}")
    wheelhouse = str(next(iter(wheels.values())).parent.parent / "wheels")
    argv = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python")]
    argv += ["install", "-q", "--no-index", "--no-compile"]
    argv += ["--find-links", wheelhouse]
    for constraint in recipe.constraints:
        argv += ["--constraint", str(context / in_context(recipe, constraint))]
    argv += [str(wheels[in_context(recipe, p)]) for p in recipe.packages]
    done = _run(argv, env=_pip_env(), cwd=home)
    if done.returncode != 0:
        raise RuntimeError(f"{recipe.service}: pip install failed:\n{done.stderr}")
    return venv


def image_env(recipe: Recipe, venv: Path, home: Path, root: Path = ROOT) -> dict[str, str]:
    """The image's run-time environment, with its venv and mounted files mapped here."""
    env = {"PATH": os.defpath, "HOME": str(home), "LANG": "C.UTF-8"}
    for key, value in recipe.env.items():
        value = value.replace("$PATH", env.get("PATH", "")).replace("${PATH}", env["PATH"])
        env[key] = value.replace(recipe.venv, str(venv))
    for key, in_image in recipe.mounts.items():
        source = mounted_file(recipe.service, in_image, root)
        local = home / "mounts" / in_image.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, local)
        env[key] = str(local)
    return env


_IMPORT_ALL = r"""
import importlib, importlib.metadata as md, json, pkgutil, sys, sysconfig
roots = sorted({name for name, dists in md.packages_distributions().items()
                if any(d.lower().startswith("radflow") for d in dists)} | {sys.argv[1]})
failed, imported = [], []
def record(name, exc):
    failed.append({"module": name, "error": f"{type(exc).__name__}: {exc}",
                   "missing": getattr(exc, "name", None)
                   if isinstance(exc, ModuleNotFoundError) else None})
for root in roots:
    try:
        package = importlib.import_module(root)
    except Exception as exc:
        record(root, exc)
        continue
    imported.append(root)
    path = getattr(package, "__path__", None)
    if path is None:
        continue
    names = [m.name for m in pkgutil.walk_packages(path, root + ".", onerror=lambda n: None)
             if not m.name.endswith(".__main__")]
    for name in names:
        try:
            importlib.import_module(name)
            imported.append(name)
        except Exception as exc:
            record(name, exc)
stdlib = tuple({sysconfig.get_paths()[k] + "/" for k in ("stdlib", "platstdlib")})
def outside(path):
    if path.startswith(sys.prefix + "/"):
        return False
    return not path.startswith(stdlib) or "/site-packages/" in path
files = {getattr(m, "__file__", None) or "" for m in list(sys.modules.values())}
foreign = sorted(f for f in files - {""} if outside(f))
print(json.dumps({"roots": roots, "imported": imported, "failed": failed,
                  "foreign": foreign}))
"""


def _distribution_of(module: str, root: Path) -> str:
    """Where a missing top-level module comes from, as the workspace knows it (a hint):
    a radflow package of the repository, or a distribution installed in the dev venv."""
    top = module.split(".")[0]
    local = sorted([*root.glob(f"libs/*/src/{top}"), *root.glob(f"services/*/src/{top}")])
    if local:
        return f" (radflow package {local[0].parent.parent.relative_to(root)})"
    dists = metadata.packages_distributions().get(top, [])
    return f" (PyPI: {', '.join(sorted(set(dists)))})" if dists else ""


def check(recipe: Recipe, venv: Path, home: Path, root: Path = ROOT) -> Result:
    """The three checks of the module docstring; problems name the service."""
    result = Result(recipe.service)
    env = image_env(recipe, venv, home, root)
    workdir = home / "cwd"  # an empty directory: nothing importable from the checkout
    workdir.mkdir(exist_ok=True)
    program = shutil.which(recipe.entrypoint[0], path=env["PATH"])
    if program is None or not Path(program).is_relative_to(venv):
        result.problems.append(
            f"{recipe.service}: {recipe.entrypoint[0]} on the image's PATH is not the venv's"
        )
        return result
    # Imports first, writing bytecode (installed without it): the entrypoint's runs
    # then start as fast as from the image's compiled venv, with its exact environment.
    writing = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    _import_everything(recipe, str(venv / "bin" / "python"), writing, workdir, result, root)
    entrypoint = [program, *recipe.entrypoint[1:]]
    for option in ("--help", "--check-config"):
        started = time.monotonic()
        done = _run([*entrypoint, option], env=env, cwd=workdir)
        result.seconds[option.lstrip("-")] = time.monotonic() - started
        if option == "--help":
            result.help = done.stdout
        if done.returncode != 0 or (option == "--help" and "usage:" not in done.stdout):
            result.problems.append(
                f"{recipe.service}: {' '.join(recipe.entrypoint)} {option} exited "
                f"{done.returncode} with the image's environment:\n"
                f"{done.stdout}{done.stderr}".rstrip()
            )
    return result


def _import_everything(
    recipe: Recipe, python: str, env: dict[str, str], workdir: Path, result: Result, root: Path
) -> None:
    name = recipe.service
    module = recipe.entrypoint[2] if recipe.entrypoint[1:2] == ("-m",) else name
    started = time.monotonic()
    done = _run([python, "-c", _IMPORT_ALL, module], env=env, cwd=workdir)
    result.seconds["imports"] = time.monotonic() - started
    if done.returncode != 0:
        result.problems.append(f"{name}: the import check crashed:\n{done.stderr}")
        return
    report = json.loads(done.stdout)
    result.modules = len(report["imported"])
    for failure in report["failed"]:
        missing = failure["missing"]
        why = (
            f"package {missing!r} is not installed{_distribution_of(missing, root)}: "
            f"declare it in the pyproject.toml of the package that imports it"
            if missing
            else failure["error"]
        )
        result.problems.append(f"{name}: import {failure['module']} fails: {why}")
    for path in report["foreign"]:
        result.problems.append(f"{name}: loaded from outside the image's venv: {path}")


def contract(
    recipe: Recipe, context: Path, wheels: dict[str, Path], home: Path, root: Path = ROOT
) -> Result:
    """Build one service's environment in ``home`` and check it."""
    home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        venv = build_env(recipe, context, wheels, home)
    except RuntimeError as exc:
        return Result(recipe.service, problems=[str(exc)])
    built = time.monotonic() - started
    result = check(recipe, venv, home, root)
    result.seconds = {"venv": built, **result.seconds}
    return result


def run(
    root: Path = ROOT,
    work: Path | None = None,
    services: list[str] | None = None,
    jobs: int = 2,
    log: bool = False,
) -> list[Result]:
    """Build and check every service's environment (or those named) under ``work``,
    ``jobs`` at a time."""
    work = work or root / ".run" / "image-contract"
    dockerfiles = sorted(root.glob("services/*/Dockerfile"))
    recipes = [read_dockerfile(p) for p in dockerfiles]
    if services:
        recipes = [r for r in recipes if r.service in services]
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    for recipe in recipes:
        if recipe.python and recipe.python != here:
            print(
                f"note: {recipe.service}'s image runs Python {recipe.python}, "
                f"this check Python {here}",
                file=sys.stderr,
            )
    started = time.monotonic()
    context = work / "context"
    copy_context(context, root)
    wheels = build_wheels(recipes, context, work)
    if log:
        print(
            f"clean context and wheelhouse ({len(wheels)} radflow wheels): "
            f"{time.monotonic() - started:.1f} s",
            flush=True,
        )
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [
            pool.submit(contract, r, context, wheels, work / r.service, root) for r in recipes
        ]
        results = []
        for future in futures:
            result = future.result()
            results.append(result)
            if log:
                timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
                status = "ok" if not result.problems else "FAILED"
                print(f"{result.service}: {status} ({result.modules} modules; {timings})")
                for problem in result.problems:
                    print(f"  {problem}")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("services", nargs="*", help="only these (directory names)")
    parser.add_argument("--work", type=Path, help="where to build (.run/image-contract)")
    parser.add_argument("--jobs", type=int, default=2, help="services built at once")
    args = parser.parse_args()
    work = args.work or ROOT / ".run" / "image-contract"
    started = time.monotonic()
    try:
        results = run(work=work, services=args.services, jobs=args.jobs, log=True)
    except RuntimeError as exc:  # the shared wheels could not be built: pip says why
        print(f"image contract: {exc}", file=sys.stderr)
        return 1
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        f"total: {time.monotonic() - started:.1f} s "
        f"(CPU {cpu.ru_utime + cpu.ru_stime:.0f} s in its subprocesses)"
    )
    for result in results:  # a failed one's venv stays, to look into
        if not result.problems:
            shutil.rmtree(work / result.service / "venv", ignore_errors=True)
        else:
            print(f"{result.service}'s environment: {work / result.service / 'venv'}")
    return 1 if any(r.problems for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
