"""Pending studies on the real broker across a crash that left input records
uncommitted: a record read again after its restored study was released is not held
and released a second time."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from radflow_core.events import ForwardRequested
from radflow_core.kafka import EventProducer
from radflow_core.topics import Topic
from radflow_rules.rules import Level, StudyComplete
from router.pending import PendingStudies
from support import forward
from support.dicom import make_instance
from support.stack import Stack

WAIT = StudyComplete(quiet_seconds=5, level=Level.STUDY)


def test_a_record_read_again_after_its_restored_study_left_is_not_released_twice(
    stack: Stack, tmp_path: Path
) -> None:
    request = forward.stored(stack, [make_instance(tmp_path / "a.dcm")], "pacs")[0]
    arrived = datetime.now(UTC)
    emitted: list[ForwardRequested] = []

    async def emit(released: ForwardRequested) -> None:
        emitted.append(released)

    async def run() -> list[int]:
        changelog = stack.topic(Topic.ROUTER_PENDING)
        async with EventProducer(stack.kafka, "test-router") as producer:

            def router() -> PendingStudies:
                return PendingStudies(stack.kafka, producer, changelog, emit)

            crashed = router()
            await crashed.restore({0})
            await crashed.add(0, request, WAIT, arrived, offset=7)
            # It dies before committing input offset 7. Its successor restores the
            # study after the quiet period is over and releases it at the first tick...
            restarted = router()
            await restarted.restore({0})
            later = arrived + timedelta(seconds=WAIT.quiet_seconds + 1)
            first = await restarted.release_due(later)
            # ...and only then reads input record 7 again.
            await restarted.add(0, request, WAIT, later, offset=7)
            again = await restarted.release_due(later + timedelta(hours=1))
            # The same instance sent anew (a later record) is held as any other.
            await restarted.add(0, request, WAIT, later, offset=8)
            resent = await restarted.release_due(later + timedelta(hours=1))
            after = router()
            await after.restore({0})
            return [first, again, resent, len(after.groups())]

    assert asyncio.run(run()) == [1, 0, 1, 0]
    assert [r.idempotency_key for r in emitted] == [request.idempotency_key] * 2
