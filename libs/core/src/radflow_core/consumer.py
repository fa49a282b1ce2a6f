"""The consumer loop on aiokafka, with the pipeline's delivery rules.

At-least-once: an offset is committed only after the handler returned, and a handler
returns only after its output was acknowledged. A failure that retrying cannot fix
goes to the dead-letter topic with its reason; a failure that time fixes (S3 or the
broker unreachable, a destination down) is retried with capped backoff for as long
as it lasts.

Waiting must never cost the consumer its group membership (a consumer that stops
polling for ``max_poll_interval_ms`` is thrown out, its commits fail and its
partitions move). So a partition's records are handled in a task of their own, a
*turn*, while the partition is paused and the loop keeps polling the others. When the
turn is over, what it settled is committed and the partition resumes.

A turn ends early, handing its unsettled records back uncommitted, when the service
stops or when its partition is revoked (scaling, a rolling update). A revocation waits
for the turns of the revoked partitions to reach a safe point (the request on the wire
answered), commits what they settled, and only then runs the service's ``on_revoked``
hook, so no state is re-created for a partition the consumer no longer owns. A commit
the group refuses because the partition moved is logged, not fatal: its new owner
reads those records again, and every effect downstream is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from prometheus_client import Counter, Gauge

from radflow_core.errors import EventDecodeError, PipelineError
from radflow_core.events import DeadLetter, EventModel, PayloadT, decode
from radflow_core.kafka import EventProducer, connection_options
from radflow_core.retry import HandedBack, Turn, Waiting, enter
from radflow_core.settings import KafkaSettings

log = logging.getLogger(__name__)

CONSUMED = Counter(
    "radflow_consumer_records_total",
    "Records handled by a consumer, by outcome (ok, retried, dead_lettered).",
    ["topic", "outcome"],
)
DEAD_LETTERS = Counter(
    "radflow_dead_letters_total",
    "Records sent to a dead-letter topic, by reason.",
    ["source_topic", "reason"],
)
LAG = Gauge(
    "radflow_consumer_lag",
    "Records not yet handled and committed, per assigned partition: log end offset minus "
    "the group's committed offset (the consumer-group lag, as seen by the consumer).",
    ["group", "topic", "partition"],
)
HANDED_BACK = Counter(
    "radflow_consumer_handed_back_total",
    "Turns that handed records back uncommitted, by cause (revoked: the partition moved "
    "to another replica; stopping: the service stops).",
    ["group", "cause"],
)

Handler = Callable[[Any, ConsumerRecord[bytes, bytes]], Awaitable[None]]
BatchHandler = Callable[[list[tuple[Any, ConsumerRecord[bytes, bytes]]]], Awaitable[None]]
PartitionsHook = Callable[[set[TopicPartition]], Awaitable[None]]
Record: TypeAlias = ConsumerRecord[bytes, bytes]


async def dead_letter(
    producer: EventProducer,
    topic: str,
    service: str,
    record: Record,
    reason: str,
    message: str,
    retriable: bool,
    attempts: int,
) -> None:
    """Publish ``record`` to the dead-letter ``topic`` with its reason, and count it.
    For consumers that settle records themselves (batch handlers), so that every dead
    letter has the same shape and metrics whoever writes it.

    Raises:
        BrokerUnavailable: the dead letter was not acknowledged.
    """
    letter = DeadLetter(
        reason=reason,
        message=message,
        retriable=retriable,
        attempts=attempts,
        service=service,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        original_key=record.key.decode("utf-8", "replace") if record.key else None,
        original_value=(record.value or b"").decode("utf-8", "replace"),
        failed_at=datetime.now(UTC),
    )
    await producer.publish(letter, record.key, topic=topic)
    DEAD_LETTERS.labels(record.topic, reason).inc()
    CONSUMED.labels(record.topic, "dead_lettered").inc()
    log.warning(
        "record dead-lettered",
        extra={"topic": record.topic, "offset": record.offset, "reason": reason},
    )


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands back the revoked partitions' turns before the service's hooks run, and
    tells the loop when the new assignment may be handled.

    aiokafka starts fetching for new partitions before the assigned hook has finished;
    ``ready`` holds records back until it has (and stays clear if the hook failed).
    """

    def __init__(
        self,
        consumer: EventConsumer[Any],
        assigned: PartitionsHook | None,
        revoked: PartitionsHook | None,
    ) -> None:
        self._consumer = consumer
        self._assigned = assigned
        self._revoked = revoked
        self.ready = asyncio.Event()
        if assigned is None:
            self.ready.set()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._consumer.hand_back(set(revoked), timeout_s=self._consumer.hand_back_s)
        self._consumer.forget_lag(set(revoked))
        if self._assigned is not None:
            self.ready.clear()
        if self._revoked is not None:
            await self._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self._assigned is not None:
            await self._assigned(set(assigned))
            self.ready.set()


class EventConsumer(Generic[PayloadT]):
    """Reads one event type from ``topics`` and hands each envelope to ``handler``.

    The handler must publish its outputs with an :class:`EventProducer` (which waits
    for acks) before returning; the offset is committed after it returns.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        service: str,
        group_id: str,
        topics: Sequence[str],
        model: type[PayloadT],
        handler: Handler | None = None,
        batch_handler: BatchHandler | None = None,
        producer: EventProducer,
        dead_letter_topic: str,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_assigned: PartitionsHook | None = None,
        on_revoked: PartitionsHook | None = None,
        lag_interval_s: float = 5.0,
        max_records: int = 100,
        stop_grace_s: float = 25.0,
        models: Mapping[str, type[EventModel]] | None = None,
        co_partitioned: bool = False,
    ) -> None:
        """Exactly one of ``handler`` (one record at a time; retried while its failure
        is retriable, dead-lettered when not) or ``batch_handler`` (every decodable
        record of a partition's fetch at once; it settles records itself, and if it
        raises a retriable error the whole batch is tried again after a backoff).

        Handlers wait for retries of their own through
        :func:`radflow_core.retry.current_turn`, so that a stop or a revocation
        interrupts the wait.

        ``on_assigned``/``on_revoked`` run inside a rebalance, before records of the
        new assignment are handed out (and after the revoked partitions' turns have
        ended): where a stateful consumer restores (or drops) the state of the
        partitions it owns.

        Every ``lag_interval_s`` seconds the consumer asks the broker for the end offsets
        of its partitions (one request) and sets ``radflow_consumer_lag``; the gauge keeps
        moving while a turn waits for a long time (a destination that is down).

        On :meth:`stop` the turns in hand get ``stop_grace_s`` to reach a safe point
        (within Kubernetes' termination grace period) before they are cancelled.

        ``models``: topic (as subscribed) → the event type read from it, for a consumer
        of several event types (the ledger); other topics are read as ``model``.
        ``co_partitioned``: assign partition *p* of every topic to the same member (the
        range assignor), so that a consumer keeping state per key over several topics
        keyed alike sees all of a key's records; the topics must have as many partitions
        each."""
        if (handler is None) == (batch_handler is None):
            raise ValueError("give exactly one of handler and batch_handler")
        self._batch_handler = batch_handler
        self._handler = handler
        self._service = service
        self._topics = list(topics)
        self._model = model
        self._models = dict(models or {})
        self._dead_letter = functools.partial(dead_letter, producer, dead_letter_topic, service)
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._listener = _Rebalance(self, on_assigned, on_revoked)
        self._group = settings.group(group_id)
        self._waiting = Waiting(self._group)
        self._lag_interval_s = lag_interval_s
        self._max_records = max_records
        self.hand_back_s = 0.8 * settings.session_timeout_ms / 1000
        """How long a revocation waits for a turn to reach a safe point: within the
        rebalance timeout (aiokafka's default, the session timeout), or this member is
        dropped from the group while the others wait."""
        self._stop_grace_s = stop_grace_s
        self._committed: dict[TopicPartition, int] = {}
        """Per assigned partition, the offset the group has committed (as far as we know)."""
        self._work: dict[TopicPartition, tuple[Turn, asyncio.Task[None]]] = {}
        """The partitions with a turn in hand (paused meanwhile)."""
        self._crashed: list[BaseException] = []
        self._consumer = AIOKafkaConsumer(
            **connection_options(settings),
            client_id=f"radflow-{service}",
            group_id=self._group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
            max_poll_interval_ms=settings.max_poll_interval_ms,
            **(
                {"partition_assignment_strategy": (RangePartitionAssignor,)}
                if co_partitioned
                else {}
            ),
        )
        self._stopping = asyncio.Event()

    @property
    def topics(self) -> list[str]:
        """The topics this consumer reads."""
        return list(self._topics)

    @property
    def group(self) -> str:
        """The consumer group, as used on the cluster."""
        return self._group

    def waiting_reasons(self) -> set[str]:
        """What this consumer's turns wait for now (empty when nothing waits)."""
        return self._waiting.reasons()

    async def run(self) -> None:
        """Consume until :meth:`stop`.

        Raises whatever a turn raised that was not a failure of a record (a bug, or a
        commit the group refused for a reason other than a moved partition): the
        service cannot go on safely and should exit for a restart."""
        await self._consumer.start()
        self._consumer.subscribe(self._topics, listener=self._listener)
        lag_task = asyncio.create_task(self._report_lag())
        try:
            while not self._stopping.is_set():
                self._raise_crashed()
                batches = await self._consumer.getmany(
                    timeout_ms=200, max_records=self._max_records
                )
                if not self._listener.ready.is_set():
                    await _first_of(self._listener.ready, self._stopping)
                for tp, records in batches.items():
                    if tp in self._work:
                        # A paused partition returns nothing; should records slip
                        # through, they are read again after the turn in hand.
                        continue
                    # The first record handed out after an assignment is where the
                    # group's committed offset was.
                    self._committed.setdefault(tp, records[0].offset)
                    self._begin(tp, records)
            self._raise_crashed()
        finally:
            self._stopping.set()
            await self.hand_back(set(self._work), timeout_s=self._stop_grace_s)
            lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_task
            self.forget_lag(set(self._committed) | self._consumer.assignment())
            await self._consumer.stop()

    def stop(self) -> None:
        """Ask :meth:`run` to return after the work in hand reaches a safe point;
        safe to call twice."""
        self._stopping.set()
        for turn, _ in self._work.values():
            turn.hand_back.set()

    def _begin(self, tp: TopicPartition, records: list[Record]) -> None:
        self._consumer.pause(tp)
        turn = Turn(self._waiting)
        task = asyncio.create_task(self._turn(tp, records, turn))
        task.add_done_callback(functools.partial(self._ended, tp))
        self._work[tp] = (turn, task)

    def _ended(self, tp: TopicPartition, task: asyncio.Task[None]) -> None:
        work = self._work.get(tp)
        if work is not None and work[1] is task:
            del self._work[tp]
        if not task.cancelled() and task.exception() is not None:
            self._crashed.append(task.exception())  # type: ignore[arg-type]

    def _raise_crashed(self) -> None:
        if self._crashed:
            raise self._crashed[0]

    async def hand_back(self, partitions: set[TopicPartition], *, timeout_s: float) -> None:
        """End the turns of ``partitions`` at their next safe point (cancel them if
        they do not get there within ``timeout_s``), with what they settled committed."""
        tasks = []
        for tp in partitions:
            if tp in self._work:
                turn, task = self._work[tp]
                turn.hand_back.set()
                tasks.append(task)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)

    async def _turn(self, tp: TopicPartition, records: list[Record], turn: Turn) -> None:
        """Settle ``records`` (one partition's fetch), commit what was settled, and
        resume the partition where the next unsettled record is."""
        enter(turn)
        settled = records[0].offset
        try:
            if self._batch_handler is not None:
                settled = await self._settle_batch(records, self._batch_handler, turn)
            else:
                settled = await self._settle_records(records, turn)
        except asyncio.CancelledError:
            HANDED_BACK.labels(self._group, "cancelled").inc()
            raise
        finally:
            turn.recovered()
        if settled < records[-1].offset + 1:
            cause = "stopping" if self._stopping.is_set() else "revoked"
            HANDED_BACK.labels(self._group, cause).inc()
            log.info(
                "records handed back uncommitted; they are read again",
                extra={
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "offset": settled,
                    "count": records[-1].offset + 1 - settled,
                },
            )
        if settled > records[0].offset:
            await self._commit(tp, settled)
        work = self._work.get(tp)
        if work is not None and work[0] is turn:
            del self._work[tp]  # before resuming: the loop may begin the next turn
        if tp in self._consumer.assignment():
            if settled < records[-1].offset + 1:
                self._consumer.seek(tp, settled)
            self._consumer.resume(tp)

    async def _settle_records(self, records: list[Record], turn: Turn) -> int:
        """Settle records in order; returns the offset of the first one not settled."""
        for record in records:
            try:
                turn.check()
                await self._settle_record(record, turn)
            except HandedBack:
                return int(record.offset)
        return int(records[-1].offset) + 1

    async def _settle_record(self, record: Record, turn: Turn) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                await self._handle_record(record, attempt)
            except HandedBack:
                raise
            except PipelineError as exc:
                if not exc.retriable:
                    raise
                CONSUMED.labels(record.topic, "retried").inc()
                await turn.pause(
                    attempt,
                    exc.reason,
                    initial_s=self._backoff_initial_s,
                    max_s=self._backoff_max_s,
                )
                continue
            turn.recovered()
            return

    async def _handle_record(self, record: Record, attempt: int) -> None:
        """Hand ``record`` to the handler; dead-letter it if that cannot succeed.

        Raises:
            PipelineError: a retriable failure (of the handler or of the dead letter).
        """
        try:
            if record.value is None:
                raise EventDecodeError("record has no value (tombstone)")
            envelope = decode(record.value, self._models.get(record.topic, self._model))
            assert self._handler is not None
            await self._handler(envelope, record)
        except PipelineError as exc:
            if exc.retriable:
                raise
            await self._dead_letter(record, exc.reason, str(exc), False, attempt)
            return
        except Exception as exc:
            log.exception("unexpected error in handler", extra={"topic": record.topic})
            await self._dead_letter(record, "unexpected_error", type(exc).__name__, False, attempt)
            return
        CONSUMED.labels(record.topic, "ok").inc()

    async def _settle_batch(self, records: list[Record], handler: BatchHandler, turn: Turn) -> int:
        """Settle a whole fetch with the batch handler; returns the offset of the first
        record not settled (all or nothing)."""
        items: list[tuple[Any, Record]] = []
        attempt = 0
        try:
            for record in records:
                if record.value is None:
                    await self._settle_undecodable(record, "record has no value (tombstone)", turn)
                    continue
                try:
                    model = self._models.get(record.topic, self._model)
                    items.append((decode(record.value, model), record))
                except EventDecodeError as exc:
                    await self._settle_undecodable(record, str(exc), turn)
            while items:
                attempt += 1
                turn.check()
                try:
                    await handler(items)
                except HandedBack:
                    raise
                except PipelineError as exc:
                    if not exc.retriable:
                        await self._dead_letter_all(items, exc, attempt, turn)
                        break
                    log.warning(
                        "batch not finished; will try it again",
                        extra={
                            "topic": records[0].topic,
                            "partition": records[0].partition,
                            "reason": exc.reason,
                            "attempt": attempt,
                        },
                    )
                    CONSUMED.labels(records[0].topic, "retried").inc(len(items))
                    await turn.pause(
                        attempt,
                        exc.reason,
                        initial_s=self._backoff_initial_s,
                        max_s=self._backoff_max_s,
                    )
                    continue
                except Exception as exc:
                    log.exception("unexpected error in handler", extra={"topic": records[0].topic})
                    await self._dead_letter_all(items, exc, attempt, turn)
                    break
                CONSUMED.labels(records[0].topic, "ok").inc(len(items))
                break
        except HandedBack:
            return int(records[0].offset)
        return int(records[-1].offset) + 1

    async def _settle_undecodable(self, record: Record, message: str, turn: Turn) -> None:
        await self._retrying(
            lambda: self._dead_letter(record, EventDecodeError.reason, message, False, 1), turn
        )

    async def _dead_letter_all(
        self, items: list[tuple[Any, Record]], exc: Exception, attempt: int, turn: Turn
    ) -> None:
        if isinstance(exc, PipelineError):
            reason, message = exc.reason, str(exc)
        else:
            reason, message = "unexpected_error", type(exc).__name__
        for _, record in items:
            await self._retrying(
                functools.partial(self._dead_letter, record, reason, message, False, attempt),
                turn,
            )

    async def _retrying(self, step: Callable[[], Awaitable[None]], turn: Turn) -> None:
        """``step`` (a dead letter), retried while the broker is away."""
        attempt = 0
        while True:
            attempt += 1
            try:
                await step()
            except PipelineError as exc:
                if not exc.retriable or isinstance(exc, HandedBack):
                    raise
                await turn.pause(
                    attempt,
                    exc.reason,
                    initial_s=self._backoff_initial_s,
                    max_s=self._backoff_max_s,
                )
                continue
            return

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        try:
            await self._consumer.commit({tp: offset})
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning(
                "offset not committed: the partition moved to another consumer, which "
                "reads these records again",
                extra={
                    "topic": tp.topic,
                    "partition": tp.partition,
                    "offset": offset,
                    "reason": type(exc).__name__,
                },
            )
            return
        if tp in self._consumer.assignment():
            self._committed[tp] = offset

    async def _report_lag(self) -> None:
        """Set ``radflow_consumer_lag`` for the assigned partitions, periodically.

        A partition with nothing handed out since its assignment is at its committed
        offset, which is then the consumer's position. Errors only skip a round."""
        while True:
            await asyncio.sleep(self._lag_interval_s)
            assigned = self._consumer.assignment()
            if not assigned:
                continue
            try:
                async with asyncio.timeout(self._lag_interval_s):
                    ends = await self._consumer.end_offsets(list(assigned))
                    for tp, end in ends.items():
                        done = self._committed.get(tp)
                        if done is None:
                            done = await self._consumer.position(tp)
                        if tp in self._consumer.assignment():  # not revoked meanwhile
                            LAG.labels(self._group, tp.topic, str(tp.partition)).set(
                                max(0, end - done)
                            )
            except (KafkaError, TimeoutError) as exc:
                log.debug("consumer lag not measured", extra={"reason": type(exc).__name__})

    def forget_lag(self, partitions: set[TopicPartition]) -> None:
        """Drop the lag of partitions this consumer no longer owns (another reports it)."""
        for tp in partitions:
            self._committed.pop(tp, None)
            with contextlib.suppress(KeyError):
                LAG.remove(self._group, tp.topic, str(tp.partition))


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
