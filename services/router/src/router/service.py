"""The router's lifecycle: rules, ops endpoint, producer, pending-study state,
consumer, release loop and rule-file watcher.

It does not start on an invalid rule file (exit 3 with every problem logged); once
running, an invalid change never stops it. On SIGTERM the consumer finishes the
record in hand, a release in progress is finished, and the producer flushes; pending
studies stay in the changelog for whoever owns their partition next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web
from aiokafka import TopicPartition

from radflow_core.blobstore import BlobStore
from radflow_core.events import ForwardRequested, InstanceNormalized
from radflow_core.kafka import EventConsumer, EventProducer
from radflow_core.ops import Health, ops_routes
from radflow_core.runtime import connect_producer, finish, start_http
from radflow_core.topics import Topic
from router.live_rules import LiveRules
from router.loader import RuleFileError
from router.pending import PendingStudies
from router.routing import Router
from router.settings import RouterConfig

log = logging.getLogger(__name__)

SERVICE = "router"


class RouterService:
    def __init__(self, config: RouterConfig) -> None:
        self._config = config
        settings = config.router
        kafka = config.kafka
        self._rules = LiveRules(settings.rules_file)
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(kafka, SERVICE)
        self._pending = PendingStudies(
            kafka, self._producer, kafka.topic(Topic.ROUTER_PENDING), self._emit
        )
        self._router = Router(
            self._rules,
            self._blobs,
            self._producer,
            kafka,
            self._pending,
            settings.header_limit_bytes,
        )
        self._consumer = EventConsumer(
            kafka,
            service=SERVICE,
            group_id=settings.group_id,
            topics=[kafka.topic(Topic.INSTANCE_NORMALIZED)],
            model=InstanceNormalized,
            handler=self._router.handle,
            producer=self._producer,
            dead_letter_topic=kafka.topic(Topic.INSTANCE_FAILED),
            max_attempts=settings.max_attempts,
            on_assigned=self._assigned,
            on_revoked=self._revoked,
        )
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
        release = asyncio.create_task(
            self._pending.run(self._config.router.release_interval_s, self._stopping)
        )
        log.info("consuming", extra={"topic": self._config.kafka.topic(Topic.INSTANCE_NORMALIZED)})
        try:
            await self._consumer.run()
        except Exception:
            log.exception("consumer stopped unexpectedly")
            self.failed.set()
        finally:
            self._stopping.set()
            await release

    async def _assigned(self, partitions: set[TopicPartition]) -> None:
        try:
            await self._pending.restore({tp.partition for tp in partitions})
        except Exception:
            # Routing this partition without its pending state could release a study
            # early or twice: stop instead, and let the orchestrator restart us.
            log.exception("cannot restore pending studies; stopping")
            self._consumer.stop()
            self.failed.set()
            raise

    async def _revoked(self, partitions: set[TopicPartition]) -> None:
        await self._pending.forget({tp.partition for tp in partitions})

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.health.stopping = True
        self._consumer.stop()
        self._stopping.set()
        if self._tasks:  # the consumer first, after the record in hand; then the helpers
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
