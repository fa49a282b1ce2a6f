"""Restoring state kept in a compacted topic (the router's pending studies, the
ledger): the latest value of every key of some partitions, tombstones applied.

Both services restore on partition assignment, before they handle a record of those
partitions, so nobody writes them meanwhile. The read goes to the end offsets and then
on until the broker has had nothing more for ``idle_ms``: Tansu (the development
broker) reports the end of a partition whose last batch holds several records as that
batch's first offset + 1, and stopping there loses the last records (measured: 37
reported against 40 written). Real Kafka reports the true end, so the idle wait is the
only cost there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition

from radflow_core.errors import ConfigurationError
from radflow_core.kafka import connection_options
from radflow_core.settings import KafkaSettings

IDLE_MS = 500
"""How long an empty fetch past the end offsets must last to mean the end."""


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    """The partitions of ``topic`` as the cluster has them.

    Raises:
        ConfigurationError: the topic does not exist (after 5 s of metadata refreshes).
    """
    for _ in range(50):
        found = consumer.partitions_for_topic(topic)
        if found:
            return set(found)
        await consumer._client.force_metadata_update()  # no public API for this
        await asyncio.sleep(0.1)
    raise ConfigurationError(f"topic {topic} does not exist")


def reader(kafka: KafkaSettings) -> AIOKafkaConsumer:
    """A consumer of no group, committing nothing (start and stop it yourself)."""
    return AIOKafkaConsumer(
        **connection_options(kafka),
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
    )


async def read_latest(
    consumer: AIOKafkaConsumer, topic: str, partitions: Iterable[int], idle_ms: int = IDLE_MS
) -> dict[int, dict[bytes, bytes]]:
    """Partition → key → latest value of ``topic``'s ``partitions`` (keys whose latest
    record is a tombstone are absent; records without a key are skipped)."""
    tps = [TopicPartition(topic, p) for p in sorted(set(partitions))]
    latest: dict[int, dict[bytes, bytes]] = {tp.partition: {} for tp in tps}
    if not tps:
        return latest
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    end = await consumer.end_offsets(tps)

    def take(batches: dict[TopicPartition, list[object]]) -> None:
        for tp, records in batches.items():
            for record in records:
                key, value = record.key, record.value  # type: ignore[attr-defined]
                if key is None:
                    continue
                if value is None:
                    latest[tp.partition].pop(key, None)
                else:
                    latest[tp.partition][key] = value

    while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
        take(await consumer.getmany(*tps, timeout_ms=idle_ms, max_records=5000))
    while batches := await consumer.getmany(*tps, timeout_ms=idle_ms, max_records=5000):
        take(batches)
    return latest
