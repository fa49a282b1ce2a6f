"""The ingest service's lifecycle: receivers wired to the claim check, on the shared
shell.

On stop, readiness turns false first (Kubernetes stops sending), the DIMSE listener
closes and open associations get a grace period, in-flight STOW-RS requests finish,
pending work is drained, and only then the producer flushes and closes. The broker
connection is retried in the background; until it is up, senders get 0xA7xx / 503.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

from ingest.claimcheck import ClaimCheck
from ingest.dimse import DimseReceiver
from ingest.lanes import Lanes
from ingest.settings import IngestConfig
from ingest.stowrs import StowReceiver
from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore
from radflow_core.kafka import EventProducer
from radflow_core.shell import Shell, State

log = logging.getLogger(__name__)

SERVICE = "ingest"


class IngestService:
    def __init__(self, config: IngestConfig) -> None:
        self._config = config
        settings = config.ingest
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._audit = Auditor(SERVICE, self._producer, config.audit)
        self._lanes = Lanes(settings.rules_file)
        self._claim_check = ClaimCheck(
            self._blobs,
            self._producer,
            max_instance_bytes=settings.max_instance_bytes,
            lookup_above_bytes=config.s3.part_size,
            lanes=self._lanes,
            max_sequence_depth=settings.max_sequence_depth,
            audit=self._audit,
        )
        self.shell = Shell(
            SERVICE,
            producer=self._producer,
            blobs=self._blobs,
            ops=config.ops,
            http_host=settings.http_host,
            http_port=settings.http_port,
            routes=StowReceiver(settings, self._claim_check).routes(),
            http_shutdown_s=settings.shutdown_grace_s,
            audit=self._audit,
        )
        self.health = self.shell.health
        self.failed = self.shell.failed
        self.shell.loop(
            "rule file watcher", functools.partial(self._lanes.watch, settings.reload_interval_s)
        )
        self.shell.on_drain(self._close_dimse)
        self.shell.on_close(self._drain_claim_checks)
        self._dimse: DimseReceiver | None = None

    @property
    def state(self) -> State:
        return self.shell.state

    async def start(self) -> None:
        """Open the listeners; the broker connection is retried in the background."""
        settings = self._config.ingest
        self._lanes.load()
        await self.shell.start()
        loop = asyncio.get_running_loop()
        # Blob I/O runs in the loop's default executor; size it for every association,
        # each claim check making two blob calls at once.
        loop.set_default_executor(
            ThreadPoolExecutor(2 * settings.max_associations + 8, thread_name_prefix="blob-io")
        )
        self._dimse = DimseReceiver(settings, self._claim_check, loop, audit=self._audit)
        self._dimse.start()

    async def _close_dimse(self) -> None:
        if self._dimse is not None:
            await self._dimse.stop(self._config.ingest.shutdown_grace_s)

    async def _drain_claim_checks(self) -> None:
        await self._claim_check.drain(timeout_s=5.0)

    async def stop(self) -> None:
        await self.shell.stop()

    @property
    def dimse_port(self) -> int:
        if self._dimse is None:
            raise RuntimeError("not started")
        return self._dimse.port

    @property
    def dimse_tls_port(self) -> int:
        if self._dimse is None:
            raise RuntimeError("not started")
        return self._dimse.tls_port
