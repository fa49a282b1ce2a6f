"""The consumer loop against the real broker: commit after acknowledged output,
bounded retries, dead letters with reasons, and resumption after a restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from core.test_events import received
from radflow_core.errors import BlobStoreUnavailable, EventDecodeError, PipelineError
from radflow_core.events import Envelope, InstanceReceived
from radflow_core.kafka import EventConsumer, EventProducer, ensure_topics
from radflow_core.topics import Topic
from support.kafka import read_records
from support.stack import Stack

pytestmark = pytest.mark.pipeline


class Rejected(PipelineError):
    reason = "rejected_for_test"


Handler = Callable[[Envelope[InstanceReceived], ConsumerRecord[bytes, bytes]], Awaitable[None]]


async def _run_until(
    consumer: EventConsumer[InstanceReceived], done: Callable[[], Awaitable[bool]]
) -> None:
    task = asyncio.create_task(consumer.run())
    try:
        async with asyncio.timeout(30):
            while not await done():
                await asyncio.sleep(0.05)
    finally:
        consumer.stop()
        await task


def count_is(items: list[Any], n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(items) >= n

    return check


@pytest.fixture
async def topics(stack: Stack) -> None:
    await ensure_topics(stack.kafka, [f"{stack.kafka.topic_prefix}{t}" for t in ("dlq", "out")])


def _consumer(
    stack: Stack, producer: EventProducer, handler: Handler, group: str
) -> EventConsumer[InstanceReceived]:
    return EventConsumer(
        stack.kafka,
        service="test",
        group_id=group,
        topics=[stack.topic(Topic.INSTANCE_RECEIVED)],
        model=InstanceReceived,
        handler=handler,
        producer=producer,
        dead_letter_topic=f"{stack.kafka.topic_prefix}dlq",
        max_attempts=3,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )


async def _publish(producer: EventProducer, n: int) -> list[str]:
    uids = [f"1.2.3.{i + 1}" for i in range(n)]
    for uid in uids:
        await producer.publish(received(sop_instance_uid=uid), key=b"1.2.3")
    return uids


async def _dead_letters(stack: Stack) -> list[dict[str, Any]]:
    records = await read_records(stack.kafka, f"{stack.kafka.topic_prefix}dlq")
    return [json.loads(r["raw"])["data"] for r in records]


async def test_outputs_are_acknowledged_before_the_offset_is_committed_and_a_restart_resumes(
    stack: Stack, topics: None
) -> None:
    out_topic = f"{stack.kafka.topic_prefix}out"
    async with EventProducer(stack.kafka, "test") as producer:
        uids = await _publish(producer, 5)
        seen: list[str] = []

        async def forward(envelope: Envelope[InstanceReceived], _: Any) -> None:
            await producer.send(out_topic, None, envelope.data.sop_instance_uid.encode())
            seen.append(envelope.data.sop_instance_uid)

        await _run_until(_consumer(stack, producer, forward, "g1"), count_is(seen, 5))
        assert seen == uids
        outputs = await read_records(stack.kafka, out_topic)
        assert sorted(r["raw"].decode() for r in outputs) == uids
        # A restart of the same group sees only what came after the committed offsets.
        more = await _publish(producer, 2)
        seen.clear()
        await _run_until(_consumer(stack, producer, forward, "g1"), count_is(seen, 2))
        await asyncio.sleep(0.5)
        assert seen == more


async def test_unfixable_failure_goes_to_the_dead_letter_topic_with_its_reason(
    stack: Stack, topics: None
) -> None:
    async with EventProducer(stack.kafka, "test") as producer:
        await _publish(producer, 3)
        handled: list[str] = []

        async def reject_second(envelope: Envelope[InstanceReceived], _: Any) -> None:
            if envelope.data.sop_instance_uid == "1.2.3.2":
                raise Rejected("no good")
            handled.append(envelope.data.sop_instance_uid)

        await _run_until(_consumer(stack, producer, reject_second, "g2"), count_is(handled, 2))
    (letter,) = await _dead_letters(stack)
    assert letter["reason"] == "rejected_for_test"
    assert letter["attempts"] == 1 and letter["retriable"] is False
    assert json.loads(letter["original_value"])["data"]["sop_instance_uid"] == "1.2.3.2"
    assert letter["source_topic"] == stack.topic(Topic.INSTANCE_RECEIVED)


async def test_retriable_failure_is_retried_a_bounded_number_of_times(
    stack: Stack, topics: None
) -> None:
    attempts = 0
    async with EventProducer(stack.kafka, "test") as producer:
        await _publish(producer, 1)

        async def flaky(_: Any, __: Any) -> None:
            nonlocal attempts
            attempts += 1
            raise BlobStoreUnavailable("down")

        async def dead_lettered() -> bool:
            return bool(await _dead_letters(stack))

        await _run_until(_consumer(stack, producer, flaky, "g3"), dead_lettered)
    assert attempts == 3
    (letter,) = await _dead_letters(stack)
    assert letter["reason"] == "blob_store_unavailable"
    assert letter["retriable"] is True and letter["attempts"] == 3


async def test_a_record_that_is_not_an_event_is_dead_lettered_not_retried(
    stack: Stack, topics: None
) -> None:
    async with EventProducer(stack.kafka, "test") as producer:
        await producer.send(stack.topic(Topic.INSTANCE_RECEIVED), b"k", b"{not json")
        calls = 0

        async def never(_: Any, __: Any) -> None:
            nonlocal calls
            calls += 1

        async def dead_lettered() -> bool:
            return bool(await _dead_letters(stack))

        await _run_until(_consumer(stack, producer, never, "g4"), dead_lettered)
    assert calls == 0
    (letter,) = await _dead_letters(stack)
    assert letter["reason"] == EventDecodeError.reason
    assert letter["original_value"] == "{not json"


async def test_a_retriable_failure_while_stopping_is_left_for_the_next_reader_not_dead_lettered(
    stack: Stack, topics: None
) -> None:
    async with EventProducer(stack.kafka, "test") as producer:
        uids = await _publish(producer, 3)
        handled: list[str] = []
        failing = asyncio.Event()

        async def s3_down_for_the_second(envelope: Envelope[InstanceReceived], _: Any) -> None:
            if envelope.data.sop_instance_uid == "1.2.3.2":
                failing.set()
                raise BlobStoreUnavailable("S3 unreachable")
            handled.append(envelope.data.sop_instance_uid)

        consumer = _consumer(stack, producer, s3_down_for_the_second, "g-stop")
        task = asyncio.create_task(consumer.run())
        async with asyncio.timeout(30):
            await failing.wait()
        consumer.stop()  # mid-retry, as on SIGTERM during an S3 outage
        await task
        assert handled == uids[:1]
        assert await _dead_letters(stack) == []

        async def healthy(envelope: Envelope[InstanceReceived], _: Any) -> None:
            handled.append(envelope.data.sop_instance_uid)

        handled.clear()
        await _run_until(_consumer(stack, producer, healthy, "g-stop"), count_is(handled, 2))
        assert handled == uids[1:]
