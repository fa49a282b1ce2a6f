"""Report-return's lifecycle: sites (and the router's rule file, for Structured Reports),
one set of consumers per site, the ops endpoint.

Each site has its own consumer groups, ``<prefix>.<site>.reports`` on reports.finalized
and, when the rule file routes Structured Reports to it, ``.stat`` and ``.routine`` on
the forward-request topics: a RIS that is down holds back only its own reports, and its
groups' lag is its backlog. ``<prefix>.unknown-sites`` dead-letters reports naming a
site that is not configured. On SIGTERM each consumer stops after the message on the
wire; what was not acknowledged is not committed and is read again.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from radflow_core.blobstore import BlobStore
from radflow_core.errors import ConfigurationError
from radflow_core.events import LANES, EventModel, ForwardRequested, ReportFinalized
from radflow_core.kafka import BatchHandler, EventConsumer, EventProducer
from radflow_core.ops import Health, ops_routes
from radflow_core.runtime import connect_producer, finish, start_http
from radflow_core.topics import Topic
from radflow_rules.destinations import DestinationKind
from radflow_rules.loader import RuleFileError, load_file
from radflow_rules.rules import RuleSet
from report_return.delivery import Outcomes, Returner, UnknownSites
from report_return.mllp import MllpClient
from report_return.settings import ReportReturnConfig
from report_return.sites import SitesFileError, load_sites

log = logging.getLogger(__name__)

SERVICE = "report-return"


class ReportReturnService:
    def __init__(self, config: ReportReturnConfig) -> None:
        self._config = config
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._stopping = asyncio.Event()
        self._consumers: list[EventConsumer[Any]] = []
        self.returners: dict[str, Returner] = {}
        self.health = Health(
            {"broker": self._producer.ping, "blob_store": self._blobs.ping},
            cache_s=config.ops.readiness_cache_s,
        )
        self.failed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    def _consumer(
        self, group: str, topic: Topic, model: type[EventModel], handler: BatchHandler
    ) -> None:
        settings, kafka = self._config.report_return, self._config.kafka
        self._consumers.append(
            EventConsumer(
                kafka,
                service=SERVICE,
                group_id=f"{settings.group_prefix}.{group}",
                topics=[kafka.topic(topic)],
                model=model,
                batch_handler=handler,
                producer=self._producer,
                dead_letter_topic=kafka.topic(Topic.REPORT_FAILED),
            )
        )

    def _build(self) -> None:
        settings = self._config.report_return
        sites = load_sites(settings.sites_file)
        rules: RuleSet | None = None
        routed: set[str] = set()
        if settings.rules_file is not None:
            rules = load_file(settings.rules_file)
            routed = {
                d.site or ""
                for d in rules.destinations.values()
                if d.kind is DestinationKind.REPORT_RETURN
            }
        outcomes = Outcomes(self._producer)
        for site in sites.values():
            returner = Returner(
                site,
                MllpClient(site),
                self._blobs,
                outcomes,
                settings,
                rules,
                self._stopping,
            )
            self.returners[site.name] = returner
            self._consumer(
                f"{site.name}.reports",
                Topic.REPORTS_FINALIZED,
                ReportFinalized,
                returner.handle_batch,
            )
            if site.name in routed:
                for lane in LANES:
                    self._consumer(
                        f"{site.name}.{lane.value}",
                        lane.topic(Topic.FORWARD_REQUESTED),
                        ForwardRequested,
                        returner.handle_batch,
                    )
        unknown = UnknownSites(sites, rules, outcomes)
        self._consumer(
            "unknown-sites.reports", Topic.REPORTS_FINALIZED, ReportFinalized, unknown.handle_batch
        )
        if routed - set(sites):
            log.warning(
                "the rule file routes Structured Reports to sites that are not in the sites "
                "file; they go to report.failed (unknown_site)",
                extra={"sites": sorted(routed - set(sites))},
            )
            for lane in LANES:
                self._consumer(
                    f"unknown-sites.{lane.value}",
                    lane.topic(Topic.FORWARD_REQUESTED),
                    ForwardRequested,
                    unknown.handle_batch,
                )
        log.info(
            "sites loaded",
            extra={
                "sites": sorted(sites),
                "rules_digest": rules.digest if rules else None,
                "count": len(self._consumers),
            },
        )

    async def start(self) -> None:
        settings = self._config.report_return
        try:
            self._build()
        except (SitesFileError, RuleFileError, ConfigurationError) as exc:
            log.critical(
                "cannot return reports with this configuration; not starting",
                extra={"problems": str(exc).splitlines()},
            )
            self.failed.set()
            return
        self._runner = await start_http(
            ops_routes(self.health), settings.http_host, settings.http_port
        )
        self._tasks = [asyncio.create_task(self._run())]

    async def _run(self) -> None:
        if not await connect_producer(self._producer, self.failed):
            return
        runs = [asyncio.create_task(c.run()) for c in self._consumers]
        log.info("consuming", extra={"count": len(runs)})
        try:
            for finished in asyncio.as_completed(runs):
                await finished
        except Exception:
            log.exception("a consumer stopped unexpectedly")
            self.failed.set()
            for consumer in self._consumers:
                consumer.stop()
            await asyncio.gather(*runs, return_exceptions=True)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.health.stopping = True
        self._stopping.set()
        for consumer in self._consumers:
            consumer.stop()
        for task in self._tasks:
            await finish(task)
        await self._producer.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self._blobs.close()
        log.info("stopped")
