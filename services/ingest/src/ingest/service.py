"""The ingest service's lifecycle: wire receivers to the claim check, start, stop.

States: created → starting → running → stopping → stopped. ``stop()`` is safe to call
twice. On stop, readiness turns false first (Kubernetes stops sending), the DIMSE
listener closes and open associations get a grace period, in-flight STOW-RS requests
finish, pending work is drained, and only then the producer flushes and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum

from aiohttp import web

from ingest.claimcheck import ClaimCheck
from ingest.dimse import DimseReceiver
from ingest.lanes import Lanes
from ingest.settings import IngestConfig
from ingest.stowrs import StowReceiver
from radflow_core.blobstore import BlobStore
from radflow_core.kafka import EventProducer
from radflow_core.ops import Health, ops_routes
from radflow_core.runtime import connect_producer

log = logging.getLogger(__name__)

SERVICE = "ingest"


class State(StrEnum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class IngestService:
    def __init__(self, config: IngestConfig) -> None:
        self._config = config
        self.state = State.CREATED
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._lanes = Lanes(config.ingest.rules_file)
        self._claim_check = ClaimCheck(
            self._blobs,
            self._producer,
            max_instance_bytes=config.ingest.max_instance_bytes,
            lookup_above_bytes=config.s3.part_size,
            lanes=self._lanes,
        )
        self.health = Health(
            {"broker": self._producer.ping, "blob_store": self._blobs.ping},
            cache_s=config.ops.readiness_cache_s,
        )
        self._dimse: DimseReceiver | None = None
        self._runner: web.AppRunner | None = None
        self._connect_task: asyncio.Task[bool] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.failed = asyncio.Event()
        """Set when the service cannot run as configured; ``main`` then exits non-zero."""

    async def start(self) -> None:
        """Open the listeners; the broker connection is retried in the background."""
        self.state = State.STARTING
        settings = self._config.ingest
        self._lanes.load()
        self._watch_task = asyncio.create_task(self._lanes.watch(settings.reload_interval_s))
        app = web.Application()
        app.add_routes(StowReceiver(settings, self._claim_check).routes())
        app.add_routes(ops_routes(self.health))
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=settings.shutdown_grace_s
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, settings.http_host, settings.http_port)
        await site.start()
        log.info("HTTP listening", extra={"host": settings.http_host, "port": settings.http_port})
        loop = asyncio.get_running_loop()
        # Blob I/O runs in the loop's default executor; size it for every association,
        # each claim check making two blob calls at once.
        loop.set_default_executor(
            ThreadPoolExecutor(2 * settings.max_associations + 8, thread_name_prefix="blob-io")
        )
        self._dimse = DimseReceiver(settings, self._claim_check, loop)
        self._dimse.start()
        self._connect_task = asyncio.create_task(connect_producer(self._producer, self.failed))
        self.state = State.RUNNING

    async def stop(self) -> None:
        if self.state in (State.STOPPING, State.STOPPED):
            return
        self.state = State.STOPPING
        self.health.stopping = True
        grace = self._config.ingest.shutdown_grace_s
        if self._dimse is not None:
            await self._dimse.stop(grace)
        if self._runner is not None:
            await self._runner.cleanup()
        for task in (self._connect_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._claim_check.drain(timeout_s=5.0)
        await self._producer.stop()
        self._blobs.close()
        self.state = State.STOPPED
        log.info("stopped")

    @property
    def dimse_port(self) -> int:
        if self._dimse is None:
            raise RuntimeError("not started")
        return self._dimse.port
