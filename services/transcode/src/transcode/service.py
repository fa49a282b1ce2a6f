"""The transcode service's lifecycle: ops endpoint, producer, one consumer per lane,
codec pool.

Each lane (routine: ``dicom.instance.received``; STAT: ``.stat``, consumer group
``<group>.stat``) has its own consumer and its own :class:`~transcode.inflight.InFlight`
keeping up to ``RADFLOW_TRANSCODE_CONCURRENCY`` instances in flight, so a STAT instance
never waits behind a routine backlog's fetch; both share the codec workers, where a
STAT instance takes the next free worker. On SIGTERM nothing new is started, the
instances in hand are finished, and a fetch not finished is left uncommitted (read
again; what was finished finds its marker); the codec pool is shut down after it,
then the producer flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from radflow_core.blobstore import BlobStore
from radflow_core.events import LANES, InstanceReceived
from radflow_core.kafka import EventConsumer, EventProducer
from radflow_core.ops import Health, ops_routes
from radflow_core.runtime import connect_producer, start_http
from radflow_core.topics import Topic
from transcode.inflight import InFlight
from transcode.normalizer import Normalizer
from transcode.pool import CodecPool
from transcode.settings import TranscodeConfig

log = logging.getLogger(__name__)

SERVICE = "transcode"


class TranscodeService:
    def __init__(self, config: TranscodeConfig) -> None:
        self._config = config
        settings = config.transcode
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._codecs = CodecPool(settings.workers)
        dead_letter_topic = config.kafka.topic(Topic.INSTANCE_FAILED)
        self._inflight: list[InFlight] = []
        self._consumers: list[EventConsumer[InstanceReceived]] = []
        for lane in LANES:
            normalizer = Normalizer(
                self._blobs, self._producer, settings.target, self._codecs, lane
            )
            inflight = InFlight(
                normalizer.normalize,
                self._producer,
                service=SERVICE,
                dead_letter_topic=dead_letter_topic,
                concurrency=settings.concurrency,
                max_bytes=settings.max_inflight_bytes,
                max_attempts=settings.max_attempts,
            )
            self._inflight.append(inflight)
            self._consumers.append(
                EventConsumer(
                    config.kafka,
                    service=SERVICE,
                    group_id=lane.group(settings.group_id),
                    topics=[config.kafka.topic(lane.topic(Topic.INSTANCE_RECEIVED))],
                    model=InstanceReceived,
                    batch_handler=inflight.handle_batch,
                    producer=self._producer,
                    dead_letter_topic=dead_letter_topic,
                )
            )
        self.health = Health(
            {"broker": self._producer.ping, "blob_store": self._blobs.ping},
            cache_s=config.ops.readiness_cache_s,
        )
        self.failed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        settings = self._config.transcode
        # Blob store calls run in threads: two per instance in flight in each lane, and
        # some to spare.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(4 * settings.concurrency + 4, thread_name_prefix="transcode-io")
        )
        self._runner = await start_http(
            ops_routes(self.health), settings.http_host, settings.http_port
        )
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        if not await connect_producer(self._producer, self.failed):
            return
        await asyncio.gather(*(self._consume(c) for c in self._consumers))

    async def _consume(self, consumer: EventConsumer[InstanceReceived]) -> None:
        log.info("consuming", extra={"topic": ",".join(consumer.topics)})
        try:
            await consumer.run()
        except Exception:
            log.exception("consumer stopped unexpectedly")
            self.failed.set()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.health.stopping = True
        for inflight in self._inflight:
            inflight.stop()
        for consumer in self._consumers:
            consumer.stop()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=60)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await asyncio.to_thread(self._codecs.close)
        await self._producer.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self._blobs.close()
        log.info("stopped")
