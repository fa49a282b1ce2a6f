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
import functools
import logging
from concurrent.futures import ThreadPoolExecutor

from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore
from radflow_core.consumer import EventConsumer
from radflow_core.events import LANES, InstanceReceived
from radflow_core.kafka import EventProducer
from radflow_core.shell import Shell
from radflow_core.topics import Topic
from transcode.inflight import InFlight
from transcode.normalizer import Normalizer
from transcode.pool import CodecPool
from transcode.previews import PreviewRules, Previews
from transcode.settings import TranscodeConfig

log = logging.getLogger(__name__)

SERVICE = "transcode"


class TranscodeService:
    def __init__(self, config: TranscodeConfig) -> None:
        self._config = config
        settings = config.transcode
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._audit = Auditor(SERVICE, self._producer, config.audit)
        self._codecs = CodecPool(settings.workers)
        self.shell = Shell(
            SERVICE,
            producer=self._producer,
            blobs=self._blobs,
            ops=config.ops,
            http_host=settings.http_host,
            http_port=settings.http_port,
            audit=self._audit,
        )
        self.health = self.shell.health
        self.failed = self.shell.failed
        dead_letter_topic = config.kafka.topic(Topic.INSTANCE_FAILED)
        self._preview_rules = PreviewRules(settings.rules_file)
        previews = Previews(
            self._preview_rules,
            self._blobs,
            self._producer,
            self._codecs,
            settings.preview_quality,
        )
        for lane in LANES:
            normalizer = Normalizer(
                self._blobs, self._producer, settings.target, self._codecs, lane, previews
            )
            inflight = InFlight(
                normalizer.normalize,
                self._producer,
                service=SERVICE,
                dead_letter_topic=dead_letter_topic,
                concurrency=settings.concurrency,
                max_bytes=settings.max_inflight_bytes,
            )
            self.shell.consume(
                EventConsumer(
                    config.kafka,
                    service=SERVICE,
                    group_id=lane.group(settings.group_id),
                    topics=[config.kafka.topic(lane.topic(Topic.INSTANCE_RECEIVED))],
                    model=InstanceReceived,
                    batch_handler=inflight.handle_batch,
                    on_assigned=inflight.assigned,
                    on_revoked=inflight.revoked,
                    producer=self._producer,
                    dead_letter_topic=dead_letter_topic,
                )
            )
        self.shell.loop(
            "rule file watcher",
            functools.partial(self._preview_rules.watch, settings.reload_interval_s),
        )
        self.shell.on_close(self._close_codecs)

    async def start(self) -> None:
        settings = self._config.transcode
        # Blob store calls run in threads: two per instance in flight in each lane, and
        # some to spare.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(4 * settings.concurrency + 4, thread_name_prefix="transcode-io")
        )
        self._preview_rules.load()
        await self.shell.start()

    async def _close_codecs(self) -> None:
        await asyncio.to_thread(self._codecs.close)

    async def stop(self) -> None:
        await self.shell.stop()
