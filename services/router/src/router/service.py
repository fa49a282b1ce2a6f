"""The router's lifecycle: rules, ops endpoint, producer, and per lane (STAT and
routine) a consumer with its pending-study state and release loop; the rule-file
watcher.

The STAT lane reads ``dicom.instance.normalized.stat`` (consumer group
``<group>.stat``) beside the routine lane, so a STAT instance is never behind a
routine backlog; the two lanes share the rules and the producer, and each keeps its
studies waiting to be complete in its own changelog. Lossy previews
(``dicom.instance.preview``, group ``<group>.preview``) have a consumer of their own
and always leave in the STAT lane, never held.

It does not start on an invalid rule file (exit 3 with every problem logged); once
running, an invalid change never stops it. On SIGTERM the consumers finish the
record in hand, a release in progress is finished, and the producer flushes; pending
studies stay in the changelog for whoever owns their partition next.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore
from radflow_core.consumer import EventConsumer
from radflow_core.events import (
    LANES,
    ForwardRequested,
    InstanceNormalized,
    InstancePreview,
    Lane,
)
from radflow_core.kafka import EventProducer
from radflow_core.order_table import OrderTable, OrderTableMetrics
from radflow_core.shell import Shell
from radflow_core.topics import Topic
from radflow_rules.live import LiveRules, RulesMetrics
from radflow_rules.loader import RuleFileError
from router import metrics
from router.pending import PendingStudies
from router.previews import GROUP_SUFFIX as PREVIEW_GROUP_SUFFIX
from router.previews import PreviewRouter
from router.routing import Router
from router.settings import RouterConfig

log = logging.getLogger(__name__)

SERVICE = "router"
ORDER_TABLE_METRICS = OrderTableMetrics(metrics.ORDER_ITEMS, metrics.ORDER_TABLE_LOADED)
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
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(kafka, SERVICE)
        self._audit = Auditor(SERVICE, self._producer, config.audit)
        self._rules = LiveRules(settings.rules_file, RULES_METRICS, audit=self._audit)
        self.shell = Shell(
            SERVICE,
            producer=self._producer,
            blobs=self._blobs,
            ops=config.ops,
            http_host=settings.http_host,
            http_port=settings.http_port,
            audit=self._audit,
        )
        self.health = self.shell.health
        self.failed = self.shell.failed
        self._orders = None
        if config.order_lookup.enabled:
            # The router matches the order references of its events: it needs no key.
            self._orders = OrderTable(
                kafka,
                metrics=ORDER_TABLE_METRICS,
                retry_interval_s=config.order_lookup.retry_interval_s,
            )
            self.shell.loop("order table", self._orders.run)
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
                self._orders,
                lane,
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
                on_assigned=functools.partial(self._assigned, one),
                on_revoked=functools.partial(self._revoked, one),
            )
            self._lanes.append(one)
            self.shell.consume(one.consumer)
            # A release in progress is finished, never cut, before the producer flushes.
            self.shell.loop(
                f"release {lane.value}",
                functools.partial(
                    one.pending.run, settings.release_interval_s, self.shell.stopping
                ),
                graceful=True,
            )
        previews = PreviewRouter(self._rules, self._blobs, self._emit, settings.header_limit_bytes)
        self.shell.consume(
            EventConsumer(
                kafka,
                service=SERVICE,
                group_id=settings.group_id + PREVIEW_GROUP_SUFFIX,
                topics=[kafka.topic(Topic.INSTANCE_PREVIEW)],
                model=InstancePreview,
                handler=previews.handle,
                producer=self._producer,
                dead_letter_topic=kafka.topic(Topic.INSTANCE_FAILED),
            )
        )
        self.shell.loop(
            "rule file watcher", functools.partial(self._rules.watch, settings.reload_interval_s)
        )

    async def _emit(self, request: ForwardRequested) -> None:
        await self._router.emit(request)

    async def start(self) -> None:
        try:
            self._rules.load()
        except RuleFileError as exc:
            self.shell.cannot_run("the rule file cannot be used; not starting", exc.lines)
            return
        await self.shell.start()

    async def _assigned(self, one: LaneConsumer, partitions: set[TopicPartition]) -> None:
        try:
            await one.pending.restore({tp.partition for tp in partitions})
        except Exception:
            # Routing this partition without its pending state could release a study
            # early or twice: stop instead, and let the orchestrator restart us.
            log.exception("cannot restore pending studies; stopping")
            for each in self._lanes:
                each.consumer.stop()
            self.shell.failed.set()
            raise

    async def _revoked(self, one: LaneConsumer, partitions: set[TopicPartition]) -> None:
        await one.pending.forget({tp.partition for tp in partitions})

    async def stop(self) -> None:
        await self.shell.stop()
