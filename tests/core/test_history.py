"""Reading retained records for operator tools: every topic asked for, nothing from
other topics, the time window honoured, and no consumer group touched."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from core.test_events import received
from radflow_core.history import read_history
from radflow_core.kafka import EventProducer, connection_options, ensure_topics
from radflow_core.topics import Topic
from support.stack import Stack

pytestmark = pytest.mark.pipeline


async def test_reads_every_retained_record_of_the_asked_topics_within_the_window(
    stack: Stack,
) -> None:
    asked = (Topic.INSTANCE_RECEIVED, Topic.INSTANCE_FAILED)
    await ensure_topics(stack.kafka, [stack.topic(t) for t in (*asked, Topic.AUDIT)])
    async with EventProducer(stack.kafka, "history-test") as producer:
        for i in range(3):
            await producer.publish(received(sop_instance_uid=f"1.2.3.{i}"), f"early-{i}".encode())
        await producer.publish(
            received(sop_instance_uid="1.2.9"), b"other", topic=stack.topic(Topic.AUDIT)
        )
        await asyncio.sleep(0.05)
        middle = datetime.now(UTC)
        await asyncio.sleep(0.05)
        await producer.publish(
            received(sop_instance_uid="1.2.4.0"), b"late", topic=stack.topic(Topic.INSTANCE_FAILED)
        )

    everything = [r async for r in read_history(stack.kafka, asked, idle_s=1.0)]
    assert sorted(r.key or "" for r in everything) == ["early-0", "early-1", "early-2", "late"]
    late = next(r for r in everything if r.key == "late")
    assert late.topic == stack.topic(Topic.INSTANCE_FAILED) and late.offset == 0
    envelope = late.envelope()
    assert envelope is not None and envelope["data"]["sop_instance_uid"] == "1.2.4.0"

    since = [r.key async for r in read_history(stack.kafka, asked, since=middle, idle_s=1.0)]
    until = [r.key async for r in read_history(stack.kafka, asked, until=middle, idle_s=1.0)]
    assert since == ["late"]
    assert sorted(k or "" for k in until) == ["early-0", "early-1", "early-2"]

    admin = AIOKafkaAdminClient(**connection_options(stack.kafka))
    await admin.start()
    try:
        groups = [g for g, _ in await admin.list_consumer_groups()]
    finally:
        await admin.close()
    assert not [g for g in groups if g.startswith(stack.kafka.topic_prefix)]


async def test_topics_the_cluster_lacks_are_skipped(stack: Stack) -> None:
    assert [r async for r in read_history(stack.kafka, [Topic.REPORT_FAILED], idle_s=0.5)] == []
