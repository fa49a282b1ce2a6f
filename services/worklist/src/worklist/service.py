"""The worklist's lifecycle on the shared shell: restore the merged view from
``worklist.items``, then open the doors (the MLLP order listener and the Modality
Worklist SCP) and follow the topic until stopped.

The doors open only once the view is whole, so a modality never gets a partial list
after a restart and an order accepted meanwhile is never overwritten by an older
record read back; ``/readyz`` says so (check ``worklist``).
"""

from __future__ import annotations

import asyncio
import logging

from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore
from radflow_core.errors import ConfigurationError, PipelineError
from radflow_core.kafka import EventProducer
from radflow_core.shell import Shell
from radflow_core.tls import TlsFilesUnusable, server_context
from radflow_core.topics import Topic
from worklist import metrics
from worklist.ack import build_ack
from worklist.er7 import Delimiters
from worklist.follower import TopicFollower
from worklist.intake import Intake
from worklist.mllp import MllpListener
from worklist.orders import AckCode, Header, Refused
from worklist.scp import WorklistScp
from worklist.settings import WorklistConfig
from worklist.sites import Sites, load_sites
from worklist.view import MergedView

log = logging.getLogger(__name__)

SERVICE = "worklist"


class NotRestored(PipelineError):
    retriable = True
    reason = "worklist_not_restored"


class WorklistService:
    def __init__(self, config: WorklistConfig) -> None:
        self._config = config
        settings = config.worklist
        self._producer = EventProducer(config.kafka, SERVICE)
        self._blobs = BlobStore(config.s3)
        self._audit = Auditor(SERVICE, self._producer, config.audit)
        self.view = MergedView()
        self._topic = config.kafka.topic(Topic.WORKLIST_ITEMS)
        self._restored = asyncio.Event()
        self.shell = Shell(
            SERVICE,
            producer=self._producer,
            blobs=self._blobs,
            ops=config.ops,
            http_host=settings.http_host,
            http_port=settings.http_port,
            checks={"worklist": self._ready},
            audit=self._audit,
        )
        self.failed = self.shell.failed
        self.mllp: MllpListener | None = None
        self.scp: WorklistScp | None = None
        self._follower = TopicFollower(
            config.kafka, self._topic, self._blobs, self.view, settings.restore_idle_ms
        )
        try:
            self._sites: Sites | None = load_sites(settings.sites_file)
        except ConfigurationError as exc:
            self._sites = None
            self.shell.cannot_run("sites file unusable", str(exc).splitlines())
            return
        for name in [*self._sites.by_name, "unknown"]:  # from 0, so increase() sees the first
            for message_type in ("ORM^O01", "OMI^O23"):
                for ack in AckCode:
                    metrics.ORDERS.labels(name, message_type, ack.value)
        self.shell.loop("worklist", self._run, graceful=True)
        self.shell.on_drain(self._close_doors)
        self.shell.on_close(self._follower.close)

    async def start(self) -> None:
        await self.shell.start()

    async def stop(self) -> None:
        await self.shell.stop()

    async def _ready(self) -> None:
        if not self._restored.is_set():
            raise NotRestored("the view is being rebuilt from worklist.items")

    async def _run(self) -> None:
        stopping = self.shell.stopping
        await self.shell.connected.wait()
        delay = 0.5
        while not stopping.is_set():
            try:
                count = await self._follower.restore()
                break
            except PipelineError as exc:
                log.warning("worklist not restored yet; retrying", extra={"reason": exc.reason})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        else:
            return
        metrics.RESTORED.set(count)
        log.info("worklist restored", extra={"count": count})
        try:
            await self._open_doors()
        except (OSError, TlsFilesUnusable) as exc:
            self.shell.cannot_run(
                "cannot open the worklist's listeners", [f"{type(exc).__name__}: {exc}"]
            )
            return
        self._restored.set()
        gauges = asyncio.create_task(self._gauge(stopping))
        try:
            await self._follower.follow(stopping)
        finally:
            gauges.cancel()

    async def _open_doors(self) -> None:
        settings = self._config.worklist
        assert self._sites is not None
        tls = None
        if settings.mllp_tls_cert_file is not None and settings.mllp_tls_key_file is not None:
            tls = server_context(
                settings.mllp_tls_cert_file,
                settings.mllp_tls_key_file,
                client_ca_file=settings.mllp_tls_client_ca_file,
                require_client_cert=True,
            )
        intake = Intake(
            self._sites,
            self._config.order.reference_key,
            self._producer,
            self._blobs,
            self.view,
            self._topic,
        )
        self.scp = WorklistScp(settings, self._sites, self.view)
        await asyncio.to_thread(self.scp.start)
        self.mllp = MllpListener(
            settings.mllp_host,
            settings.mllp_port,
            intake.handle,
            tls=tls,
            max_bytes=settings.max_message_bytes,
            idle_timeout_s=settings.mllp_idle_timeout_s,
            too_large=lambda: build_ack(
                Header(Delimiters()),
                AckCode.AR,
                Refused(AckCode.AR, 100, "message larger than the worklist reads"),
            ),
        )
        await self.mllp.start()

    async def _gauge(self, stopping: asyncio.Event) -> None:
        assert self._sites is not None
        while not stopping.is_set():
            counts = self.view.per_site()
            for name in self._sites.by_name:
                metrics.OPEN_ITEMS.labels(name).set(counts.get(name, 0))
            await asyncio.sleep(1)

    async def _close_doors(self) -> None:
        if self.mllp is not None:
            await self.mllp.stop()
        if self.scp is not None:
            await asyncio.to_thread(self.scp.stop)
