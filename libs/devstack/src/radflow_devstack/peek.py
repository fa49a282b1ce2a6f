"""Looking into the local stack: events on a topic and objects in the bucket.

``python -m radflow_devstack events [TOPIC]`` prints each record (one JSON line, from
the beginning, following new ones until Ctrl-C); ``python -m radflow_devstack blobs``
lists the bucket. Both read the same RADFLOW_* settings as the services.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import Mapping

from aiokafka import AIOKafkaConsumer

from radflow_core.kafka import connection_options
from radflow_core.settings import KafkaSettings, S3Settings


async def print_events(kafka: KafkaSettings, topic: str, follow: bool) -> int:
    consumer = AIOKafkaConsumer(
        topic,
        **connection_options(kafka),
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    count = 0
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    value = json.loads(record.value) if record.value else None
                    print(
                        json.dumps(
                            {
                                "key": record.key.decode() if record.key else None,
                                "partition": record.partition,
                                "offset": record.offset,
                                "event": value,
                            }
                        ),
                        flush=True,
                    )
                    count += 1
            if not batch and not follow:
                return count
    finally:
        await consumer.stop()


def list_blobs(s3: S3Settings) -> int:
    from minio import Minio

    client = Minio(
        s3.endpoint.split("://", 1)[1],
        access_key=s3.access_key,
        secret_key=s3.secret_key.get_secret_value(),
        secure=s3.endpoint.startswith("https"),
    )
    count = 0
    for obj in client.list_objects(s3.bucket, recursive=True):
        print(f"{obj.size:>12}  {obj.object_name}")
        count += 1
    return count


def events_command(environ: Mapping[str, str], topic: str, follow: bool) -> int:
    kafka = KafkaSettings.from_env(environ)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(print_events(kafka, kafka.topic_prefix + topic, follow))
    return 0


def blobs_command(environ: Mapping[str, str]) -> int:
    count = list_blobs(S3Settings.from_env(environ))
    print(f"{count} objects", file=sys.stderr)
    return 0
