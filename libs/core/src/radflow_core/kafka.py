"""Kafka producer, client options and topic creation on aiokafka.

Producer: acks=all, idempotence as a setting (off only against Tansu, which lacks
InitProducerId), and a bounded wait per event so a broker outage turns into
:class:`BrokerUnavailable` quickly instead of a sender hanging. The consumer loop is
in :mod:`radflow_core.consumer`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import BrokerResponseError, KafkaError
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import RecordMetadata
from prometheus_client import Histogram

from radflow_core.errors import BrokerUnavailable, ConfigurationError
from radflow_core.events import EventModel, Lane, encode, wrap
from radflow_core.settings import KafkaSettings

log = logging.getLogger(__name__)

SEND_SECONDS = Histogram(
    "radflow_kafka_send_seconds",
    "Time from send to broker acknowledgement (acks=all).",
    ["topic", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
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
