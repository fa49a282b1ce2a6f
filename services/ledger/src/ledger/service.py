"""The ledger's lifecycle: one consumer over every forward topic, the book of the
partitions it owns (restored from the changelog on assignment), the tick that
publishes ``dicom.study.delivered``, forgets old studies and sets the overdue gauge,
and the HTTP routes on the ops port.

Every forward topic is keyed by Study Instance UID and the consumer takes partition
*p* of each of them (the range assignor), so one replica sees all of a study's
requests and outcomes, and keeps its state in partition *p* of ``radflow.ledger``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from aiokafka import TopicPartition

from ledger import metrics
from ledger.book import Book, Entry, Fact, Mark, Study, Tally, tally
from ledger.changelog import Changelog
from ledger.settings import LedgerConfig
from radflow_core.audit import Auditor
from radflow_core.consumer import EventConsumer
from radflow_core.errors import PipelineError
from radflow_core.events import (
    Envelope,
    EventModel,
    ForwardCompleted,
    ForwardFailed,
    ForwardRequested,
    ForwardVerified,
    Lane,
    StudyDelivered,
)
from radflow_core.kafka import EventProducer
from radflow_core.shell import Shell
from radflow_core.topics import Topic

log = logging.getLogger(__name__)

SERVICE = "ledger"


class LedgerService:
    def __init__(self, config: LedgerConfig) -> None:
        settings = config.ledger
        kafka = config.kafka
        self._settings = settings
        self._verify = frozenset(settings.verify_destinations)
        self._overdue_after = timedelta(seconds=settings.overdue_after_s)
        self._producer = EventProducer(kafka, SERVICE)
        self._audit = Auditor(SERVICE, self._producer, config.audit)
        models: dict[str, type[EventModel]] = {
            kafka.topic(Lane.ROUTINE.topic(Topic.FORWARD_REQUESTED)): ForwardRequested,
            kafka.topic(Lane.STAT.topic(Topic.FORWARD_REQUESTED)): ForwardRequested,
            kafka.topic(Topic.FORWARD_COMPLETED): ForwardCompleted,
            kafka.topic(Topic.FORWARD_VERIFIED): ForwardVerified,
            kafka.topic(Topic.FORWARD_FAILED): ForwardFailed,
        }
        self.book = Book()
        self._lock = asyncio.Lock()
        self._changelog = Changelog(kafka, self._producer, kafka.topic(Topic.LEDGER), list(models))
        self._gauged: set[str] = set()
        self._watched: set[tuple[int, str]] = set()
        """(partition, study) the tick looks at (see :meth:`tick`)."""
        self.shell = Shell(
            SERVICE,
            producer=self._producer,
            blobs=None,
            ops=config.ops,
            http_host=settings.http_host,
            http_port=settings.http_port,
            routes=[
                web.get("/ledger/studies/{uid}", self._get_study),
                web.get("/ledger/overdue", self._get_overdue),
            ],
            audit=self._audit,
        )
        self.failed = self.shell.failed
        self._consumer: EventConsumer[Any] = EventConsumer(
            kafka,
            service=SERVICE,
            group_id=settings.group_id,
            topics=list(models),
            model=ForwardRequested,
            models=models,
            co_partitioned=True,
            batch_handler=self._handle,
            producer=self._producer,
            dead_letter_topic=kafka.topic(Topic.INSTANCE_FAILED),
            on_assigned=self._assigned,
            on_revoked=self._revoked,
            max_records=500,
        )
        self.shell.consume(self._consumer)
        self.shell.loop("tick", self._run, graceful=True)

    async def start(self) -> None:
        await self.shell.start()

    async def stop(self) -> None:
        await self.shell.stop()

    # -- input ---------------------------------------------------------------------

    async def _handle(self, items: list[tuple[Envelope[Any], Any]]) -> None:
        """Add a fetch's facts: their entries are acknowledged by the changelog before
        the book (and, on return, the input offsets) move on; a batch tried again after
        a broker error writes the same entries again."""
        now = datetime.now(UTC)
        async with self._lock:
            changed: dict[tuple[int, str], Entry] = {}
            for envelope, record in items:
                fact: Fact = envelope.data
                slot = (record.partition, fact.idempotency_key)
                known = changed.get(slot) or self._known(record.partition, fact)
                entry = Entry.first(fact, now) if known is None else known.merge(fact, now)
                if entry is not known:
                    changed[slot] = entry
            by_partition: dict[int, list[Entry]] = {}
            for (partition, _), entry in changed.items():
                by_partition.setdefault(partition, []).append(entry)
            await asyncio.gather(
                *(self._changelog.write(p, entries) for p, entries in by_partition.items())
            )
            for (partition, _), entry in changed.items():
                self.book.restore_entry(partition, entry)

    def _known(self, partition: int, fact: Fact) -> Entry | None:
        study = self.book.study(fact.study_instance_uid)
        return None if study is None else study.entries.get(fact.idempotency_key)

    async def _assigned(self, partitions: set[TopicPartition]) -> None:
        try:
            async with self._lock:
                await self._changelog.restore(self.book, {tp.partition for tp in partitions})
        except Exception:
            # Counting without the partition's state would publish studies as delivered
            # that are not, or miss them: stop, and let the orchestrator restart us.
            log.exception("cannot restore the ledger; stopping")
            self._consumer.stop()
            self.shell.failed.set()
            raise

    async def _revoked(self, partitions: set[TopicPartition]) -> None:
        async with self._lock:
            for partition in {tp.partition for tp in partitions}:
                self.book.drop(partition)

    # -- the tick ------------------------------------------------------------------

    async def _run(self) -> None:
        """Tick until the service stops (a publication in progress is finished)."""
        stopping = self.shell.stopping
        while not stopping.is_set():
            if self.shell.connected.is_set():
                try:
                    await self.tick(datetime.now(UTC))
                except PipelineError as exc:
                    log.warning("ledger tick not finished; next time", extra={"reason": exc.reason})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=self._settings.tick_interval_s)

    async def tick(self, now: datetime) -> None:
        """Forget the old studies, publish the studies delivered, refresh the gauges.

        Only the studies that changed since the last tick, or that the last tick left
        watched (an instance still on its way, or all arrived and not yet published),
        are looked at: a study whose instances all arrived or failed has nothing
        overdue and nothing to publish until a new fact comes (it then changes).

        Raises:
            BrokerUnavailable: stopped at a study; the next tick goes on from there.
        """
        quiet = timedelta(seconds=self._settings.quiet_s)
        forget = timedelta(seconds=self._settings.forget_after_s)
        async with self._lock:
            studies = 0
            for partition, kept in list(self.book.studies()):
                if kept.last_seen is None or now - kept.last_seen > forget:
                    await self._changelog.forget(partition, kept.uid, list(kept.entries))
                    self.book.forget(partition, kept.uid)
                else:
                    studies += 1
            metrics.STUDIES.set(studies)
            # Kept whole until this tick has finished: a broker error loses none.
            self._watched |= self.book.take_changed()
            watched: set[tuple[int, str]] = set()
            overdue: dict[str, int] = {}
            for partition, uid in sorted(self._watched):
                study = self.book.get(partition, uid)
                if study is None:
                    continue
                event = study.delivered(self._verify, now, quiet)
                if event is not None:
                    await self._publish(partition, study, event, now)
                for entry in study.entries.values():
                    late = entry.overdue(
                        entry.destination in self._verify, now, self._overdue_after
                    )
                    overdue[entry.destination] = overdue.get(entry.destination, 0) + late
                if study.watched(self._verify):
                    watched.add((partition, uid))
            self._watched = watched
            for destination in self._gauged - set(overdue):
                metrics.OVERDUE.labels(destination).set(0)
            for destination, count in overdue.items():
                metrics.OVERDUE.labels(destination).set(count)
            self._gauged |= set(overdue)

    async def _publish(
        self, partition: int, study: Study, event: StudyDelivered, now: datetime
    ) -> None:
        """``dicom.study.delivered``, then its mark in the changelog (a crash between
        the two publishes the same revision once more)."""
        await self._producer.publish(event, event.key)
        mark = Mark(
            study_instance_uid=study.uid,
            revision=event.revision,
            entries=len(study.diagnostic()),
            published_at=now,
        )
        await self._changelog.write_mark(partition, mark)
        study.mark = mark
        metrics.STUDIES_DELIVERED.inc()
        log.info(
            "study delivered",
            extra={
                "study_instance_uid": study.uid,
                "revision": event.revision,
                "instances": event.instances,
                "count": len(event.destinations),
            },
        )

    # -- HTTP ----------------------------------------------------------------------

    async def _get_study(self, request: web.Request) -> web.Response:
        uid = request.match_info["uid"]
        now = datetime.now(UTC)
        study = self.book.study(uid)
        if study is None or not study.entries:
            return web.json_response(
                {
                    "error": "study not in the ledger",
                    "study_instance_uid": uid,
                    "partitions": sorted(self.book.partitions),
                },
                status=404,
            )
        destinations = []
        for name, entries in study.destinations().items():
            verify = name in self._verify
            counts = tally(name, entries, verify, now, self._overdue_after)
            destinations.append(
                {
                    **_counts(counts),
                    "instances": [
                        _instance(e, verify, now, self._overdue_after)
                        for e in sorted(entries, key=_order)
                    ],
                }
            )
        mark = study.mark
        return web.json_response(
            {
                "study_instance_uid": uid,
                "instances": len({e.sop_instance_uid for e in study.diagnostic()}),
                "previews": len({e.sop_instance_uid for e in study.entries.values() if e.preview}),
                "destinations": destinations,
                "delivered": None
                if mark is None
                else {"revision": mark.revision, "published_at": mark.published_at.isoformat()},
                "last_change": None if study.last_seen is None else study.last_seen.isoformat(),
            }
        )

    async def _get_overdue(self, request: web.Request) -> web.Response:
        wanted = request.query.get("destination")
        now = datetime.now(UTC)
        late = [
            entry
            for _, study in self.book.studies()
            for entry in study.entries.values()
            if (wanted is None or entry.destination == wanted)
            and entry.overdue(entry.destination in self._verify, now, self._overdue_after)
        ]
        by_destination: dict[str, int] = {}
        for entry in late:
            by_destination[entry.destination] = by_destination.get(entry.destination, 0) + 1
        return web.json_response(
            {
                "overdue_after_s": self._settings.overdue_after_s,
                "destinations": dict(sorted(by_destination.items())),
                "instances": [
                    {
                        "study_instance_uid": e.study_instance_uid,
                        **_instance(e, e.destination in self._verify, now, self._overdue_after),
                    }
                    for e in sorted(late, key=_order)
                ],
            }
        )


def _order(entry: Entry) -> tuple[str, str, str]:
    return (entry.destination, entry.series_instance_uid, entry.sop_instance_uid)


def _counts(counts: Tally) -> dict[str, Any]:
    return {
        "destination": counts.destination,
        "verification": counts.verify,
        "routed": counts.routed,
        "delivered": counts.delivered,
        "verified": counts.verified,
        "failed": counts.failed,
        "pending": counts.pending,
        "overdue": counts.overdue,
        "reached": counts.reached,
    }


def _instance(entry: Entry, verify: bool, now: datetime, after: timedelta) -> dict[str, Any]:
    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "destination": entry.destination,
        "series_instance_uid": entry.series_instance_uid,
        "sop_instance_uid": entry.sop_instance_uid,
        "idempotency_key": entry.idempotency_key,
        "lane": entry.lane,
        "status": entry.status.value,
        "reached": entry.reached(verify),
        "overdue": entry.overdue(verify, now, after),
        "routed_at": iso(entry.routed_at),
        "delivered_at": iso(entry.delivered_at),
        "verified_at": iso(entry.verified_at),
        "failed_at": iso(entry.failed_at),
        "failure": entry.failure,
        "preview": entry.preview,
        "age_s": None
        if entry.routed_at is None
        else round((now - entry.routed_at).total_seconds()),
    }
