"""The durable broker of the fault suite: Tansu keeping its log in the S3 server comes
back from a SIGKILL on the same port with every acknowledged record and every
committed consumer-group offset."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from radflow_core.kafka import connection_options, ensure_topics
from radflow_core.settings import KafkaSettings
from radflow_devstack.broker import Broker
from support.kafka import read_records

pytestmark = pytest.mark.pipeline

GROUP = "durability-check"


async def _produce_and_commit(kafka: KafkaSettings, topic: str, n: int) -> dict[int, int]:
    """Send ``n`` records (acks=all); a group consumes some and commits; returns the
    committed offset by partition."""
    producer = AIOKafkaProducer(**connection_options(kafka), acks="all")
    await producer.start()
    try:
        for i in range(n):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i % 7}".encode())
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        **connection_options(kafka),
        group_id=GROUP,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=3000,
        heartbeat_interval_ms=500,
    )
    await consumer.start()
    try:
        consumed: list[tuple[int, int]] = []
        while len(consumed) < n // 2:
            batch = await consumer.getmany(timeout_ms=500, max_records=n // 2 - len(consumed))
            consumed += [(m.partition, m.offset) for ms in batch.values() for m in ms]
        committed = {p: o + 1 for p, o in sorted(consumed)}
        await consumer.commit({TopicPartition(topic, p): o for p, o in committed.items()})
        return committed
    finally:
        await consumer.stop()


async def _committed(kafka: KafkaSettings, topic: str, partitions: list[int]) -> dict[int, int]:
    consumer = AIOKafkaConsumer(**connection_options(kafka), group_id=GROUP)
    await consumer.start()
    try:
        found = {p: await consumer.committed(TopicPartition(topic, p)) for p in partitions}
        return {p: o for p, o in found.items() if o is not None}
    finally:
        await consumer.stop()


def test_a_killed_durable_broker_restarts_with_its_records_and_committed_offsets(
    durable_broker: Broker,
) -> None:
    kafka = KafkaSettings.from_env(
        {
            "RADFLOW_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{durable_broker.port}",
            "RADFLOW_KAFKA_IDEMPOTENCE": "false",
        }
    )
    topic = "durability"
    asyncio.run(ensure_topics(kafka, [topic]))
    committed = asyncio.run(_produce_and_commit(kafka, topic, 40))
    pid = durable_broker.proc.pid if durable_broker.proc else None

    durable_broker.restart(hard=True)  # SIGKILL: nothing flushed on the way out

    assert durable_broker.proc is not None and durable_broker.proc.pid != pid
    records = asyncio.run(read_records(kafka, topic, idle_s=2.0))
    assert sorted(r["raw"] for r in records) == sorted(f"v{i}".encode() for i in range(40))
    assert asyncio.run(_committed(kafka, topic, sorted(committed))) == committed
    assert durable_broker.restarts == 1
