"""The router's lifecycle: rules, ops endpoint, producer, and per lane (STAT and
routine) a consumer with its pending-study state and release loop; the rule-file
watcher.

The STAT lane reads ``dicom.instance.normalized.stat`` (consumer group
``<group>.stat``) beside the routine lane, so a STAT instance is never behind a
routine backlog; the two lanes share the rules and the producer, and each keeps its
studies waiting to be complete in its own changelog.

It does not start on an invalid rule file (exit 3 with every problem logged); once
running, an invalid change never stops it. On SIGTERM the consumers finish the
record in hand, a release in progress is finished, and the producer flushes; pending
studies stay in the changelog for whoever owns their partition next.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from dataclasses import dataclass, field

from aiohttp import web
from aiokafka import TopicPartition

from radflow_core.blobstore import BlobStore
from radflow_core.events import LANES, ForwardRequested, InstanceNormalized, Lane
from radflow_core.kafka import EventConsumer, EventProducer
from radflow_core.ops import Health, ops_routes
from radflow_core.runtime import connect_producer, finish, start_http
from radflow_core.topics import Topic
from radflow_rules.live import LiveRules, RulesMetrics
from radflow_rules.loader import RuleFileError
from router import metrics
from router.pending import PendingStudies
from router.routing import Router
from router.settings import RouterConfig

log = logging.getLogger(__name__)

SERVICE = "router"
RULES_METRICS = RulesMetrics(metrics.RULES_GENERATION, metrics.RULES_VALID, metrics.RULES_RELOADS)


@dataclass
class LaneConsumer:
    """One lane's input: its consumer, and the pending studies of its partitions."""

    lane: Lane
    pending: PendingStudies
    consumer: EventConsumer[InstanceNormalized] = field(init=False)


class RouterService:
    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        settings = config.router
        kafka = config.kafka
        self._rules = LiveRules(settings.rules_file, RULES_METRICS)
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(kafka, SERVICE)
        self._lanes: list[LaneConsumer] = []
        for lane in LANES:
            pending = PendingStudies(
                kafka,
                self._producer,
                kafka.topic(lane.topic(Topic.ROUTER_PENDING)),
                self._emit,
                lane,
            )
            router = Router(
                self._rules,
                self._blobs,
                self._producer,
                kafka,
                pending,
                settings.header_limit_bytes,
            )
            if lane is Lane.ROUTINE:
                self._router = router
            one = LaneConsumer(lane, pending)
            one.consumer = EventConsumer(
                kafka,
                service=SERVICE,
                group_id=lane.group(settings.group_id),
                topics=[kafka.topic(lane.topic(Topic.INSTANCE_NORMALIZED))],
                model=InstanceNormalized,
                handler=router.handle,
                producer=self._producer,
                dead_letter_topic=kafka.topic(Topic.INSTANCE_FAILED),
                max_attempts=settings.max_attempts,
                on_assigned=functools.partial(self._assigned, one),
                on_revoked=functools.partial(self._revoked, one),
            )
            self._lanes.append(one)
        self.health = Health(
            {"broker": self._producer.ping, "blob_store": self._blobs.ping},
            cache_s=config.ops.readiness_cache_s,
        )
        self.failed = asyncio.Event()
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    async def _emit(self, request: ForwardRequested) -> None:
        await self._router.emit(request)

    async def start(self) -> None:
        settings = self._config.router
        try:
            self._rules.load()
        except RuleFileError as exc:
            log.critical(
                "the rule file cannot be used; not starting",
                extra={"problems": exc.lines},
            )
            self.failed.set()
            return
        self._runner = await start_http(
            ops_routes(self.health), settings.http_host, settings.http_port
        )
        self._tasks = [
            asyncio.create_task(self._run()),
            asyncio.create_task(self._rules.watch(settings.reload_interval_s)),
        ]

    async def _run(self) -> None:
        if not await connect_producer(self._producer, self.failed):
            return
        await asyncio.gather(*(self._consume(one) for one in self._lanes))

    async def _consume(self, one: LaneConsumer) -> None:
        release = asyncio.create_task(
            one.pending.run(self._config.router.release_interval_s, self._stopping)
        )
        log.info("consuming", extra={"topic": ",".join(one.consumer.topics)})
        try:
            await one.consumer.run()
        except Exception:
            log.exception("consumer stopped unexpectedly")
            self.failed.set()
        finally:
            self._stopping.set()
            await release

    async def _assigned(self, one: LaneConsumer, partitions: set[TopicPartition]) -> None:
        try:
            await one.pending.restore({tp.partition for tp in partitions})
        except Exception:
            # Routing this partition without its pending state could release a study
            # early or twice: stop instead, and let the orchestrator restart us.
            log.exception("cannot restore pending studies; stopping")
            for each in self._lanes:
                each.consumer.stop()
            self.failed.set()
            raise

    async def _revoked(self, one: LaneConsumer, partitions: set[TopicPartition]) -> None:
        await one.pending.forget({tp.partition for tp in partitions})

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.health.stopping = True
        for one in self._lanes:
            one.consumer.stop()
        self._stopping.set()
        if self._tasks:  # the consumers first, after the record in hand; then the helpers
            await finish(self._tasks[0])
        for task in self._tasks[1:]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._producer.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self._blobs.close()
        log.info("stopped")
