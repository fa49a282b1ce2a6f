"""The consumer loop against the real broker: commit after acknowledged output,
retries for as long as a failure lasts without leaving the group, dead letters with
reasons, hand-back on stop and on rebalance, and resumption after a restart."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiokafka import ConsumerRecord

from core.test_events import received
from radflow_core.consumer import EventConsumer
from radflow_core.errors import BlobStoreUnavailable, EventDecodeError, PipelineError
from radflow_core.events import Envelope, InstanceReceived, encode, wrap
from radflow_core.kafka import EventProducer, ensure_topics
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


async def test_a_retriable_failure_is_retried_until_it_passes_and_never_dead_lettered(
    stack: Stack, topics: None
) -> None:
    attempts = 0
    async with EventProducer(stack.kafka, "test") as producer:
        await _publish(producer, 1)
        handled: list[str] = []

        async def down_for_twenty_attempts(envelope: Envelope[InstanceReceived], _: Any) -> None:
            nonlocal attempts
            attempts += 1
            if attempts <= 20:
                raise BlobStoreUnavailable("down")
            handled.append(envelope.data.sop_instance_uid)

        await _run_until(
            _consumer(stack, producer, down_for_twenty_attempts, "g3"), count_is(handled, 1)
        )
    assert attempts == 21
    assert await _dead_letters(stack) == []


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


async def _send_to(producer: EventProducer, topic: str, uid: str, partition: int) -> None:
    value = encode(wrap(received(sop_instance_uid=uid), "test"))
    await producer.send(topic, b"1.2.3", value, partition=partition)


async def test_a_wait_longer_than_the_poll_interval_keeps_the_group_and_the_other_partitions(
    stack: Stack, topics: None
) -> None:
    """The forwarder used to be dropped from its group after aiokafka's poll interval
    while a destination was down, and then died on CommitFailedError."""
    kafka = stack.kafka.model_copy(update={"max_poll_interval_ms": 1_500})
    topic = stack.topic(Topic.INSTANCE_RECEIVED)
    async with EventProducer(stack.kafka, "test") as producer:
        await _send_to(producer, topic, "1.2.3.1", partition=0)
        await _send_to(producer, topic, "1.2.3.2", partition=1)
        handled: list[str] = []
        down_until = asyncio.get_running_loop().time() + 5.0  # > 3 poll intervals

        async def first_waits_for_s3(envelope: Envelope[InstanceReceived], _: Any) -> None:
            uid = envelope.data.sop_instance_uid
            if uid == "1.2.3.1" and asyncio.get_running_loop().time() < down_until:
                raise BlobStoreUnavailable("S3 unreachable")
            handled.append(uid)

        consumer = EventConsumer(
            kafka,
            service="test",
            group_id="g-long",
            topics=[topic],
            model=InstanceReceived,
            handler=first_waits_for_s3,
            producer=producer,
            dead_letter_topic=f"{stack.kafka.topic_prefix}dlq",
            backoff_initial_s=0.2,
            backoff_max_s=0.5,
        )
        task = asyncio.create_task(consumer.run())
        async with asyncio.timeout(30):
            while "1.2.3.2" not in handled:
                await asyncio.sleep(0.05)
            # The other partition went through while the first one waits.
            assert "1.2.3.1" not in handled
            await asyncio.sleep(1.0)
            assert consumer.waiting_reasons() == {"blob_store_unavailable"}
            while "1.2.3.1" not in handled:
                assert not task.done(), "the consumer died while waiting"
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        assert consumer.waiting_reasons() == set()
        consumer.stop()
        await task  # raises if a commit failed for leaving the group
        assert sorted(handled) == ["1.2.3.1", "1.2.3.2"]
        assert await _dead_letters(stack) == []

        # Both offsets were committed: a restart of the group sees only new records.
        handled.clear()
        await _send_to(producer, topic, "1.2.3.3", partition=2)
        await _run_until(
            _consumer(stack, producer, first_waits_for_s3, "g-long"), count_is(handled, 1)
        )
        await asyncio.sleep(0.5)
        assert handled == ["1.2.3.3"]


async def test_a_member_joining_while_a_record_waits_takes_it_over_without_loss_or_dead_letter(
    stack: Stack, topics: None
) -> None:
    topic = stack.topic(Topic.INSTANCE_RECEIVED)
    async with EventProducer(stack.kafka, "test") as producer:
        for i in range(9):
            await _send_to(producer, topic, f"1.2.3.{i + 1}", partition=i % 3)
        handled: list[str] = []
        s3_back = asyncio.Event()

        async def partition_0_waits(envelope: Envelope[InstanceReceived], record: Any) -> None:
            if record.partition == 0 and not s3_back.is_set():
                raise BlobStoreUnavailable("S3 unreachable")
            handled.append(envelope.data.sop_instance_uid)

        first = _consumer(stack, producer, partition_0_waits, "g-join")
        second = _consumer(stack, producer, partition_0_waits, "g-join")
        tasks = [asyncio.create_task(first.run())]
        async with asyncio.timeout(60):
            while len(handled) < 6:
                await asyncio.sleep(0.05)
            tasks.append(asyncio.create_task(second.run()))  # a rebalance while one waits
            await asyncio.sleep(4.0)
            assert not any(t.done() for t in tasks), "a consumer died in the rebalance"
            s3_back.set()
            while len(set(handled)) < 9:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        first.stop()
        second.stop()
        await asyncio.gather(*tasks)
    assert sorted(set(handled)) == sorted(f"1.2.3.{i + 1}" for i in range(9))
    assert len(handled) == 9, "a settled record was handled twice"
    assert await _dead_letters(stack) == []
