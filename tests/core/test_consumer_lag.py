"""The consumer reports its group's lag per partition on the real broker: the backlog
while a handler is busy, zero once it is handled and committed, gone when it stops."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import REGISTRY

from core.test_events import received
from radflow_core.consumer import EventConsumer
from radflow_core.events import InstanceReceived
from radflow_core.kafka import EventProducer, ensure_topics
from radflow_core.topics import Topic
from support.stack import Stack

pytestmark = pytest.mark.pipeline


def lag(group: str, topic: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(
        "radflow_consumer_lag", {"group": group, "topic": topic, "partition": str(partition)}
    )


async def wait_lag(
    group: str, topic: str, partition: int, expected: float | None, timeout_s: float = 20
) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            while lag(group, topic, partition) != expected:
                await asyncio.sleep(0.05)
    except TimeoutError:
        got = lag(group, topic, partition)
        raise AssertionError(f"lag of {topic}[{partition}] is {got}, not {expected}") from None


async def test_lag_shows_the_backlog_while_the_handler_is_busy_and_drops_to_zero(
    stack: Stack,
) -> None:
    topic = stack.topic(Topic.INSTANCE_RECEIVED)
    await ensure_topics(stack.kafka, [f"{stack.kafka.topic_prefix}dlq"])
    async with EventProducer(stack.kafka, "test") as producer:
        partitions = set()
        for i in range(10):
            meta = await producer.publish(received(sop_instance_uid=f"1.2.3.{i + 1}"), key=b"1.2")
            partitions.add(meta.partition)
        (partition,) = partitions
        release = asyncio.Event()
        handled: list[str] = []

        async def slow(envelope: Any, _: Any) -> None:
            await release.wait()
            handled.append(envelope.data.sop_instance_uid)

        consumer = EventConsumer(
            stack.kafka,
            service="test",
            group_id="lagged",
            topics=[topic],
            model=InstanceReceived,
            handler=slow,
            producer=producer,
            dead_letter_topic=f"{stack.kafka.topic_prefix}dlq",
            lag_interval_s=0.1,
        )
        group = stack.kafka.group("lagged")
        task = asyncio.create_task(consumer.run())
        try:
            # Handed out but not handled: still lag, since nothing is committed.
            await wait_lag(group, topic, partition, 10)
            for i in range(5):
                await producer.publish(received(sop_instance_uid=f"1.2.4.{i + 1}"), key=b"1.2")
            await wait_lag(group, topic, partition, 15)
            release.set()
            await wait_lag(group, topic, partition, 0)
            assert len(handled) == 15
            # Partitions assigned but never written to are reported too, at zero.
            others = [p for p in range(3) if p != partition]
            for other in others:
                await wait_lag(group, topic, other, 0)
        finally:
            consumer.stop()
            await task
    for p in range(3):
        assert lag(group, topic, p) is None, "a stopped consumer still reports lag"
