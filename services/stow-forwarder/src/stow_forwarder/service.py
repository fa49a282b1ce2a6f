"""The forwarder's lifecycle: destinations from the rule file (STOW-RS and DIMSE;
report-return's are left to it), one consumer per destination and lane, ops endpoint.

Each destination has its own consumer groups (``<prefix>.<destination>.stat`` and
``.routine``), so a destination that is down holds back only its own requests, and
its lag is its backlog. The STAT consumer runs beside the routine one and takes the
destination first. On SIGTERM every consumer stops after the request on the wire;
what was not acknowledged is not committed and is read again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from radflow_core.blobstore import BlobStore
from radflow_core.errors import ConfigurationError
from radflow_core.events import ForwardRequested, Lane
from radflow_core.kafka import EventConsumer, EventProducer
from radflow_core.ops import Health, ops_routes
from radflow_core.runtime import connect_producer, start_http
from radflow_core.topics import Topic
from router.destinations import DestinationKind
from router.loader import RuleFileError, load_file
from stow_forwarder.answer import DestinationClient
from stow_forwarder.client import StowClient
from stow_forwarder.delivery import Deliverer
from stow_forwarder.dimse import DimseClient
from stow_forwarder.settings import ForwarderConfig

log = logging.getLogger(__name__)

SERVICE = "stow-forwarder"
LANE_TOPICS = {Lane.STAT: Topic.FORWARD_REQUESTED_STAT, Lane.ROUTINE: Topic.FORWARD_REQUESTED}


class ForwarderService:
    def __init__(self, config: ForwarderConfig) -> None:
        self._config = config
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._stopping = asyncio.Event()
        self._clients: list[DestinationClient] = []
        self._consumers: list[EventConsumer[ForwardRequested]] = []
        self.deliverers: dict[str, Deliverer] = {}
        self.health = Health(
            {"broker": self._producer.ping, "blob_store": self._blobs.ping},
            cache_s=config.ops.readiness_cache_s,
        )
        self.failed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    def _build(self) -> None:
        settings = self._config.forwarder
        kafka = self._config.kafka
        rules = load_file(settings.rules_file)
        for destination in rules.destinations.values():
            if destination.kind is DestinationKind.REPORT_RETURN:
                continue  # report-return's, not ours
            client: DestinationClient = (
                DimseClient(destination, settings)
                if destination.kind is DestinationKind.DIMSE
                else StowClient(destination, settings)
            )
            self._clients.append(client)
            deliverer = Deliverer(
                destination, client, self._blobs, self._producer, settings, self._stopping
            )
            self.deliverers[destination.name] = deliverer
            for lane, topic in LANE_TOPICS.items():
                self._consumers.append(
                    EventConsumer(
                        kafka,
                        service=SERVICE,
                        group_id=f"{settings.group_prefix}.{destination.name}.{lane.value}",
                        topics=[kafka.topic(topic)],
                        model=ForwardRequested,
                        batch_handler=deliverer.handle_batch,
                        producer=self._producer,
                        dead_letter_topic=kafka.topic(Topic.INSTANCE_FAILED),
                    )
                )
        log.info(
            "destinations loaded",
            extra={"destinations": sorted(self.deliverers), "rules_digest": rules.digest},
        )

    async def start(self) -> None:
        settings = self._config.forwarder
        try:
            self._build()
        except (RuleFileError, ConfigurationError) as exc:
            log.critical(
                "cannot deliver with this configuration; not starting",
                extra={"problems": str(exc).splitlines()},
            )
            self.failed.set()
            return
        self._runner = await start_http(
            ops_routes(self.health), settings.http_host, settings.http_port
        )
        self._tasks = [asyncio.create_task(self._run())]

    async def _run(self) -> None:
        if not await connect_producer(self._producer, self.failed):
            return
        runs = [asyncio.create_task(c.run()) for c in self._consumers]
        log.info("consuming", extra={"count": len(runs)})
        try:
            for finished in asyncio.as_completed(runs):
                await finished
        except Exception:
            log.exception("a consumer stopped unexpectedly")
            self.failed.set()
            for consumer in self._consumers:
                consumer.stop()
            await asyncio.gather(*runs, return_exceptions=True)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.health.stopping = True
        self._stopping.set()
        for consumer in self._consumers:
            consumer.stop()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, timeout=60)
            except TimeoutError:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        for client in self._clients:
            await client.close()
        await self._producer.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self._blobs.close()
        log.info("stopped")
