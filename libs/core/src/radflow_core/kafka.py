"""Kafka producer and consumer loop on aiokafka, with the pipeline's delivery rules.

Producer: acks=all, idempotence as a setting (docs/architecture.md: off only against Tansu), and a
bounded wait per event so a broker outage turns into :class:`BrokerUnavailable`
quickly instead of a sender hanging.

Consumer: at-least-once. Offsets are committed only after the handler returned, and
the handler returns only after its output was acknowledged. A retriable failure is
retried with exponential backoff and jitter, a bounded number of times; a failure
that retrying cannot fix goes to the dead-letter topic with its reason. If even the
dead-letter topic cannot be written, nothing is committed and the record is read
again later: never dropped, never retried forever without a trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Generic, Self

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import BrokerResponseError, KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import RecordMetadata
from prometheus_client import Counter, Gauge, Histogram

from radflow_core.errors import (
    BrokerUnavailable,
    ConfigurationError,
    EventDecodeError,
    PipelineError,
)
from radflow_core.events import DeadLetter, EventModel, Lane, PayloadT, decode, encode, wrap
from radflow_core.settings import KafkaSettings

log = logging.getLogger(__name__)

SEND_SECONDS = Histogram(
    "radflow_kafka_send_seconds",
    "Time from send to broker acknowledgement (acks=all).",
    ["topic", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
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


def connection_options(settings: KafkaSettings) -> dict[str, Any]:
    """Client options shared by producers, consumers and admin clients."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        cafile = str(settings.ssl_cafile) if settings.ssl_cafile else None
        options["ssl_context"] = create_ssl_context(cafile=cafile)
    if settings.security_protocol.startswith("SASL"):
        options["sasl_mechanism"] = settings.sasl_mechanism
        options["sasl_plain_username"] = settings.sasl_username
        options["sasl_plain_password"] = settings.sasl_password.get_secret_value()
    return options


class EventProducer:
    """Publishes envelopes; every publish waits for acks=all or raises BrokerUnavailable."""

    def __init__(self, settings: KafkaSettings, service: str) -> None:
        self._settings = settings
        self._service = service
        timeout_ms = int(settings.ack_timeout_s * 1000)
        self._producer = AIOKafkaProducer(
            **connection_options(settings),
            client_id=f"radflow-{service}",
            acks="all",
            enable_idempotence=settings.idempotence,
            request_timeout_ms=timeout_ms,
            linger_ms=0,
        )
        self._started = False

    async def start(self) -> None:
        """Connect.

        Raises:
            BrokerUnavailable: the brokers cannot be reached (retry later).
            ConfigurationError: the broker refuses the idempotent producer.
        """
        try:
            await self._producer.start()
        except BrokerResponseError as exc:
            await self._producer.stop()
            if self._settings.idempotence:
                raise ConfigurationError(
                    "the broker refused the idempotent producer (InitProducerId); for brokers "
                    "without it (Tansu) set RADFLOW_KAFKA_IDEMPOTENCE=false"
                ) from exc
            raise BrokerUnavailable(f"cannot start producer: {type(exc).__name__}") from exc
        except KafkaError as exc:
            await self._producer.stop()
            raise BrokerUnavailable(f"cannot start producer: {type(exc).__name__}") from exc
        self._started = True

    async def stop(self) -> None:
        """Flush pending sends and disconnect; safe to call twice."""
        if self._started:
            self._started = False
            await self._producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def publish(
        self,
        payload: EventModel,
        key: bytes | None,
        topic: str | None = None,
        lane: Lane = Lane.ROUTINE,
    ) -> RecordMetadata:
        """Wrap ``payload`` in an envelope and send it to its topic in ``lane`` (or to
        ``topic``)."""
        if topic is None:
            if payload.topic is None:
                raise ValueError(f"{type(payload).__name__} has no default topic")
            topic = self._settings.topic(lane.topic(payload.topic))
        return await self.send(topic, key, encode(wrap(payload, self._service)))

    async def send(
        self, topic: str, key: bytes | None, value: bytes | None, partition: int | None = None
    ) -> RecordMetadata:
        """Send raw bytes (None: a tombstone) and wait for the broker's acknowledgement.

        ``partition`` pins the record, for state changelogs that must be partitioned
        like the input they describe.
        """
        if not self._started:
            raise BrokerUnavailable("producer is not connected to the broker yet")
        started = time.perf_counter()
        outcome = "error"
        try:
            async with asyncio.timeout(self._settings.ack_timeout_s):
                metadata = await self._producer.send_and_wait(
                    topic, value, key=key, partition=partition
                )
            outcome = "ok"
            return metadata
        except (KafkaError, TimeoutError) as exc:
            raise BrokerUnavailable(
                f"no ack from broker for {topic}: {type(exc).__name__}"
            ) from exc
        finally:
            SEND_SECONDS.labels(topic, outcome).observe(time.perf_counter() - started)

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless broker metadata can be fetched now."""
        if not self._started:
            raise BrokerUnavailable("producer is not connected to the broker yet")
        try:
            async with asyncio.timeout(self._settings.ack_timeout_s):
                await self._producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError) as exc:
            raise BrokerUnavailable(f"broker metadata unavailable: {type(exc).__name__}") from exc


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff with jitter before retry number ``attempt`` (1-based):
    between half and all of ``initial_s * 2**(attempt-1)``, capped at ``max_s``, so
    many clients retrying after one outage do not all come back at once."""
    ceiling = min(max_s, initial_s * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto


Handler = Callable[[Any, ConsumerRecord[bytes, bytes]], Awaitable[None]]
BatchHandler = Callable[[list[tuple[Any, ConsumerRecord[bytes, bytes]]]], Awaitable[None]]
PartitionsHook = Callable[[set[TopicPartition]], Awaitable[None]]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Runs the hooks and tells the loop when the new assignment may be handled.

    aiokafka starts fetching for new partitions before the assigned hook has finished;
    ``ready`` holds records back until it has (and stays clear if the hook failed).
    """

    def __init__(
        self,
        assigned: PartitionsHook | None,
        revoked: PartitionsHook | None,
        forget: Callable[[set[TopicPartition]], None],
    ) -> None:
        self._assigned = assigned
        self._revoked = revoked
        self._forget = forget
        self.ready = asyncio.Event()
        if assigned is None:
            self.ready.set()

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._forget(set(revoked))
        if self._assigned is not None:
            self.ready.clear()
        if self._revoked is not None:
            await self._revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self._assigned is not None:
            await self._assigned(set(assigned))
            self.ready.set()


async def dead_letter(
    producer: EventProducer,
    topic: str,
    service: str,
    record: ConsumerRecord[bytes, bytes],
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


class _Unfinished(Exception):
    """A retriable failure while stopping: the record stays uncommitted."""


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
        max_attempts: int = 5,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        on_assigned: PartitionsHook | None = None,
        on_revoked: PartitionsHook | None = None,
        lag_interval_s: float = 5.0,
        max_records: int = 100,
    ) -> None:
        """Exactly one of ``handler`` (one record at a time, retried and dead-lettered
        here) or ``batch_handler`` (every decodable record of a partition's fetch at
        once; it handles failures itself, and if it raises, nothing of the batch is
        committed and the batch is read again after a backoff).

        ``on_assigned``/``on_revoked`` run inside a rebalance, before records of the
        new assignment are handed out: where a stateful consumer restores (or drops) the
        state of the partitions it now owns.

        Every ``lag_interval_s`` seconds the consumer asks the broker for the end offsets
        of its partitions (one request) and sets ``radflow_consumer_lag``; the gauge keeps
        moving while a handler is busy for a long time (a destination that is down)."""
        if (handler is None) == (batch_handler is None):
            raise ValueError("give exactly one of handler and batch_handler")
        self._batch_handler = batch_handler
        self._settings = settings
        self._service = service
        self._topics = list(topics)
        self._model = model
        self._handler = handler
        self._producer = producer
        self._dead_letter_topic = dead_letter_topic
        self._dead_letter = functools.partial(dead_letter, producer, dead_letter_topic, service)
        self._max_attempts = max_attempts
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._listener = _Rebalance(on_assigned, on_revoked, self._forget_lag)
        self._group = settings.group(group_id)
        self._lag_interval_s = lag_interval_s
        self._max_records = max_records
        self._committed: dict[TopicPartition, int] = {}
        """Per assigned partition, the offset the group has committed (as far as we know)."""
        self._consumer = AIOKafkaConsumer(
            **connection_options(settings),
            client_id=f"radflow-{service}",
            group_id=self._group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=settings.fetch_max_wait_ms,
            session_timeout_ms=settings.session_timeout_ms,
            heartbeat_interval_ms=settings.heartbeat_interval_ms,
        )
        self._stopping = asyncio.Event()

    @property
    def topics(self) -> list[str]:
        """The topics this consumer reads."""
        return list(self._topics)

    def backoff(self, attempt: int) -> float:
        """Backoff before retry number ``attempt`` (1-based)."""
        return backoff_delay(attempt, self._backoff_initial_s, self._backoff_max_s)

    async def run(self) -> None:
        """Consume until :meth:`stop`; commits after each partition's batch is handled."""
        await self._consumer.start()
        self._consumer.subscribe(self._topics, listener=self._listener)
        lag_task = asyncio.create_task(self._report_lag())
        try:
            while not self._stopping.is_set():
                batches = await self._consumer.getmany(
                    timeout_ms=500, max_records=self._max_records
                )
                if not self._listener.ready.is_set():
                    await _first_of(self._listener.ready, self._stopping)
                for tp, records in batches.items():
                    # The first record handed out after an assignment is where the
                    # group's committed offset was.
                    self._committed.setdefault(tp, records[0].offset)
                    await self._handle_partition(tp, records)
        finally:
            lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lag_task
            self._forget_lag(set(self._committed) | self._consumer.assignment())
            await self._consumer.stop()

    async def _commit(self, tp: TopicPartition, offset: int) -> None:
        await self._consumer.commit({tp: offset})
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

    def _forget_lag(self, partitions: set[TopicPartition]) -> None:
        """Drop the lag of partitions this consumer no longer owns (another reports it)."""
        for tp in partitions:
            self._committed.pop(tp, None)
            with contextlib.suppress(KeyError):
                LAG.remove(self._group, tp.topic, str(tp.partition))

    async def _handle_partition(
        self, tp: TopicPartition, records: list[ConsumerRecord[bytes, bytes]]
    ) -> None:
        if self._batch_handler is not None:
            await self._handle_batch(tp, records, self._batch_handler)
            return
        done: int | None = None
        try:
            for record in records:
                if self._stopping.is_set():
                    break
                await self._handle_record(record)
                done = record.offset
        except _Unfinished:
            log.info(
                "stopping with a record not handled; it is read again after the restart",
                extra={"topic": tp.topic, "partition": tp.partition},
            )
        except BrokerUnavailable:
            log.warning(
                "dead-letter topic unreachable; will read the record again",
                extra={"topic": tp.topic, "partition": tp.partition},
            )
            failed = records[0].offset if done is None else done + 1
            self._consumer.seek(tp, failed)
            await asyncio.sleep(self.backoff(self._max_attempts))
        if done is not None:
            await self._commit(tp, done + 1)

    async def _handle_batch(
        self,
        tp: TopicPartition,
        records: list[ConsumerRecord[bytes, bytes]],
        handler: BatchHandler,
    ) -> None:
        items: list[tuple[Any, ConsumerRecord[bytes, bytes]]] = []
        try:
            for record in records:
                try:
                    if record.value is None:
                        raise EventDecodeError("record has no value (tombstone)")
                    items.append((decode(record.value, self._model), record))
                except EventDecodeError as exc:
                    await self._dead_letter(record, exc.reason, str(exc), False, 1)
            if items:
                await handler(items)
        except Exception as exc:  # noqa: BLE001 - whatever it was, read the batch again
            reason = exc.reason if isinstance(exc, PipelineError) else type(exc).__name__
            log.warning(
                "batch not finished; will read it again",
                extra={"topic": tp.topic, "partition": tp.partition, "reason": reason},
            )
            self._consumer.seek(tp, records[0].offset)
            if not self._stopping.is_set():
                await asyncio.sleep(self.backoff(2))
            return
        CONSUMED.labels(tp.topic, "ok").inc(len(items))
        await self._commit(tp, records[-1].offset + 1)

    async def _handle_record(self, record: ConsumerRecord[bytes, bytes]) -> None:
        attempt = 0
        while True:
            attempt += 1
            try:
                if record.value is None:
                    raise EventDecodeError("record has no value (tombstone)")
                envelope = decode(record.value, self._model)
                assert self._handler is not None
                await self._handler(envelope, record)
            except PipelineError as exc:
                if exc.retriable and self._stopping.is_set():
                    # Not this record's fault: leave it uncommitted for whoever reads
                    # the partition next rather than dead-letter it on the way out.
                    raise _Unfinished from exc
                if exc.retriable and attempt < self._max_attempts:
                    CONSUMED.labels(record.topic, "retried").inc()
                    await asyncio.sleep(self.backoff(attempt))
                    continue
                await self._dead_letter(record, exc.reason, str(exc), exc.retriable, attempt)
                return
            except Exception as exc:
                log.exception("unexpected error in handler", extra={"topic": record.topic})
                await self._dead_letter(
                    record, "unexpected_error", type(exc).__name__, False, attempt
                )
                return
            CONSUMED.labels(record.topic, "ok").inc()
            return

    def stop(self) -> None:
        """Ask :meth:`run` to return after the record in hand; safe to call twice."""
        self._stopping.set()


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


async def ensure_topics(
    settings: KafkaSettings, topics: Sequence[str], partitions: int = 3, replication: int = 1
) -> None:
    """Create the topics that do not exist yet (development stack and tests).

    Production topics are declared as Strimzi KafkaTopic resources instead.
    """
    admin = AIOKafkaAdminClient(**connection_options(settings), client_id="radflow-admin")
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(t, partitions, replication) for t in topics if t not in existing]
        if missing:
            await admin.create_topics(missing)
    finally:
        await admin.close()
