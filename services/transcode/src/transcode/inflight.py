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

Failures are settled as the consumer settles them for one record at a time: a
retriable one is retried with backoff and, after ``max_attempts``, dead-lettered with
``retriable: true``; any other is dead-lettered with its reason at once. When the
dead-letter topic cannot be written, or on stop, nothing new is started, what was
started is finished, and the batch is handed back (it raises): nothing of it is
committed, it is read again, and the records finished meanwhile find their markers.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

from aiokafka import ConsumerRecord

from radflow_core.errors import PipelineError
from radflow_core.events import Envelope, InstanceReceived
from radflow_core.kafka import CONSUMED, EventProducer, backoff_delay, dead_letter
from transcode import metrics
from transcode.window import Window

log = logging.getLogger(__name__)

Work = Callable[[InstanceReceived], Awaitable[None]]
Item = tuple[Envelope[InstanceReceived], ConsumerRecord[bytes, bytes]]


class Abandoned(PipelineError):
    """Stopping (or an earlier record could not be settled): the batch is handed back
    uncommitted and read again."""

    reason = "abandoned"
    retriable = True


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
        max_attempts: int,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
    ) -> None:
        self._work = work
        self._producer = producer
        self._service = service
        self._dead_letter_topic = dead_letter_topic
        self._dead_letter = functools.partial(dead_letter, producer, dead_letter_topic, service)
        self._window = Window(concurrency, max_bytes)
        self._max_attempts = max_attempts
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stopping = asyncio.Event()
        self._degraded = False
        """A retriable failure happened and no success since: start one at a time."""

    def stop(self) -> None:
        """Start nothing new; the batch in hand finishes what it started. Safe twice."""
        self._stopping.set()

    async def handle_batch(self, items: list[Item]) -> None:
        """Settle every record of ``items`` (one partition's, in offset order).

        Raises:
            Abandoned: stopping before every record was started.
            BrokerUnavailable: a dead letter could not be written.
        """
        tasks: list[asyncio.Task[None]] = []
        latest: dict[str, asyncio.Task[None]] = {}
        try:
            for envelope, record in items:
                received = envelope.data
                weight = await self._window.acquire(received.blob.size, alone=self._degraded)
                if self._stopping.is_set() or any(_failed(t) for t in tasks):
                    self._window.release(weight)
                    break
                before = latest.get(received.sop_instance_uid)
                task = asyncio.create_task(self._run(received, record, before))
                task.add_done_callback(functools.partial(self._released, weight))
                tasks.append(task)
                latest[received.sop_instance_uid] = task
            results = await asyncio.gather(*tasks, return_exceptions=True)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        for result in results:
            if isinstance(result, BaseException):
                raise result
        if len(tasks) < len(items):
            raise Abandoned(f"stopping; {len(items) - len(tasks)} of {len(items)} not started")

    def _released(self, weight: int, _: asyncio.Task[None]) -> None:
        self._window.release(weight)

    async def _run(
        self,
        received: InstanceReceived,
        record: ConsumerRecord[bytes, bytes],
        before: asyncio.Task[None] | None,
    ) -> None:
        if before is not None:
            await asyncio.wait([before])
            if _failed(before):
                raise Abandoned("an earlier record of this instance was not settled")
        metrics.IN_FLIGHT.inc()
        try:
            await self._settle(received, record)
        finally:
            metrics.IN_FLIGHT.dec()

    async def _settle(
        self, received: InstanceReceived, record: ConsumerRecord[bytes, bytes]
    ) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._work(received)
                self._degraded = False
            except PipelineError as exc:
                self._degraded = self._degraded or exc.retriable
                if exc.retriable and self._stopping.is_set():
                    raise Abandoned(f"stopping after a retriable failure ({exc.reason})") from exc
                if exc.retriable and attempt < self._max_attempts:
                    CONSUMED.labels(record.topic, "retried").inc()
                    await self._backoff(attempt)
                    continue
                await self._dead_letter(record, exc.reason, str(exc), exc.retriable, attempt)
            except Exception as exc:
                log.exception("unexpected error in handler", extra={"topic": record.topic})
                await self._dead_letter(
                    record, "unexpected_error", type(exc).__name__, False, attempt
                )
            return

    async def _backoff(self, attempt: int) -> None:
        delay = backoff_delay(attempt, self._backoff_initial_s, self._backoff_max_s)
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        except TimeoutError:
            return
        raise Abandoned("stopping during a retry backoff")


def _failed(task: asyncio.Task[None]) -> bool:
    return task.done() and (task.cancelled() or task.exception() is not None)
