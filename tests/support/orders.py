"""Worklist items on ``worklist.items``, as the worklist service writes them: what the
order lookup tests produce directly (the worklist service is not needed for them)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from pydantic import SecretStr

from radflow_core.events import BlobRef, OrderPriority, OrderProcedure, WorklistItem
from radflow_core.kafka import EventProducer
from radflow_core.orders import DEVELOPMENT_KEY, order_ref
from support.stack import Stack

KEY = SecretStr(DEVELOPMENT_KEY)
"""The services' default order reference key (the tests set none)."""


def item(
    accession: str,
    issuer: str | None = "RIS_A",
    *,
    site: str = "site-a",
    priority: OrderPriority = OrderPriority.ROUTINE,
    step_id: str = "SPS1",
    procedure: OrderProcedure | None = None,
    updated_at: datetime | None = None,
) -> WorklistItem:
    return WorklistItem(
        site=site,
        order_ref=order_ref(accession, issuer, KEY),
        step_id=step_id,
        priority=priority,
        modality="CT",
        procedure=procedure,
        document=BlobRef(bucket="radflow", key="order/x/y.json", size=2, sha256="a" * 64),
        updated_at=updated_at or datetime.now(UTC),
    )


async def publish(stack: Stack, *items: WorklistItem) -> None:
    async with EventProducer(stack.kafka, "worklist-test") as producer:
        for one in items:
            await producer.publish(one, one.key)


async def cancel(stack: Stack, *items: WorklistItem) -> None:
    """Tombstones: the items are cancelled (or completed)."""
    async with EventProducer(stack.kafka, "worklist-test") as producer:
        for one in items:
            await producer.send(stack.topic(one.topic), one.key, None)  # type: ignore[arg-type]


def publish_now(stack: Stack, *items: WorklistItem) -> None:
    """:func:`publish` from a synchronous test."""
    asyncio.run(publish(stack, *items))


def cancel_now(stack: Stack, *items: WorklistItem) -> None:
    asyncio.run(cancel(stack, *items))
