"""The open orders, as the worklist service keeps them on the compacted
``worklist.items`` topic: what ingest (the STAT lane) and the router (rule attributes
of the order) match arriving instances with.

Every process that needs it reads the whole topic from the start, without a consumer
group (nothing committed, every replica sees every item), and then keeps following it:
a new or changed item replaces the one under its key, a tombstone (cancelled,
discontinued, completed) removes it. Nothing is kept on disk: a restart reads the topic
again.

An unavailable worklist never stops images. Until the topic has been read to its end
(at start, while the broker or the topic is missing, or after an error, retried every
``RADFLOW_ORDER_LOOKUP_RETRY_INTERVAL_S``), :meth:`OrderTable.find` answers from what it
had (nothing at first), so an instance whose order is not known is routed as it would
be without orders. A late order is not waited for: orders precede images, and holding
an instance back for an order that may never come would delay every study of a site
without a worklist. The router looks the order up again when it routes, so an order
that arrives between ingest and routing still steers the routing.

The end of the initial read is the end offsets and then an empty fetch, as in
:mod:`radflow_core.compacted` (Tansu under-reports the end of a partition).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from prometheus_client import Gauge
from pydantic import Field, SecretStr

from radflow_core.compacted import IDLE_MS, partitions_of, reader
from radflow_core.errors import EventDecodeError
from radflow_core.events import OrderPriority, WorklistItem, decode
from radflow_core.orders import order_ref
from radflow_core.settings import KafkaSettings, Section
from radflow_core.topics import Topic

log = logging.getLogger(__name__)

_RANK = {OrderPriority.STAT: 0, OrderPriority.ASAP: 1, OrderPriority.ROUTINE: 2}


class OrderLookupSettings(Section):
    prefix = "ORDER_LOOKUP_"

    enabled: bool = True
    """Match arriving instances with the open orders of ``worklist.items``: a STAT
    order puts its instances in the STAT lane (ingest), and rules see the order's site,
    priority and procedure (router). Off: instances are routed without orders, and
    ingest puts no order reference in its events."""
    retry_interval_s: float = Field(default=5.0, gt=0, le=3600)
    """Seconds between attempts to read ``worklist.items`` while the broker or the
    topic is unavailable; instances are routed without orders meanwhile."""


@dataclass(frozen=True)
class OrderTableMetrics:
    """The metric families a service reports its order table with (its own names)."""

    items: Gauge
    """Open scheduled procedure steps known."""
    loaded: Gauge
    """1 once ``worklist.items`` was read to its end; 0 before, and while it cannot be
    read."""


class OrderTable:
    """The open worklist items by order reference, kept current while :meth:`run` runs.

    ``key``: the order reference key (:class:`radflow_core.orders.OrderSettings`), for
    :meth:`lookup`; a process that only has order references (the router, from its
    events) needs none.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        key: SecretStr | None = None,
        metrics: OrderTableMetrics | None = None,
        retry_interval_s: float = 5.0,
    ) -> None:
        self._kafka = kafka
        self._retry_s = retry_interval_s
        self._key = key
        self._metrics = metrics
        self._by_key: dict[bytes, WorklistItem] = {}
        self._by_ref: dict[str, dict[bytes, WorklistItem]] = {}
        self.loaded = asyncio.Event()
        """Set once the topic was read to its end (cleared while it cannot be read)."""
        if metrics is not None:
            metrics.items.set(0)
            metrics.loaded.set(0)

    def __len__(self) -> int:
        return len(self._by_key)

    def ref(self, accession_number: str, issuer: str | None) -> str:
        """The order reference of an accession number and its issuer."""
        if self._key is None:
            raise ValueError("this order table has no order reference key")
        return order_ref(accession_number, issuer, self._key)

    def lookup(self, accession_number: str, issuer: str | None) -> WorklistItem | None:
        """The open order of an accession number and its issuer (see :meth:`find`)."""
        return self.find(self.ref(accession_number, issuer))

    def find(self, ref: str) -> WorklistItem | None:
        """The open item of the order ``ref``, or None. An order of several steps
        answers with its most urgent step (stat, asap, routine), the latest updated
        among equals."""
        steps = self._by_ref.get(ref)
        if not steps:
            return None
        return min(steps.values(), key=lambda i: (_RANK[i.priority], -i.updated_at.timestamp()))

    async def run(self) -> None:
        """Read the topic and follow it, forever (cancel to stop); every failure is
        logged and retried after the retry interval, keeping what was known."""
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - images keep flowing without orders
                self.loaded.clear()
                if self._metrics is not None:
                    self._metrics.loaded.set(0)
                log.warning(
                    "worklist items cannot be read; instances are matched with the %d "
                    "orders known so far, retrying in %g s",
                    len(self._by_key),
                    self._retry_s,
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
            await asyncio.sleep(self._retry_s)

    async def _follow(self) -> None:
        consumer = reader(self._kafka)
        await consumer.start()
        try:
            topic = self._kafka.topic(Topic.WORKLIST_ITEMS)
            tps = [TopicPartition(topic, p) for p in sorted(await partitions_of(consumer, topic))]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            fresh: dict[bytes, WorklistItem] = {}
            while True:
                batches = await consumer.getmany(*tps, timeout_ms=IDLE_MS, max_records=5000)
                if self.loaded.is_set():
                    self._apply(batches, self._by_key)
                    continue
                self._apply(batches, fresh)
                if not batches and await _at_end(consumer, tps, end):
                    self._replace(fresh)
        finally:
            await consumer.stop()

    def _replace(self, items: dict[bytes, WorklistItem]) -> None:
        """Take the items of a complete read as the table (after a start or a retry)."""
        self._by_key = {}
        self._by_ref = {}
        for key, item in items.items():
            self._put(key, item)
        self.loaded.set()
        if self._metrics is not None:
            self._metrics.loaded.set(1)
            self._metrics.items.set(len(self._by_key))
        log.info("worklist items read", extra={"items": len(self._by_key)})

    def _apply(
        self,
        batches: Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
        into: dict[bytes, WorklistItem],
    ) -> None:
        live = into is self._by_key
        for records in batches.values():
            for record in records:
                key = record.key
                if key is None:
                    continue
                if record.value is None:
                    if live:
                        self._remove(key)
                    else:
                        into.pop(key, None)
                    continue
                try:
                    item = decode(record.value, WorklistItem).data
                except EventDecodeError as exc:
                    log.warning(
                        "a worklist item cannot be read; skipped",
                        extra={
                            "partition": record.partition,
                            "offset": record.offset,
                            "error": str(exc),
                        },
                    )
                    continue
                if live:
                    self._remove(key)
                    self._put(key, item)
                else:
                    into[key] = item
        if live and self._metrics is not None:
            self._metrics.items.set(len(self._by_key))

    def _put(self, key: bytes, item: WorklistItem) -> None:
        self._by_key[key] = item
        self._by_ref.setdefault(item.order_ref, {})[key] = item

    def _remove(self, key: bytes) -> None:
        item = self._by_key.pop(key, None)
        if item is None:
            return
        steps = self._by_ref.get(item.order_ref, {})
        steps.pop(key, None)
        if not steps:
            self._by_ref.pop(item.order_ref, None)


async def _at_end(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], end: Mapping[TopicPartition, int]
) -> bool:
    return all([await consumer.position(tp) >= end[tp] for tp in tps])
