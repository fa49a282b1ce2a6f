"""Restoring from a compacted topic: the latest value of every key, tombstones applied,
and nothing lost when the broker reports an end offset short of the last batch."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from radflow_core.compacted import partitions_of, read_latest, reader
from radflow_core.errors import ConfigurationError
from radflow_core.kafka import connection_options, ensure_topics
from support.stack import Stack

pytestmark = pytest.mark.pipeline


async def _send_in_batches(
    stack: Stack, topic: str, records: list[tuple[bytes, bytes | None]]
) -> None:
    """Several records per batch: how a service's changelog writes arrive, and what makes
    Tansu report the end offset as the last batch's first offset + 1 (41 for these 44
    records, measured; the router's restore used to stop there and lose 3)."""
    producer = AIOKafkaProducer(**connection_options(stack.kafka))
    await producer.start()
    try:
        for start in range(0, len(records), 4):
            batch = producer.create_batch()
            for key, value in records[start : start + 4]:
                assert batch.append(key=key, value=value, timestamp=None) is not None
            batch.close()
            await (await producer.send_batch(batch, topic, partition=1))
    finally:
        await producer.stop()


async def test_every_key_of_the_last_batch_is_restored_and_tombstones_remove_keys(
    stack: Stack,
) -> None:
    topic = f"{stack.kafka.topic_prefix}changelog"
    await ensure_topics(stack.kafka, [topic], partitions=2)
    records: list[tuple[bytes, bytes | None]] = [(b"k%02d" % i, b"v%d" % i) for i in range(40)]
    records += [(b"k00", b"newer"), (b"k01", None), (b"k02", None), (b"k03", b"back")]
    await _send_in_batches(stack, topic, records)

    consumer = reader(stack.kafka)
    await consumer.start()
    try:
        assert await partitions_of(consumer, topic) == {0, 1}
        latest = await read_latest(consumer, topic, [0, 1])
    finally:
        await consumer.stop()
    assert latest[0] == {}
    expected = {b"k%02d" % i: b"v%d" % i for i in range(3, 40)}
    expected |= {b"k00": b"newer", b"k03": b"back"}
    assert latest[1] == expected


async def test_a_missing_topic_is_a_configuration_error(stack: Stack) -> None:
    consumer = reader(stack.kafka)
    await consumer.start()
    try:
        with pytest.raises(ConfigurationError, match="does not exist"):
            await partitions_of(consumer, f"{stack.kafka.topic_prefix}nothing-here")
    finally:
        await consumer.stop()
