"""Studies waiting to be complete, kept in the broker so that a restart, or a
rebalance that moves a partition to another replica, loses none and releases none
twice.

The state of input partition *p* lives in partition *p* of a compacted changelog
topic (``radflow.router.pending``), one record per held forward request, keyed
``<group>|<idempotency key>``. The STAT lane's input (``dicom.instance.normalized.stat``)
has a changelog of its own (``radflow.router.pending.stat``), so the two lanes'
consumers never share a changelog partition. A group is one study (or series) on its way to one
destination. A request is written to the changelog, and acknowledged, before the
input record's offset is committed; a release publishes the group's requests and
then writes a tombstone for each. Whoever owns partition *p* rebuilds its groups by
reading changelog partition *p* from the start, before it is handed any input
record, and releases each group when nothing new arrived for its quiet period
(measured from the router's own clock at arrival, so a restart does not reset it).

A crash can leave input records whose requests are in the changelog uncommitted: the
new owner reads them again after its restore. While their group is held they are
recognised as members; but when the restart took longer than the quiet period, the
restored group is released at the first tick, possibly before those records come
back. So each entry keeps its input offset, and a released request's key is
remembered until a later input offset shows its record cannot come again: a replay
is then recognised, not held and released a second time.

What is left: a crash in the milliseconds between a release's publishes and its
tombstones releases that group again after the restart, with the same idempotency
keys, which the forwarder recognises. A graceful stop always finishes a release.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pydantic import AwareDatetime, BaseModel, ConfigDict

from radflow_core.compacted import partitions_of, read_latest, reader
from radflow_core.errors import ConfigurationError, PipelineError
from radflow_core.events import ForwardRequested, Lane
from radflow_core.kafka import EventProducer
from radflow_core.settings import KafkaSettings
from radflow_rules.rules import Level, StudyComplete
from router.metrics import PENDING_GROUPS, PENDING_INSTANCES, RELEASED

log = logging.getLogger(__name__)

Emit = Callable[[ForwardRequested], Awaitable[None]]


class PendingEntry(BaseModel):
    """One changelog record: a forward request held until its group is quiet."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    group: str
    level: Level
    quiet_seconds: int
    arrived_at: AwareDatetime
    request: ForwardRequested
    offset: int | None = None
    """Offset of the input record the request came from (None in records written before
    it was kept)."""


@dataclass
class Group:
    key: str
    level: Level
    quiet: timedelta
    last_arrival: datetime
    members: dict[str, ForwardRequested] = field(default_factory=dict)
    """Idempotency key → request, in arrival order."""
    offsets: dict[str, int | None] = field(default_factory=dict)
    """Idempotency key → offset of its input record."""

    @property
    def due(self) -> datetime:
        return self.last_arrival + self.quiet


def group_key(request: ForwardRequested, wait: StudyComplete) -> str:
    """Same study (or series), destination and wait → same group."""
    scope = request.series_instance_uid if wait.level is Level.SERIES else ""
    text = "|".join(
        (
            request.study_instance_uid,
            scope,
            request.destination,
            wait.level,
            str(wait.quiet_seconds),
        )
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def _record_key(group: str, idempotency_key: str) -> bytes:
    return f"{group}|{idempotency_key}".encode("ascii")


class PendingStudies:
    def __init__(
        self,
        kafka: KafkaSettings,
        producer: EventProducer,
        changelog: str,
        emit: Emit,
        lane: Lane = Lane.ROUTINE,
    ) -> None:
        """``lane``: the input lane whose partitions this instance holds state for (each
        lane has its own changelog; the gauges are labelled with it)."""
        self._lane = lane
        self._kafka = kafka
        self._producer = producer
        self._changelog = changelog
        self._emit = emit
        self._groups: dict[int, dict[str, Group]] = {}
        self._released: dict[int, dict[str, int | None]] = {}
        """Per partition, idempotency key → input offset of the requests released whose
        input record may still be read again (it was not yet passed)."""
        self._lock = asyncio.Lock()

    @property
    def partitions(self) -> set[int]:
        return set(self._groups)

    def groups(self) -> list[Group]:
        return [g for groups in self._groups.values() for g in groups.values()]

    async def add(
        self,
        partition: int,
        request: ForwardRequested,
        wait: StudyComplete,
        now: datetime,
        offset: int | None = None,
    ) -> None:
        """Hold ``request`` until its group is quiet; returns once the changelog has it.
        ``offset`` is its input record's: records of a partition come in offset order,
        so one at ``offset`` means none before it will be read again.

        Raises:
            BrokerUnavailable: not recorded (the input record will be handled again).
        """
        key = group_key(request, wait)
        entry = PendingEntry(
            group=key,
            level=wait.level,
            quiet_seconds=wait.quiet_seconds,
            arrived_at=now,
            request=request,
            offset=offset,
        )
        async with self._lock:
            released = self._released.setdefault(partition, {})
            if offset is not None and released:
                for passed in [k for k, o in released.items() if o is not None and o < offset]:
                    del released[passed]
            if request.idempotency_key in released:
                return  # a replayed input record: already released
            group = self._groups.setdefault(partition, {}).get(key)
            if group is not None and request.idempotency_key in group.members:
                return  # a replayed input record: already held
            await self._producer.send(
                self._changelog,
                _record_key(key, request.idempotency_key),
                entry.model_dump_json().encode("utf-8"),
                partition=partition,
            )
            self._apply(partition, entry)
            self._update_gauges()

    def _apply(self, partition: int, entry: PendingEntry) -> None:
        groups = self._groups.setdefault(partition, {})
        group = groups.get(entry.group)
        if group is None:
            group = Group(
                entry.group, entry.level, timedelta(seconds=entry.quiet_seconds), entry.arrived_at
            )
            groups[entry.group] = group
        group.members[entry.request.idempotency_key] = entry.request
        group.offsets[entry.request.idempotency_key] = entry.offset
        group.last_arrival = max(group.last_arrival, entry.arrived_at)

    async def restore(self, partitions: set[int]) -> None:
        """Rebuild the groups of newly assigned input partitions from the changelog.

        Raises:
            ConfigurationError: the changelog has fewer partitions than the input.
        """
        wanted = sorted(p for p in partitions if p not in self._groups)
        if not wanted:
            return
        consumer = reader(self._kafka)
        await consumer.start()
        try:
            available = await partitions_of(consumer, self._changelog)
            missing = [p for p in wanted if p not in available]
            if missing:
                raise ConfigurationError(
                    f"{self._changelog} has partitions {sorted(available)} but the input "
                    f"has {wanted}; the changelog needs at least as many partitions"
                )
            latest = await read_latest(consumer, self._changelog, wanted)
        finally:
            await consumer.stop()
        restored = {
            partition: {
                key.decode("ascii"): PendingEntry.model_validate_json(value)
                for key, value in records.items()
            }
            for partition, records in latest.items()
        }
        async with self._lock:
            for partition, entries in restored.items():
                self._groups[partition] = {}
                self._released[partition] = {}
                for entry in entries.values():
                    self._apply(partition, entry)
            self._update_gauges()
        count = sum(len(g) for p, g in self._groups.items() if p in restored)
        log.info(
            "pending studies restored",
            extra={"pending": count, "count": len(wanted), "topic": self._changelog},
        )

    async def forget(self, partitions: set[int]) -> None:
        """Drop revoked partitions' groups (their new owner restores them); waits for a
        release in progress to finish first."""
        async with self._lock:
            for partition in partitions:
                self._groups.pop(partition, None)
                self._released.pop(partition, None)
            self._update_gauges()

    async def release_due(self, now: datetime | None = None) -> int:
        """Release every group whose quiet period is over; returns how many."""
        now = now or datetime.now(UTC)
        released = 0
        async with self._lock:
            for partition, groups in list(self._groups.items()):
                for group in [g for g in groups.values() if g.due <= now]:
                    try:
                        await self._release(partition, group, now)
                    except PipelineError as exc:
                        log.warning(
                            "release failed; will try again",
                            extra={"reason": exc.reason, "instances": len(group.members)},
                        )
                        return released
                    del groups[group.key]
                    self._released.setdefault(partition, {}).update(group.offsets)
                    released += 1
            self._update_gauges()
        return released

    async def _release(self, partition: int, group: Group, now: datetime) -> None:
        requests = [
            r.model_copy(update={"routed_at": now, "waited_for": group.level.value})
            for r in group.members.values()
        ]
        await asyncio.gather(*(self._emit(r) for r in requests))
        await asyncio.gather(
            *(
                self._producer.send(
                    self._changelog, _record_key(group.key, key), None, partition=partition
                )
                for key in group.members
            )
        )
        RELEASED.inc()
        first = requests[0]
        log.info(
            "study complete; released",
            extra={
                "study_instance_uid": first.study_instance_uid,
                "destination": first.destination,
                "level": group.level.value,
                "instances": len(requests),
            },
        )

    async def run(self, interval_s: float, stopping: asyncio.Event) -> None:
        """Release due groups every ``interval_s`` until ``stopping`` is set (a release
        in progress is finished, never cut)."""
        while not stopping.is_set():
            await self.release_due()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=interval_s)

    def _update_gauges(self) -> None:
        groups = self.groups()
        PENDING_GROUPS.labels(self._lane.value).set(len(groups))
        PENDING_INSTANCES.labels(self._lane.value).set(sum(len(g.members) for g in groups))
