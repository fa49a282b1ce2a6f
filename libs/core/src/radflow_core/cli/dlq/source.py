"""The broker side of ``radflow dlq``: reading letters, what was delivered and the
originals letters lack, and publishing replays. Reads join no consumer group
(:func:`radflow_core.history.read_history`), so looking never moves a service's offsets.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

from radflow_core.cli.dlq.letters import (
    Filters,
    Letter,
    Original,
    delivery_key,
    letter_of,
    report_key,
)
from radflow_core.cli.dlq.replay import Action, Outcome
from radflow_core.history import read_history
from radflow_core.kafka import EventProducer
from radflow_core.settings import KafkaSettings
from radflow_core.topics import Topic

SERVICE = "radflow-cli"


async def read_letters(
    kafka: KafkaSettings,
    filters: Filters,
    since: datetime | None = None,
    until: datetime | None = None,
    idle_s: float = 1.5,
) -> list[Letter]:
    """The letters ``filters`` select, appended within [since, until], oldest first."""
    topics = filters.read_topics()
    logical = {kafka.topic(t): t for t in topics}
    letters = [
        letter
        async for record in read_history(kafka, topics, since, until, idle_s)
        if filters.matches(letter := letter_of(logical[record.topic], record))
    ]
    return sorted(letters, key=lambda x: (x.appended_at, x.topic.value, x.partition, x.offset))


async def settled(
    kafka: KafkaSettings, keys: Iterable[str], idle_s: float = 1.5
) -> dict[str, tuple[datetime, str]]:
    """Settling key → when it was last said done and what said it (``delivered
    (dicom.forward.completed at …)``, ``returned (report.returned at …)``), for the keys
    asked about. A replay the consumer recognised as done counts. The last one is kept:
    a delivery that verification later found missing is settled only by a newer one."""
    wanted = set(keys)
    topics = [
        topic
        for topic, prefix in (
            (Topic.FORWARD_COMPLETED, "delivery:"),
            (Topic.REPORT_RETURNED, "report:"),
        )
        if any(key.startswith(prefix) for key in wanted)
    ]
    found: dict[str, tuple[datetime, str]] = {}
    if not topics:
        return found
    completed = kafka.topic(Topic.FORWARD_COMPLETED)
    async for record in read_history(kafka, topics, idle_s=idle_s):
        data = (record.envelope() or {}).get("data")
        if not isinstance(data, dict):
            continue
        if record.topic == completed:
            key = delivery_key(str(data.get("idempotency_key")))
            said = f"delivered ({Topic.FORWARD_COMPLETED.value} at {data.get('delivered_at')})"
        else:
            version = data.get("report_version")
            key = report_key(
                str(data.get("site")),
                str(data.get("report_id")),
                version if isinstance(version, int) else None,
                str(data.get("channel") or "oru"),
            )
            said = f"returned ({Topic.REPORT_RETURNED.value} at {data.get('acked_at')})"
        if key in wanted and (key not in found or found[key][0] <= record.appended_at):
            found[key] = (record.appended_at, said)
    return found


async def find_originals(
    kafka: KafkaSettings, letters: Sequence[Letter], idle_s: float = 1.5
) -> dict[str, Original]:
    """Letter id → the original its lookup names, for letters that do not carry one,
    from what the source topics still retain."""
    pending = [x for x in letters if x.original is None and x.lookup is not None]
    if not pending:
        return {}
    topics = sorted({t for x in pending if x.lookup for t in x.lookup.topics})
    logical = {kafka.topic(t): t for t in topics}
    found: dict[str, Original] = {}
    async for record in read_history(kafka, topics, idle_s=idle_s):
        topic = logical[record.topic]
        for letter in pending:
            if letter.id in found or letter.lookup is None:
                continue
            if letter.lookup.matches(record, topic):
                value = record.value.decode("utf-8", "replace")
                found[letter.id] = Original(record.topic, record.key, value)
    return found


async def publish(kafka: KafkaSettings, actions: Sequence[Action]) -> int:
    """Publish every REPLAY action's original, in order; returns how many.

    Raises:
        BrokerUnavailable: a record was not acknowledged (those before it were).
    """
    count = 0
    async with EventProducer(kafka, SERVICE) as producer:
        for action in actions:
            if action.outcome is not Outcome.REPLAY or action.original is None:
                continue
            original = action.original
            key = original.key.encode("utf-8") if original.key is not None else None
            await producer.send(original.topic, key, original.value.encode("utf-8"))
            count += 1
    return count
