"""The transcode service's lifecycle: ops endpoint, producer, consumer, codec pool.

On SIGTERM the consumer finishes the instance in hand and commits what is done; the
codec pool is shut down after it, then the producer flushes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiohttp import web

from radflow_core.blobstore import BlobStore
from radflow_core.events import InstanceReceived
from radflow_core.kafka import EventConsumer, EventProducer
from radflow_core.ops import Health, ops_routes
from radflow_core.runtime import connect_producer, start_http
from radflow_core.topics import Topic
from transcode.normalizer import Normalizer
from transcode.settings import TranscodeConfig

log = logging.getLogger(__name__)

SERVICE = "transcode"


class TranscodeService:
    def __init__(self, config: TranscodeConfig) -> None:
        self._config = config
        settings = config.transcode
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._normalizer = Normalizer(
            self._blobs, self._producer, settings.target, settings.workers
        )
        self._consumer = EventConsumer(
            config.kafka,
            service=SERVICE,
            group_id=settings.group_id,
            topics=[config.kafka.topic(Topic.INSTANCE_RECEIVED)],
            model=InstanceReceived,
            handler=self._normalizer.handle,
            producer=self._producer,
            dead_letter_topic=config.kafka.topic(Topic.INSTANCE_FAILED),
            max_attempts=settings.max_attempts,
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
        self._runner = await start_http(
            ops_routes(self.health), settings.http_host, settings.http_port
        )
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        if not await connect_producer(self._producer, self.failed):
            return
        log.info("consuming", extra={"topic": self._config.kafka.topic(Topic.INSTANCE_RECEIVED)})
        try:
            await self._consumer.run()
        except Exception:
            log.exception("consumer stopped unexpectedly")
            self.failed.set()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.health.stopping = True
        self._consumer.stop()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=60)
            except TimeoutError:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        await asyncio.to_thread(self._normalizer.close)
        await self._producer.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self._blobs.close()
        log.info("stopped")
