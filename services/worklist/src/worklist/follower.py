"""The merged view kept from ``worklist.items``: rebuilt from the compacted topic at
start (radflow_core.compacted), then followed, so that every replica shows the steps
any replica accepted (a RIS may send to one replica, a modality query another).

Each record's order document is read from the blob store and verified against the
sha256 the record carries. A document that cannot be read now (the blob store is away)
is retried; one that is gone or does not verify is logged and its step left out: the
RIS's next message about the order writes it again.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from radflow_core.blobstore import BlobStore
from radflow_core.compacted import partitions_of, read_latest, reader
from radflow_core.errors import (
    BlobStoreUnavailable,
    BrokerUnavailable,
    EventDecodeError,
    PipelineError,
)
from radflow_core.events import WorklistItem, decode
from radflow_core.order_document import OrderDocument
from radflow_core.settings import KafkaSettings
from worklist.view import MergedView

log = logging.getLogger(__name__)

FETCHES = 16
"""Order documents read at once while restoring."""


class TopicFollower:
    def __init__(
        self, kafka: KafkaSettings, topic: str, blobs: BlobStore, view: MergedView, idle_ms: int
    ) -> None:
        self._kafka = kafka
        self._topic = topic
        self._blobs = blobs
        self._view = view
        self._idle_ms = idle_ms
        self._consumer: AIOKafkaConsumer | None = None
        self._partitions: list[TopicPartition] = []

    async def restore(self) -> int:
        """Read the topic to its end into the view; returns the open steps read.

        Raises:
            BrokerUnavailable, BlobStoreUnavailable, ConfigurationError (no topic).
        """
        await self.close()
        consumer = reader(self._kafka)
        try:
            await consumer.start()
            partitions = await partitions_of(consumer, self._topic)
            latest = await read_latest(consumer, self._topic, partitions, self._idle_ms)
        except PipelineError:
            await consumer.stop()
            raise
        except KafkaError as exc:
            await consumer.stop()
            raise BrokerUnavailable(f"cannot read {self._topic}: {type(exc).__name__}") from exc
        self._consumer = consumer
        self._partitions = [TopicPartition(self._topic, p) for p in sorted(partitions)]
        records = [(k, v) for by_key in latest.values() for k, v in by_key.items()]
        limit = asyncio.Semaphore(FETCHES)

        async def one(key: bytes, value: bytes) -> None:
            async with limit:
                await self._apply(key, value)

        await asyncio.gather(*(one(k, v) for k, v in records))
        return len(self._view)

    async def follow(self, stopping: asyncio.Event) -> None:
        """Apply what any replica writes, until ``stopping``."""
        consumer = self._consumer
        if consumer is None:
            return
        while not stopping.is_set():
            try:
                batches = await consumer.getmany(*self._partitions, timeout_ms=500)
            except KafkaError as exc:  # the broker away: aiokafka reconnects by itself
                log.warning("worklist.items not readable now", extra={"reason": type(exc).__name__})
                await asyncio.sleep(1)
                continue
            for records in batches.values():
                for record in records:
                    if record.key is None:
                        continue
                    if record.value is None:
                        self._view.remove(record.key)
                        continue
                    await self._apply_retrying(record.key, record.value, stopping)

    async def close(self) -> None:
        """Stop reading; safe twice. A broker that is gone makes aiokafka's fetcher
        end cancelled: that is the end wanted, not an error of the stop."""
        consumer, self._consumer = self._consumer, None
        if consumer is None:
            return
        try:
            async with asyncio.timeout(5):
                await consumer.stop()
        except (asyncio.CancelledError, TimeoutError, KafkaError) as exc:
            log.info("topic reader closed", extra={"reason": type(exc).__name__})

    async def _apply_retrying(self, key: bytes, value: bytes, stopping: asyncio.Event) -> None:
        delay = 0.5
        while not stopping.is_set():
            try:
                await self._apply(key, value)
                return
            except BlobStoreUnavailable as exc:
                log.warning(
                    "order document not readable now; retrying", extra={"reason": exc.reason}
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _apply(self, key: bytes, value: bytes) -> None:
        """Put one record's step in the view (read its document unless the view holds
        that very document already).

        Raises:
            BlobStoreUnavailable: the document cannot be read now.
        """
        try:
            item = decode(value, WorklistItem).data
        except EventDecodeError as exc:
            log.exception("worklist.items record not readable; skipped", extra={"reason": str(exc)})
            return
        if self._view.document_sha(key) == item.document.sha256:
            return
        try:
            raw = await self._blobs.read(item.document)
            document = OrderDocument.model_validate_json(raw)
        except BlobStoreUnavailable:
            raise
        except PipelineError as exc:
            log.exception(
                "order document unusable; step left out",
                extra={"site": item.site, "step_id": item.step_id, "reason": exc.reason},
            )
            return
        except ValueError as exc:
            log.exception(
                "order document not valid; step left out",
                extra={"site": item.site, "step_id": item.step_id, "reason": type(exc).__name__},
            )
            return
        self._view.put(item, document)
