"""Reading what the topics retain: the operator tools' (``radflow``) and the router's
what-if replay's view of the past.

The reader joins no consumer group and commits nothing, so looking never moves a
service's offsets. It reads each topic from its earliest retained record and stops
when the broker has had nothing more for ``idle_s``: end offsets are not used to know
where "now" is, because Tansu (the development broker) under-reports them. The time
window is applied to the record's Kafka timestamp (the time it was appended), so it
works on every broker without ListOffsets by time.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer

from radflow_core.kafka import connection_options
from radflow_core.settings import KafkaSettings
from radflow_core.topics import Topic


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One retained record, with where it sits (what a replay or a dead letter names)."""

    topic: str
    """The topic name as the broker knows it (with the deployment's prefix)."""
    partition: int
    offset: int
    appended_at: datetime
    key: str | None
    value: bytes

    def envelope(self) -> dict[str, Any] | None:
        """The record's CloudEvents envelope as JSON, or None when it is not JSON."""
        try:
            parsed = json.loads(self.value)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None


async def read_history(
    kafka: KafkaSettings,
    topics: Iterable[Topic],
    since: datetime | None = None,
    until: datetime | None = None,
    idle_s: float = 1.5,
) -> AsyncIterator[HistoryRecord]:
    """Yield every retained record of ``topics`` appended within [since, until].

    Topics the cluster does not
    have are skipped (a pipeline that never dead-lettered has no failed topic yet).
    Records arrive in offset order within a partition, not across partitions.
    """
    wanted = {kafka.topic(t) for t in topics}
    consumer = AIOKafkaConsumer(
        **connection_options(kafka),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
    )
    try:
        await consumer.start()
        present = sorted(wanted & set(await consumer.topics()))
        if not present:
            return
        consumer.subscribe(present)
        idle_ms = int(idle_s * 1000)
        while True:
            batch = await consumer.getmany(timeout_ms=idle_ms)
            if not batch:
                return
            for records in batch.values():
                for record in records:
                    appended = datetime.fromtimestamp(record.timestamp / 1000, UTC)
                    if since is not None and appended < since:
                        continue
                    if until is not None and appended > until:
                        continue
                    yield HistoryRecord(
                        topic=record.topic,
                        partition=record.partition,
                        offset=record.offset,
                        appended_at=appended,
                        key=record.key.decode("utf-8", "replace") if record.key else None,
                        value=record.value or b"",
                    )
    finally:
        await consumer.stop()
