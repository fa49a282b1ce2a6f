"""Reading a topic from the beginning, synchronously, for assertions."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from radflow_core.kafka import connection_options
from radflow_core.settings import KafkaSettings


def read_topic(
    kafka: KafkaSettings, topic: str, timeout_s: float = 20, idle_s: float | None = None
) -> list[dict[str, Any]]:
    """Every record on ``topic`` now, as {key, value (parsed JSON), partition, offset}."""
    return [
        {**r, "value": json.loads(r["raw"]) if r["raw"] else None}
        for r in asyncio.run(read_records(kafka, topic, timeout_s, idle_s))
    ]


async def read_records(
    kafka: KafkaSettings, topic: str, timeout_s: float = 20, idle_s: float | None = None
) -> list[dict[str, Any]]:
    """Every record on ``topic`` now, as {key, raw (bytes), partition, offset}.

    Reads up to the end offsets taken at the start, so it neither misses records nor
    waits for an idle timeout; with ``idle_s``, until nothing came for that long
    instead (Tansu on S3 under-reports end offsets: see radflow_devstack.broker).
    """
    consumer = AIOKafkaConsumer(
        **connection_options(kafka),
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
    )
    await consumer.start()
    records: list[dict[str, Any]] = []
    try:
        partitions = [TopicPartition(topic, p) for p in sorted(await _partitions(consumer, topic))]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        last_record = loop.time()

        def more() -> bool:
            if idle_s is not None:
                return loop.time() - last_record < idle_s
            return any(positions[tp] < end[tp] for tp in partitions)

        positions = {tp: await consumer.position(tp) for tp in partitions}
        while more():
            if loop.time() > deadline:
                raise AssertionError(f"could not read {topic} to its end")
            batch = await consumer.getmany(timeout_ms=200)
            if batch:
                last_record = loop.time()
            for msgs in batch.values():
                for m in msgs:
                    records.append(
                        {
                            "key": m.key.decode() if m.key else None,
                            "raw": m.value,
                            "partition": m.partition,
                            "offset": m.offset,
                        }
                    )
            positions = {tp: await consumer.position(tp) for tp in partitions}
        return records
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    for _ in range(50):
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return set(parts)
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise AssertionError(f"topic {topic} has no partitions")
