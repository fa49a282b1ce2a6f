"""The one lifecycle every service runs on.

A service declares its parts (consumers, background loops, HTTP routes, stop steps)
and the shell owns the rest, the same way in all five:

- states: created → starting → running → stopping → stopped (or failed);
- the operations endpoint (``/healthz``, ``/readyz`` with the broker and blob-store
  checks plus the service's own, ``/metrics``), and any routes the service adds:
  on the ops port, or, for a service with public doors (ingest's STOW-RS), on
  listeners of their own, so that probes and scrapes never share a port (or a
  network policy) with senders;
- the producer's connection, retried while the broker is away; consumers start once
  it is up;
- supervision: a consumer or loop that ends with an error while the service runs
  sets ``failed``, so the process exits non-zero (3) and Kubernetes restarts it,
  instead of serving on with part of its work silently gone;
- one stop order: readiness false, the service's drain steps (ingest closes its
  listeners), consumers hand back their work at a safe point, background loops end,
  the HTTP server finishes in-flight requests, the service's close steps, the
  producer flushes, the blob store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aiohttp import web

from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore
from radflow_core.consumer import EventConsumer
from radflow_core.kafka import EventProducer
from radflow_core.ops import Health, ReadinessCheck, ops_routes
from radflow_core.runtime import connect_producer
from radflow_core.settings import OpsSettings
from radflow_core.tls import TlsFilesUnusable

log = logging.getLogger(__name__)

Step = Callable[[], Awaitable[None]]


class State(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"


@dataclass(frozen=True)
class Door:
    """A listener serving the service's public routes, apart from the ops port."""

    name: str
    """What it is, for the logs ('STOW-RS HTTP', 'STOW-RS HTTPS')."""
    host: str
    port: int
    """0: any free port (tests read :attr:`Shell.ports`)."""
    ssl: ssl.SSLContext | None = None
    """TLS context of an HTTPS door; None: plain HTTP."""
    reuse_port: bool = False
    """Bind with SO_REUSEPORT, so that several processes (ingest's workers) share the
    port and the kernel spreads connections across them."""


class Shell:
    """Lifecycle, supervision, health and the ops server of one service process."""

    def __init__(
        self,
        name: str,
        *,
        producer: EventProducer,
        blobs: BlobStore | None,
        ops: OpsSettings,
        http_host: str,
        http_port: int,
        checks: Mapping[str, ReadinessCheck] | None = None,
        routes: Sequence[web.RouteDef] = (),
        doors: Sequence[Door] | None = None,
        http_shutdown_s: float = 10.0,
        consumer_grace_s: float = 60.0,
        audit: Auditor | None = None,
    ) -> None:
        self.name = name
        self.audit = audit
        """Writes Application Start once running and Application Stop at stop."""
        self.producer = producer
        self.blobs = blobs
        """None for a service that keeps nothing in the bucket (the ledger): readiness
        then does not depend on the blob store."""
        self.state = State.CREATED
        self.failed = asyncio.Event()
        """Set when the service cannot run (as configured, or any longer); main exits 3."""
        self.health = Health(
            {
                "broker": producer.ping,
                **({"blob_store": blobs.ping} if blobs is not None else {}),
                **(checks or {}),
            },
            cache_s=ops.readiness_cache_s,
        )
        self._http = (http_host, http_port, http_shutdown_s)
        self._routes = list(routes)
        self._doors = None if doors is None else list(doors)
        """None: the routes are served on the ops port; a list (even empty): only on
        these doors, never on the ops port."""
        self.ports: dict[str, int] = {}
        """Bound port of each listener once started: 'ops' and each door's name."""
        self._consumer_grace_s = consumer_grace_s
        self._consumers: dict[EventConsumer[Any], asyncio.Task[None] | None] = {}
        self._loops: dict[str, tuple[Callable[[], Awaitable[None]], bool]] = {}
        self._loop_tasks: list[tuple[asyncio.Task[None], bool]] = []
        self._drain: list[Step] = []
        self._close: list[Step] = []
        self._runners: list[web.AppRunner] = []
        self._connect: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        """Set once the producer is connected (consumers run from then on)."""
        self.stopping = asyncio.Event()
        """Set when the consumers have stopped: graceful loops end on it by themselves."""

    # -- what a service declares ---------------------------------------------------

    def consume(self, consumer: EventConsumer[Any]) -> None:
        """Run ``consumer`` under supervision (from the broker connection on, or now)."""
        self._consumers[consumer] = None
        if self.connected.is_set() and self.state is State.RUNNING:
            self._launch(consumer)

    async def retire(self, consumers: Sequence[EventConsumer[Any]]) -> None:
        """Stop ``consumers`` (their work handed back at a safe point) and forget them;
        the rest of the service goes on."""
        tasks = []
        for consumer in consumers:
            consumer.stop()
            task = self._consumers.pop(consumer, None)
            if task is not None:
                tasks.append(task)
        await _finish(tasks, self._consumer_grace_s)

    def loop(
        self, name: str, run: Callable[[], Awaitable[None]], *, graceful: bool = False
    ) -> None:
        """A background loop (a rule-file watcher, a release timer) that runs while the
        service runs, and is fatal if it ends with an error before. At stop, after the
        consumers, a ``graceful`` loop is awaited (it must end on :attr:`stopping`, e.g.
        after finishing a release in progress); any other is cancelled."""
        self._loops[name] = (run, graceful)

    def on_drain(self, step: Step) -> None:
        """A stop step run right after readiness turns false, before consumers stop
        (close listeners, let open associations finish)."""
        self._drain.append(step)

    def on_close(self, step: Step) -> None:
        """A stop step run after consumers, loops and the HTTP server have stopped, before
        the producer flushes (close clients, worker pools)."""
        self._close.append(step)

    def cannot_run(self, message: str, problems: Sequence[str] = ()) -> None:
        """Record that the service cannot run as configured; main exits non-zero."""
        log.critical(message, extra={"problems": list(problems)})
        self.state = State.FAILED
        self.failed.set()

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Serve the ops endpoint and the service's routes (with the ops routes, or on
        the service's doors when it declared any), then connect to the broker and start
        consumers and loops in the background."""
        if self.failed.is_set():
            return
        self.state = State.STARTING
        if self.audit is not None:
            try:
                await self.audit.start()
            except TlsFilesUnusable as exc:
                self.cannot_run("audit syslog TLS files unusable", [str(exc)])
                return
        host, port, _ = self._http
        ops = web.Application()
        ops.add_routes(ops_routes(self.health))
        if self._doors is not None:
            public = web.Application()
            public.add_routes(self._routes)
            runner = await self._serve(public)
            for door in self._doors:
                self.ports[door.name] = await _listen(
                    runner, door.host, door.port, door.ssl, reuse_port=door.reuse_port
                )
                log.info(
                    "%s listening",
                    door.name,
                    extra={"host": door.host, "port": self.ports[door.name]},
                )
        else:
            ops.add_routes(self._routes)
        self.ports["ops"] = await _listen(await self._serve(ops), host, port, None)
        log.info("HTTP listening", extra={"host": host, "port": self.ports["ops"]})
        for name, (run, graceful) in self._loops.items():
            self._loop_tasks.append((self._supervised(name, run), graceful))
        self.state = State.RUNNING
        self._connect = asyncio.create_task(self._connected())

    async def _serve(self, app: web.Application) -> web.AppRunner:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=self._http[2])
        await runner.setup()
        self._runners.append(runner)
        return runner

    async def _connected(self) -> None:
        if not await connect_producer(self.producer, self.failed):
            self.state = State.FAILED
            return
        self.connected.set()
        if self.audit is not None:
            self.audit.application_started()
        for consumer in list(self._consumers):
            self._launch(consumer)
        if self._consumers:
            log.info("consuming", extra={"count": len(self._consumers)})

    def _launch(self, consumer: EventConsumer[Any]) -> None:
        self._consumers[consumer] = self._supervised(f"consumer {consumer.group}", consumer.run)

    def _supervised(self, name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run ``run``; an error while the service runs makes the service exit (a loop
        with nothing to do may return)."""

        async def supervise() -> None:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception:
                if self.state is State.RUNNING:
                    log.exception("%s stopped unexpectedly; the service exits", name)
                    self.state = State.FAILED
                    self.failed.set()

        return asyncio.create_task(supervise(), name=name)

    async def stop(self) -> None:
        """Stop in the fixed order (module docstring); safe to call twice."""
        if self.state in (State.STOPPING, State.STOPPED):
            return
        self.state = State.STOPPING
        self.health.stopping = True
        for step in self._drain:
            await _logged(step)
        for consumer in self._consumers:
            consumer.stop()
        await _finish(
            [t for t in self._consumers.values() if t is not None], self._consumer_grace_s
        )
        self.stopping.set()
        await _finish([t for t, graceful in self._loop_tasks if graceful], self._consumer_grace_s)
        for task in [self._connect, *(t for t, _ in self._loop_tasks)]:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for runner in self._runners:  # the doors first, the ops port last
            await runner.cleanup()
        for step in self._close:
            await _logged(step)
        if self.audit is not None:
            self.audit.application_stopped()
            await self.audit.stop()
        await self.producer.stop()
        if self.blobs is not None:
            self.blobs.close()
        self.state = State.STOPPED
        log.info("stopped")


async def _listen(
    runner: web.AppRunner,
    host: str,
    port: int,
    context: ssl.SSLContext | None,
    *,
    reuse_port: bool = False,
) -> int:
    """Open one listener of ``runner``; returns the port it is bound to."""
    site = web.TCPSite(runner, host, port, ssl_context=context, reuse_port=reuse_port or None)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or ()
    return int(sockets[0].getsockname()[1]) if sockets else port


async def _finish(tasks: Sequence[asyncio.Task[None]], timeout_s: float) -> None:
    """Let ``tasks`` end on their own for up to ``timeout_s``, then cancel them."""
    if not tasks:
        return
    _, late = await asyncio.wait(tasks, timeout=timeout_s)
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late)


async def _logged(step: Step) -> None:
    try:
        await step()
    except Exception:
        log.exception("a stop step failed; stopping the rest")
