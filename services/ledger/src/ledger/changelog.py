"""The ledger's state in the broker: a compacted topic (``radflow.ledger``) whose
partition *p* holds the entries and marks of the studies in partition *p* of the
forward topics, so that whoever owns those partitions rebuilds their studies by reading
it from the start, before it is handed any input record.

Records: ``e|<study>|<idempotency key>`` → an :class:`~ledger.book.Entry`,
``m|<study>`` → a :class:`~ledger.book.Mark`; a tombstone forgets one. An entry is
acknowledged here before its input offset is committed, so a restart loses nothing
and replays nothing that counts twice (a fact applied again changes nothing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence

from aiokafka import AIOKafkaConsumer

from ledger.book import Book, Entry, Mark
from radflow_core.compacted import partitions_of, read_latest, reader
from radflow_core.errors import ConfigurationError
from radflow_core.kafka import EventProducer
from radflow_core.settings import KafkaSettings

log = logging.getLogger(__name__)


def entry_key(study: str, idempotency_key: str) -> bytes:
    return f"e|{study}|{idempotency_key}".encode("ascii")


def mark_key(study: str) -> bytes:
    return f"m|{study}".encode("ascii")


class Changelog:
    def __init__(
        self, kafka: KafkaSettings, producer: EventProducer, topic: str, inputs: Sequence[str]
    ) -> None:
        """``inputs``: the topics the book is built from; they and ``topic`` must have as
        many partitions each (a study is in the same partition of all of them)."""
        self._kafka = kafka
        self._producer = producer
        self._topic = topic
        self._inputs = list(inputs)

    async def write(self, partition: int, entries: Iterable[Entry]) -> None:
        """Record ``entries`` (pinned to ``partition``).

        Raises:
            BrokerUnavailable: not all were acknowledged (write them again).
        """
        await asyncio.gather(
            *(
                self._producer.send(
                    self._topic,
                    entry_key(e.study_instance_uid, e.idempotency_key),
                    e.model_dump_json().encode("utf-8"),
                    partition=partition,
                )
                for e in entries
            )
        )

    async def write_mark(self, partition: int, mark: Mark) -> None:
        await self._producer.send(
            self._topic,
            mark_key(mark.study_instance_uid),
            mark.model_dump_json().encode("utf-8"),
            partition=partition,
        )

    async def forget(self, partition: int, study: str, idempotency_keys: Iterable[str]) -> None:
        """Tombstones for a study's entries and mark."""
        keys = [entry_key(study, k) for k in idempotency_keys] + [mark_key(study)]
        await asyncio.gather(
            *(self._producer.send(self._topic, key, None, partition=partition) for key in keys)
        )

    async def restore(self, book: Book, partitions: set[int]) -> None:
        """Rebuild ``partitions`` of ``book`` from the changelog.

        Raises:
            ConfigurationError: the changelog or an input topic is missing, or they do
                not all have the same number of partitions.
        """
        wanted = sorted(p for p in partitions if p not in book.partitions)
        if not wanted:
            return
        consumer = reader(self._kafka)
        await consumer.start()
        try:
            await self._check_partitions(consumer)
            entries = await read_latest(consumer, self._topic, wanted)
        finally:
            await consumer.stop()
        count = 0
        for partition, records in entries.items():
            book.hold(partition)
            for key, value in records.items():
                if key.startswith(b"m|"):
                    book.restore_mark(partition, Mark.model_validate_json(value))
                else:
                    book.restore_entry(partition, Entry.model_validate_json(value))
                    count += 1
        log.info(
            "ledger restored",
            extra={"count": count, "partitions": wanted, "topic": self._topic},
        )

    async def _check_partitions(self, consumer: AIOKafkaConsumer) -> None:
        counts = {}
        for topic in (self._topic, *self._inputs):
            counts[topic] = len(await partitions_of(consumer, topic))
        if len(set(counts.values())) != 1:
            raise ConfigurationError(
                "the ledger needs its changelog and every forward topic to have the same "
                f"number of partitions (a study is then in the same one of each): {counts}"
            )
