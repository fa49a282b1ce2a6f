"""Several ingest processes in one pod (RADFLOW_INGEST_WORKERS > 1), so that one pod
uses its cores: pynetdicom serves each association in a thread of one interpreter,
and the GIL holds one process to about one core however many associations it serves.

Each worker is a full ingest (``python -m ingest --worker I --worker-dir D``): its own
broker producer, S3 client and claim check, listeners on the public ports bound with
SO_REUSEPORT so that the kernel spreads connections across the workers, and its
operations endpoint on a loopback port of its own, which it writes to ``D``. Every
instance is still acknowledged by the worker that received it, only once its bytes
are in S3 and its event is acknowledged by Kafka: nothing passes between workers.

The parent (:class:`WorkerPool`) imports no DICOM, broker or S3 code and holds no
client. It

- serves the pod's operations port: ``/metrics`` from the files the workers' metrics
  write (prometheus_client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set in
  each worker's environment before it starts, so before it imports prometheus_client),
  chosen over scraping and summing the workers' own /metrics because a counter then
  keeps what a worker that died had counted, and no text format is parsed; ``/readyz``
  asks every worker and is ready only when all are; ``/healthz`` fails while a running
  worker's event loop does not answer;
- restarts a worker that exits while the pod runs, after a jittered backoff, and logs
  it; if workers exit more than :data:`CRASH_LIMIT` times within
  :data:`CRASH_WINDOW_S`, it stops the others and exits 3, so Kubernetes restarts the
  pod instead of it serving on at a fraction of its capacity;
- on SIGTERM sends SIGTERM to every worker, each of which stops as a single ingest
  does (readiness false, listeners closed, associations and requests finished,
  producer flushed), waits for all, and exits 0.

A worker dies with its parent (PR_SET_PDEATHSIG): a parent killed outright leaves no
worker serving the ports without supervision. Audit Application Start/Stop messages
are written per worker, each by the worker's own producer: a worker restarted after a
crash writes a start with no stop before it, which is what happened.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    generate_latest,
    multiprocess,
)

from ingest.settings import IngestConfig
from radflow_core.retry import backoff_delay

log = logging.getLogger(__name__)

CRASH_LIMIT = 5
"""Worker exits (any worker) within :data:`CRASH_WINDOW_S` that make the pod give up."""
CRASH_WINDOW_S = 120.0
STEADY_S = 60.0
"""A worker that ran this long before exiting restarts after the shortest backoff."""
ASK_TIMEOUT_S = 10.0
"""How long /readyz waits for a worker's answer (a worker's own /readyz may wait for
the broker; the Deployment's readiness probe allows 12 s)."""
ALIVE_TIMEOUT_S = 3.0
"""How long /healthz waits for a worker's event loop to answer."""
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class WorkerRole:
    """What a worker process is told by its parent, on its command line."""

    index: int
    folder: Path
    """The parent's folder: worker-<index>.json (pid and ops port), metrics/."""

    def announce(self, ops_port: int) -> None:
        """Tell the parent where this worker's operations endpoint listens (written
        whole, then renamed, so the parent never reads half of it)."""
        final = self.folder / f"worker-{self.index}.json"
        partial = final.with_suffix(".partial")
        partial.write_text(json.dumps({"pid": os.getpid(), "ops_port": ops_port}))
        partial.replace(final)


def split_worker_arguments(argv: list[str]) -> tuple[WorkerRole | None, list[str]]:
    """The worker role the parent put on the command line (not in --help: it is no
    setting of the user's), and the rest of the arguments."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--worker", type=int)
    parser.add_argument("--worker-dir", type=Path)
    known, rest = parser.parse_known_args(argv)
    if known.worker is None or known.worker_dir is None:
        return None, argv
    return WorkerRole(known.worker, known.worker_dir), rest


def _die_with_parent() -> None:
    """Run in the worker between fork and exec: SIGTERM when the parent dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    task: asyncio.Task[None] | None = None
    restarts: int = 0

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid


@dataclass
class _Answer:
    ok: bool
    detail: Any
    pid: int | None = None


@dataclass
class _Crashes:
    times: list[float] = field(default_factory=list)

    def add(self) -> bool:
        """Count one; True when the limit is passed."""
        now = time.monotonic()
        self.times = [t for t in self.times if now - t < CRASH_WINDOW_S] + [now]
        return len(self.times) > CRASH_LIMIT


class WorkerPool:
    """The parent of RADFLOW_INGEST_WORKERS ingest processes (module docstring)."""

    def __init__(self, config: IngestConfig, command: list[str] | None = None) -> None:
        self._config = config
        settings = config.ingest
        self._command = command or [sys.executable, "-m", "ingest"]
        self.failed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._stopped = False
        self._folder = Path(tempfile.mkdtemp(prefix="radflow-ingest-workers-"))
        self._metrics_dir = self._folder / "metrics"
        self._metrics_dir.mkdir()
        self._workers = [_Worker(i) for i in range(settings.workers)]
        self._crashes = _Crashes()
        self._registry = CollectorRegistry()
        self._restarts = Counter(
            "radflow_ingest_worker_restarts_total",
            "Ingest worker processes that exited while the pod ran and were restarted.",
            ["worker"],
            registry=self._registry,
        )
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.ops_port: int | None = None
        # A worker's stop: its association grace and STOW-RS grace, draining, the
        # producer's flush; then it is killed.
        self._stop_timeout_s = 2 * settings.shutdown_grace_s + 30.0

    async def start(self) -> None:
        """Serve the ops port, then start the workers (each restarted if it exits).

        Raises:
            OSError: the ops port cannot be bound.
        """
        settings = self._config.ingest
        app = web.Application()
        app.add_routes(
            [
                web.get("/healthz", self._healthz),
                web.get("/readyz", self._readyz),
                web.get("/metrics", self._metrics),
            ]
        )
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.http_host, settings.ops_port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or ()
        self.ops_port = int(sockets[0].getsockname()[1]) if sockets else settings.ops_port
        self._session = aiohttp.ClientSession()
        log.info(
            "ingest workers starting",
            extra={"count": len(self._workers), "host": settings.http_host, "port": self.ops_port},
        )
        for worker in self._workers:
            worker.task = asyncio.create_task(
                self._supervise(worker), name=f"worker {worker.index}"
            )

    async def _supervise(self, worker: _Worker) -> None:
        try:
            await self._keep(worker)
        except Exception:  # a worker that cannot even be started: the pod cannot run
            log.exception("cannot run worker", extra={"worker": worker.index})
            self.failed.set()

    async def _spawn(self, worker: _Worker) -> asyncio.subprocess.Process:
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(self._metrics_dir)}
        argv = [
            *self._command,
            "--worker",
            str(worker.index),
            "--worker-dir",
            str(self._folder),
        ]
        return await asyncio.create_subprocess_exec(*argv, env=env, preexec_fn=_die_with_parent)

    async def _keep(self, worker: _Worker) -> None:
        """Run worker ``worker`` until the pool stops, restarting it when it exits."""
        attempt = 0
        while not self._stopping.is_set():
            started = time.monotonic()
            process = await self._spawn(worker)
            worker.process = process
            log.info("worker started", extra={"worker": worker.index, "pid": process.pid})
            code = await process.wait()
            self._forget(worker, process.pid)
            if self._stopping.is_set():
                log.info(
                    "worker stopped",
                    extra={"worker": worker.index, "pid": process.pid, "exit_code": code},
                )
                return
            worker.restarts += 1
            self._restarts.labels(worker=str(worker.index)).inc()
            if self._crashes.add():
                log.critical(
                    "ingest workers keep exiting; stopping the pod",
                    extra={"worker": worker.index, "pid": process.pid, "exit_code": code},
                )
                self.failed.set()
                return
            attempt = 1 if time.monotonic() - started >= STEADY_S else attempt + 1
            delay = backoff_delay(attempt, 0.5, 30.0)
            log.error(
                "worker exited unexpectedly; restarting it",
                extra={
                    "worker": worker.index,
                    "pid": process.pid,
                    "exit_code": code,
                    "restarts": worker.restarts,
                    "duration_ms": round(delay * 1000),
                },
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    def _forget(self, worker: _Worker, pid: int) -> None:
        """A worker's process has ended: its live gauges and its ops port go."""
        worker.process = None
        multiprocess.mark_process_dead(pid, str(self._metrics_dir))  # type: ignore[no-untyped-call]
        with contextlib.suppress(FileNotFoundError):
            (self._folder / f"worker-{worker.index}.json").unlink()

    # -- the pod's operations endpoint ----------------------------------------------

    def _ops_port_of(self, worker: _Worker) -> int | None:
        """The ops port the running process of ``worker`` announced, if it did."""
        try:
            announced = json.loads((self._folder / f"worker-{worker.index}.json").read_text())
        except (OSError, ValueError):
            return None
        if announced.get("pid") != worker.pid:
            return None  # left by a previous process of this worker
        return int(announced["ops_port"])

    async def _ask(self, worker: _Worker, path: str, timeout_s: float) -> _Answer:
        pid = worker.pid
        if pid is None:
            return _Answer(False, "restarting")
        port = self._ops_port_of(worker)
        if port is None:
            return _Answer(False, "starting", pid)
        assert self._session is not None
        try:
            async with self._session.get(
                f"http://127.0.0.1:{port}{path}",
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as answer:
                body = await answer.json(content_type=None)
                return _Answer(answer.status == 200, body, pid)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return _Answer(False, f"no answer: {type(exc).__name__}", pid)

    async def _readyz(self, _: web.Request) -> web.Response:
        if self._stopping.is_set():
            return web.json_response(
                {"ready": False, "checks": {"service": "shutting down"}}, status=503
            )
        answers = await asyncio.gather(
            *(self._ask(w, "/readyz", ASK_TIMEOUT_S) for w in self._workers)
        )
        checks: dict[str, str] = {}
        workers: dict[str, Any] = {}
        for worker, answer in zip(self._workers, answers, strict=True):
            detail = answer.detail
            if answer.ok:
                checks[f"worker {worker.index}"] = "ok"
            elif isinstance(detail, dict):
                failing = {k: v for k, v in detail.get("checks", {}).items() if v != "ok"}
                checks[f"worker {worker.index}"] = "; ".join(
                    f"{k}: {v}" for k, v in failing.items()
                )
            else:
                checks[f"worker {worker.index}"] = str(detail)
            workers[str(worker.index)] = {
                "pid": answer.pid,
                "ready": answer.ok,
                "restarts": worker.restarts,
                "checks": detail.get("checks") if isinstance(detail, dict) else detail,
            }
        ready = all(a.ok for a in answers)
        return web.json_response(
            {"ready": ready, "checks": checks, "workers": workers}, status=200 if ready else 503
        )

    async def _healthz(self, _: web.Request) -> web.Response:
        """Alive while every worker that has announced itself answers (one starting or
        waiting for its restart is the pool's business, not a reason to restart the
        pod; one whose event loop hangs is)."""
        if self._stopping.is_set():  # workers close their ops ports as they stop
            return web.json_response({"alive": True, "workers": "stopping"})
        answers = await asyncio.gather(
            *(self._ask(w, "/healthz", ALIVE_TIMEOUT_S) for w in self._workers)
        )
        hung = [
            w.index
            for w, a in zip(self._workers, answers, strict=True)
            if not a.ok and a.detail not in ("starting", "restarting")
        ]
        body = {
            "alive": not hung,
            "workers": {
                str(w.index): {"pid": a.pid, "alive": a.ok or a.detail}
                for w, a in zip(self._workers, answers, strict=True)
            },
        }
        return web.json_response(body, status=503 if hung else 200)

    async def _metrics(self, _: web.Request) -> web.Response:
        body = await asyncio.to_thread(self._render_metrics)
        response = web.Response(body=body)
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    def _render_metrics(self) -> bytes:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self._metrics_dir))  # type: ignore[no-untyped-call]
        return generate_latest(registry) + generate_latest(self._registry)

    # -- stopping -------------------------------------------------------------------

    async def stop(self) -> None:
        """SIGTERM to every worker, wait for each to finish its graceful stop (killed
        after the time that takes at most), close the ops port. Safe twice."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        for worker in self._workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        tasks = [w.task for w in self._workers if w.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._stop_timeout_s)
            for worker in self._workers:
                if worker.task in late and worker.process is not None:
                    log.error(
                        "worker did not stop in time; killing it",
                        extra={"worker": worker.index, "pid": worker.pid},
                    )
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            if late:
                await asyncio.wait(late)
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()
        shutil.rmtree(self._folder, ignore_errors=True)
        log.info("ingest workers stopped")
