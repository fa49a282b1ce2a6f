"""The order table: the open orders of ``worklist.items`` read from the start with no
consumer group, kept current (new items, tombstones) and rebuilt by a new process; an
unavailable topic leaves it empty without stopping anything."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta

import pytest

from radflow_core.events import OrderPriority, OrderProcedure
from radflow_core.kafka import EventProducer, ensure_topics
from radflow_core.order_table import OrderTable
from radflow_core.settings import KafkaSettings
from radflow_core.topics import Topic
from support.orders import KEY, cancel, item, publish
from support.stack import Stack

pytestmark = pytest.mark.pipeline


@asynccontextmanager
async def running(kafka: KafkaSettings, retry_s: float = 0.2) -> AsyncIterator[OrderTable]:
    table = OrderTable(kafka, KEY, retry_interval_s=retry_s)
    task = asyncio.create_task(table.run())
    try:
        yield table
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def until(what: str, check: object, timeout_s: float = 10.0) -> None:
    """Wait in the event loop (the table runs in it) until ``check()`` is true."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not check():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def test_open_orders_are_found_by_accession_and_issuer_and_tombstones_remove_them(
    stack: Stack,
) -> None:
    ct = OrderProcedure(code="CTHEAD", scheme="L", meaning="CT head without contrast")
    stat = item("ACC1", priority=OrderPriority.STAT, procedure=ct)
    routine = item("ACC2", site="site-b")
    await publish(stack, stat, routine)

    async with running(stack.kafka) as table:
        await asyncio.wait_for(table.loaded.wait(), 10)
        found = table.lookup("ACC1", "RIS_A")
        assert found is not None
        assert (found.site, found.priority, found.procedure) == ("site-a", "stat", ct)
        assert table.lookup("ACC1 ", " RIS_A") == found, "DICOM padding is not part of it"
        assert table.lookup("ACC1", "RIS_B") is None, "another issuer's ACC1 is another order"
        assert table.lookup("ACC1", None) is None
        assert table.lookup("ACC9", "RIS_A") is None
        assert table.lookup("ACC2", "RIS_A") == routine

        await cancel(stack, stat)
        await until("the cancelled order gone", lambda: table.lookup("ACC1", "RIS_A") is None)
        late = item("ACC3", priority=OrderPriority.STAT)
        await publish(stack, late)
        await until("a new order seen", lambda: table.lookup("ACC3", "RIS_A") == late)
        assert len(table) == 2


async def test_an_order_of_several_steps_answers_with_its_most_urgent_step(
    stack: Stack,
) -> None:
    now = datetime.now(UTC)
    old_routine = item("ACC1", step_id="1", updated_at=now - timedelta(minutes=5))
    newer_routine = item("ACC1", step_id="2", updated_at=now)
    asap = item("ACC1", step_id="3", priority=OrderPriority.ASAP, updated_at=now)
    await publish(stack, old_routine, newer_routine)
    async with running(stack.kafka) as table:
        await asyncio.wait_for(table.loaded.wait(), 10)
        assert table.lookup("ACC1", "RIS_A") == newer_routine
        await publish(stack, asap)
        await until("the asap step wins", lambda: table.lookup("ACC1", "RIS_A") == asap)
        await cancel(stack, asap, newer_routine)
        await until("the remaining step", lambda: table.lookup("ACC1", "RIS_A") == old_routine)


async def test_a_new_table_is_rebuilt_from_the_topic(stack: Stack) -> None:
    kept, cancelled = item("ACC1", priority=OrderPriority.STAT), item("ACC2")
    await publish(stack, kept, cancelled)
    await cancel(stack, cancelled)
    async with running(stack.kafka) as first:
        await asyncio.wait_for(first.loaded.wait(), 10)
    async with running(stack.kafka) as restarted:
        await asyncio.wait_for(restarted.loaded.wait(), 10)
        assert restarted.lookup("ACC1", "RIS_A") == kept
        assert restarted.lookup("ACC2", "RIS_A") is None
        assert len(restarted) == 1


async def test_without_the_topic_nothing_matches_and_the_table_loads_once_it_exists(
    stack: Stack,
) -> None:
    kafka = stack.kafka.model_copy(update={"topic_prefix": stack.kafka.topic_prefix + "late."})
    async with running(kafka) as table:
        await asyncio.sleep(0.5)
        assert not table.loaded.is_set()
        assert table.lookup("ACC1", "RIS_A") is None
        await ensure_topics(kafka, [kafka.topic(Topic.WORKLIST_ITEMS)])
        async with EventProducer(kafka, "t") as p:
            one = item("ACC1")
            await p.publish(one, one.key)
        await asyncio.wait_for(table.loaded.wait(), 15)
        await until("the order found", lambda: table.lookup("ACC1", "RIS_A") == one)
