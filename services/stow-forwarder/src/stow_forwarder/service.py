"""The forwarder's lifecycle: destinations from the rule file (STOW-RS and DIMSE;
report-return's are left to it), one consumer per destination and lane, ops endpoint.

Each destination has its own consumer groups (``<prefix>.<destination>.stat`` and
``.routine``), so a destination that is down holds back only its own requests, and
its lag is its backlog. The STAT consumer runs beside the routine one and takes the
destination first. On SIGTERM every consumer stops after the request on the wire;
what was not acknowledged is not committed and is read again.

The rule file is watched like the router watches it: a destination added, changed or
removed starts, restarts or stops on its own, without touching the others. Requests
routed to a new destination before the change was seen wait in the topic for it.
Requests for a destination the rule file does not define are reported by the consumers
of :mod:`stow_forwarder.unknown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from aiohttp import web

from radflow_core.blobstore import BlobStore
from radflow_core.errors import ConfigurationError
from radflow_core.events import LANES, ForwardRequested
from radflow_core.kafka import EventConsumer, EventProducer
from radflow_core.ops import Health, ops_routes
from radflow_core.runtime import connect_producer, finish, start_http
from radflow_core.topics import Topic
from router.destinations import DestinationKind
from router.live_rules import LiveRules, RulesMetrics
from router.loader import RuleFileError
from router.rules import Destination, RuleSet
from stow_forwarder import metrics
from stow_forwarder.answer import DestinationClient
from stow_forwarder.client import StowClient
from stow_forwarder.delivery import Deliverer
from stow_forwarder.dimse import DimseClient
from stow_forwarder.settings import ForwarderConfig
from stow_forwarder.unknown import unknown_destination_consumers

log = logging.getLogger(__name__)

SERVICE = "stow-forwarder"
UNKNOWN = "(unknown destinations)"
"""How the consumers of requests for undefined destinations are named in logs."""
RULES_METRICS = RulesMetrics(metrics.RULES_GENERATION, metrics.RULES_VALID, metrics.RULES_RELOADS)


def delivered_here(rules: RuleSet) -> dict[str, Destination]:
    return {
        name: d
        for name, d in rules.destinations.items()
        if d.kind is not DestinationKind.REPORT_RETURN
    }


@dataclass
class Running:
    """One destination being delivered to: its client, deliverer and two consumers."""

    destination: Destination
    client: DestinationClient
    deliverer: Deliverer
    consumers: list[EventConsumer[ForwardRequested]]
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


class ForwarderService:
    def __init__(self, config: ForwarderConfig) -> None:
        self._config = config
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._stopping = asyncio.Event()
        self._rules = LiveRules(config.forwarder.rules_file, RULES_METRICS)
        self.running: dict[str, Running] = {}
        self.health = Health(
            {"broker": self._producer.ping, "blob_store": self._blobs.ping},
            cache_s=config.ops.readiness_cache_s,
        )
        self.failed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False
        self._consuming = False
        self._unknown: list[EventConsumer[ForwardRequested]] = []
        """Consumers reporting requests for destinations the rule file does not define."""
        self._unknown_tasks: list[asyncio.Task[None]] = []

    @property
    def deliverers(self) -> dict[str, Deliverer]:
        return {name: r.deliverer for name, r in self.running.items()}

    def _build(self, destination: Destination) -> Running:
        """Raises ConfigurationError (e.g. a referenced secret is missing)."""
        settings = self._config.forwarder
        kafka = self._config.kafka
        client: DestinationClient = (
            DimseClient(destination, settings)
            if destination.kind is DestinationKind.DIMSE
            else StowClient(destination, settings)
        )
        deliverer = Deliverer(
            destination, client, self._blobs, self._producer, settings, self._stopping
        )
        consumers = [
            EventConsumer(
                kafka,
                service=SERVICE,
                group_id=f"{settings.group_prefix}.{destination.name}.{lane.value}",
                topics=[kafka.topic(lane.topic(Topic.FORWARD_REQUESTED))],
                model=ForwardRequested,
                batch_handler=deliverer.handle_batch,
                producer=self._producer,
                dead_letter_topic=kafka.topic(Topic.INSTANCE_FAILED),
                # Several batches per fetch, so the next is staged while one is on
                # the wire instead of waiting for the commit and the next fetch.
                max_records=max(100, 4 * destination.max_batch),
            )
            for lane in LANES
        ]
        return Running(destination, client, deliverer, consumers)

    async def start(self) -> None:
        settings = self._config.forwarder
        # The bucket client blocks, so its calls run in the loop's default executor,
        # which Python sizes by CPU count (6 threads on 2 cores): fewer than the requests
        # a deliverer keeps in flight while it stages one batch and settles another.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=4 * settings.io_concurrency, thread_name_prefix="io")
        )
        try:
            rules = self._rules.load()
            self.running = {name: self._build(d) for name, d in delivered_here(rules).items()}
        except (RuleFileError, ConfigurationError) as exc:
            log.critical(
                "cannot deliver with this configuration; not starting",
                extra={"problems": str(exc).splitlines()},
            )
            self.failed.set()
            return
        metrics.DESTINATIONS.set(len(self.running))
        log.info(
            "destinations loaded",
            extra={"destinations": sorted(self.running), "rules_digest": rules.digest},
        )
        self._runner = await start_http(
            ops_routes(self.health), settings.http_host, settings.http_port
        )
        self._tasks = [asyncio.create_task(self._run())]

    async def _run(self) -> None:
        if not await connect_producer(self._producer, self.failed):
            return
        self._consuming = True
        for running in self.running.values():
            self._launch(running)
        self._unknown = unknown_destination_consumers(
            lambda: self._rules.current,
            self._producer,
            self._stopping,
            self._config.kafka,
            self._config.forwarder,
            SERVICE,
        )
        self._unknown_tasks = [
            asyncio.create_task(self._consume(UNKNOWN, c)) for c in self._unknown
        ]
        log.info("consuming", extra={"count": 2 * len(self.running) + len(self._unknown)})
        await self._rules.watch(self._config.forwarder.reload_interval_s, self._apply)

    def _launch(self, running: Running) -> None:
        name = running.destination.name
        running.tasks = [asyncio.create_task(self._consume(name, c)) for c in running.consumers]

    async def _consume(self, name: str, consumer: EventConsumer[ForwardRequested]) -> None:
        try:
            await consumer.run()
        except Exception:
            log.exception("a consumer stopped unexpectedly", extra={"destination": name})
            self.failed.set()

    async def _apply(self, rules: RuleSet) -> None:
        """Start, restart or stop destinations so that the running ones match ``rules``."""
        wanted = delivered_here(rules)
        for name in sorted(set(self.running) | set(wanted)):
            old, new = self.running.get(name), wanted.get(name)
            if old is not None and old.destination == new:
                continue
            if old is not None:
                await self._retire(self.running.pop(name))
            if new is None:
                log.info("destination removed", extra={"destination": name})
                continue
            try:
                running = self._build(new)
            except ConfigurationError as exc:
                log.error(  # noqa: TRY400 - the problem is the message, no traceback wanted
                    "destination not started; fix its configuration",
                    extra={"destination": name, "problems": str(exc).splitlines()},
                )
                continue
            self.running[name] = running
            self._launch(running)
            log.info(
                "destination changed" if old is not None else "destination added",
                extra={"destination": name},
            )
        metrics.DESTINATIONS.set(len(self.running))

    async def _retire(self, running: Running) -> None:
        """Stop one destination's consumers after the request in hand, then its client."""
        for consumer in running.consumers:
            consumer.stop()
        for task in running.tasks:
            await finish(task)
        await running.client.close()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.health.stopping = True
        self._stopping.set()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for consumer in self._unknown:
            consumer.stop()
        await asyncio.gather(
            *(self._retire(r) for r in self.running.values()),
            *(finish(t) for t in self._unknown_tasks),
        )
        await self._producer.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self._blobs.close()
        log.info("stopped")
