"""Several instances of a partition's fetch in flight at once, each settled on its own.

The consumer hands over a partition's fetch (its batch mode) and commits past it only
when :meth:`InFlight.handle_batch` returns, so every record before a committed offset
is settled: normalized, found done before, or dead-lettered. Records are started in
offset order while the :class:`~transcode.window.Window` has room; two records of one
SOP Instance UID run one after the other, so a second version of an instance never
overtakes the first and a repeated event finds the first one's marker. After a
retriable failure (S3 or the broker unreachable) records are started one at a time
until one succeeds, so an outage does not run through a whole window of records and
dead-letter them all.

Only records that may have been done before ask for the normalized marker (one HEAD
each): those of the first :data:`REPLAY_WINDOW` offsets of a partition after it is
assigned (a process that had it before committed after each fetch, so what it may
have done without committing lies there), and a second record of the same SOP
Instance UID in one fetch. The others were never seen by this consumer group; a
record asked for wrongly would only be normalized again and announced again, which
is recognised downstream.

Failures are settled as the consumer settles them for one record at a time: a
retriable one is retried with capped backoff for as long as it lasts (the partition
is paused meanwhile, the consumer keeps polling); any other is dead-lettered with its
reason at once. When the turn must be handed back (stop, or the partition moved),
nothing new is started, what was started is finished or its wait cut short, and the
batch is handed back (it raises HandedBack): nothing of it is committed, it is read
again, and the records finished meanwhile find their markers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from aiokafka import ConsumerRecord, TopicPartition

from radflow_core.consumer import CONSUMED, dead_letter
from radflow_core.errors import PipelineError
from radflow_core.events import Envelope, InstanceReceived
from radflow_core.kafka import EventProducer
from radflow_core.retry import HandedBack, current_turn
from transcode import metrics
from transcode.window import Window

log = logging.getLogger(__name__)

Work = Callable[[InstanceReceived, bool, Callable[[str, str], Awaitable[None]]], Awaitable[None]]
"""Normalize one instance; the flag says whether it may have been done before; the
callable dead-letters its record with (reason, message) for a preview that cannot be
made, while the instance itself goes on."""
REPLAY_WINDOW = 200
"""Offsets after a partition's first record since it was assigned that another
process may have settled without committing: it commits after each fetch, and a
fetch holds at most 100 records of a partition (the consumer's ``max_records``),
doubled for a margin."""
Item = tuple[Envelope[InstanceReceived], ConsumerRecord[bytes, bytes]]


class InFlight:
    """Runs ``work`` for the records of a batch, several at once."""

    def __init__(
        self,
        work: Work,
        producer: EventProducer,
        *,
        service: str,
        dead_letter_topic: str,
        concurrency: int,
        max_bytes: int,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self._work = work
        self._producer = producer
        self._service = service
        self._dead_letter_topic = dead_letter_topic
        self._dead_letter = functools.partial(dead_letter, producer, dead_letter_topic, service)
        self._window = Window(concurrency, max_bytes)
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._degraded = False
        """A retriable failure happened and no success since: start one at a time."""
        self._replay_until: dict[TopicPartition, int] = {}
        """Per partition, the offset from which no record can have been done before."""

    async def assigned(self, partitions: set[TopicPartition]) -> None:
        """A partition (re)assigned may start with records done by its last owner."""
        for tp in partitions:
            self._replay_until.pop(tp, None)

    revoked = assigned

    async def handle_batch(self, items: list[Item]) -> None:
        """Settle every record of ``items`` (one partition's, in offset order).

        Raises:
            HandedBack: the turn is handed back before every record was settled.
            BrokerUnavailable: a dead letter could not be written.
        """
        hand_back = current_turn().hand_back
        tasks: list[asyncio.Task[None]] = []
        latest: dict[str, asyncio.Task[None]] = {}
        if items:
            first = items[0][1]
            tp = TopicPartition(first.topic, first.partition)
            replay_until = self._replay_until.setdefault(tp, first.offset + REPLAY_WINDOW)
        try:
            for envelope, record in items:
                received = envelope.data
                weight = await self._window.acquire(received.blob.size, alone=self._degraded)
                if hand_back.is_set() or any(_failed(t) for t in tasks):
                    self._window.release(weight)
                    break
                before = latest.get(received.sop_instance_uid)
                may_be_done = before is not None or record.offset < replay_until
                task = asyncio.create_task(self._run(received, record, before, may_be_done))
                task.add_done_callback(functools.partial(self._released, weight))
                tasks.append(task)
                latest[received.sop_instance_uid] = task
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            self._read_again(items)
            raise
        for result in results:
            if isinstance(result, BaseException):
                self._read_again(items)
                raise result
        if len(tasks) < len(items):
            self._read_again(items)
            raise HandedBack(f"{len(items) - len(tasks)} of {len(items)} not started")

    def _read_again(self, items: list[Item]) -> None:
        """This fetch will be read again, some of it done: its records ask for markers."""
        last = items[-1][1]
        tp = TopicPartition(last.topic, last.partition)
        self._replay_until[tp] = max(self._replay_until.get(tp, 0), last.offset + 1)

    def _released(self, weight: int, _: asyncio.Task[None]) -> None:
        self._window.release(weight)

    async def _run(
        self,
        received: InstanceReceived,
        record: ConsumerRecord[bytes, bytes],
        before: asyncio.Task[None] | None,
        may_be_done: bool,
    ) -> None:
        if before is not None:
            await asyncio.wait([before])
            if _failed(before):
                raise HandedBack("an earlier record of this instance was not settled")
        metrics.IN_FLIGHT.inc()
        try:
            await self._settle(received, record, may_be_done)
        finally:
            metrics.IN_FLIGHT.dec()

    async def _settle(
        self, received: InstanceReceived, record: ConsumerRecord[bytes, bytes], may_be_done: bool
    ) -> None:
        turn = current_turn()
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._work(
                    received,
                    may_be_done,
                    functools.partial(self._dead_letter, record, retriable=False, attempts=1),
                )
                self._degraded = False
            except PipelineError as exc:
                self._degraded = self._degraded or exc.retriable
                if exc.retriable:
                    CONSUMED.labels(record.topic, "retried").inc()
                    await turn.pause(
                        attempt,
                        exc.reason,
                        initial_s=self._backoff_initial_s,
                        max_s=self._backoff_max_s,
                    )
                    continue
                await self._dead_letter(record, exc.reason, str(exc), False, attempt)
            except Exception as exc:
                log.exception("unexpected error in handler", extra={"topic": record.topic})
                await self._dead_letter(
                    record, "unexpected_error", type(exc).__name__, False, attempt
                )
            return


def _failed(task: asyncio.Task[None]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)
