"""Report-return's lifecycle on the shared shell: sites, the router's rule file (for
Structured Reports, watched live), one set of consumers per site, the ops endpoint.

Each site has its own consumer groups, ``<prefix>.<site>.reports`` on reports.finalized
and, while the rule file routes Structured Reports to it, ``.stat`` and ``.routine`` on
the forward-request topics: a RIS that is down holds back only its own reports, and its
groups' lag is its backlog. A site with FHIR output has the same three again for that
channel (``<prefix>.<site>.fhir-reports``, ``.fhir-stat``, ``.fhir-routine``), so with
output ``both`` each channel drains on its own. ``<prefix>.unknown-sites``
dead-letters reports naming a site that is not configured. A change of the rule file
starts or stops a site's Structured Report consumers without touching the others. On
SIGTERM each consumer stops after the message on the wire; what was not acknowledged is
not committed and is read again.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore
from radflow_core.consumer import BatchHandler, EventConsumer
from radflow_core.errors import ConfigurationError
from radflow_core.events import (
    LANES,
    EventModel,
    ForwardRequested,
    ReportChannel,
    ReportFinalized,
)
from radflow_core.kafka import EventProducer
from radflow_core.shell import Shell
from radflow_core.topics import Topic
from radflow_rules.destinations import DestinationKind
from radflow_rules.live import LiveRules, RulesMetrics
from radflow_rules.loader import RuleFileError
from radflow_rules.rules import RuleSet
from report_return import metrics
from report_return.delivery import (
    FhirReturner,
    OruReturner,
    Outcomes,
    Returner,
    UnknownSites,
)
from report_return.fhir_client import FhirClient
from report_return.mllp import MllpClient
from report_return.settings import ReportReturnConfig
from report_return.sites import Site, SitesFileError, load_sites

log = logging.getLogger(__name__)

SERVICE = "report-return"
RULES_METRICS = RulesMetrics(metrics.RULES_GENERATION, metrics.RULES_VALID, metrics.RULES_RELOADS)
UNKNOWN = "unknown-sites"
"""The pseudo-site whose consumers fail reports for sites not in the sites file."""


def routed_sites(rules: RuleSet | None) -> set[str]:
    """The sites the rule file sends Structured Reports to."""
    if rules is None:
        return set()
    return {
        d.site or "" for d in rules.destinations.values() if d.kind is DestinationKind.REPORT_RETURN
    }


def _group(site: str, channel: ReportChannel, source: str) -> str:
    """A site's consumer group (after the prefix) for one channel and input: the ORU
    channel keeps the names it had before FHIR existed; the FHIR ones end in
    ``.fhir-<input>``, which no ``<site>.<input>`` does, so none can collide."""
    if channel is ReportChannel.ORU:
        return f"{site}.{source}"
    return f"{site}.{channel.value}-{source}"


class ReportReturnService:
    def __init__(self, config: ReportReturnConfig) -> None:
        self._config = config
        settings = config.report_return
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._audit = Auditor(SERVICE, self._producer, config.audit)
        self._rules = (
            LiveRules(settings.rules_file, RULES_METRICS, audit=self._audit)
            if settings.rules_file
            else None
        )
        self.returners: dict[str, list[Returner]] = {}
        """Per site, one returner per channel it uses."""
        self._sites: dict[str, Site] = {}
        self._sr_consumers: dict[str, list[EventConsumer[Any]]] = {}
        """Per site (or UNKNOWN), its consumers of routed Structured Reports."""
        self._outcomes = Outcomes(self._producer, self._audit)
        self._unknown: UnknownSites | None = None
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
        if self._rules is not None:
            self.shell.loop(
                "rule file watcher",
                functools.partial(self._rules.watch, settings.reload_interval_s, self._apply),
            )

    def _current_rules(self) -> RuleSet | None:
        return self._rules.current if self._rules is not None and self._rules.loaded else None

    def _consumer(
        self, group: str, topic: Topic, model: type[EventModel], handler: BatchHandler
    ) -> EventConsumer[Any]:
        settings, kafka = self._config.report_return, self._config.kafka
        return EventConsumer(
            kafka,
            service=SERVICE,
            group_id=f"{settings.group_prefix}.{group}",
            topics=[kafka.topic(topic)],
            model=model,
            batch_handler=handler,
            producer=self._producer,
            dead_letter_topic=kafka.topic(Topic.REPORT_FAILED),
        )

    def _build(self) -> None:
        settings = self._config.report_return
        self._sites = dict(load_sites(settings.sites_file))
        if self._rules is not None:
            self._rules.load()
        for site in self._sites.values():
            returners: list[Returner] = []
            common = (self._blobs, self._outcomes, settings, self._current_rules)
            if site.output.oru:
                returners.append(OruReturner(site, MllpClient(site), *common))
            if site.fhir is not None and site.output.fhir:
                returners.append(FhirReturner(site, FhirClient(site.fhir), *common))
            self.returners[site.name] = returners
            for returner in returners:
                self.shell.on_close(returner.close)
                self.shell.consume(
                    self._consumer(
                        _group(site.name, returner.channel, "reports"),
                        Topic.REPORTS_FINALIZED,
                        ReportFinalized,
                        returner.handle_batch,
                    )
                )
        self._unknown = UnknownSites(self._sites, self._current_rules, self._outcomes)
        self.shell.consume(
            self._consumer(
                f"{UNKNOWN}.reports",
                Topic.REPORTS_FINALIZED,
                ReportFinalized,
                self._unknown.handle_batch,
            )
        )
        self._route_structured_reports(self._current_rules())
        log.info(
            "sites loaded",
            extra={
                "sites": sorted(self._sites),
                "rules_digest": self._rules.current.digest if self._rules else None,
            },
        )

    def _wanted(self, rules: RuleSet | None) -> set[str]:
        """Which sites (and UNKNOWN) should read routed Structured Reports now."""
        routed = routed_sites(rules)
        unknown = routed - set(self._sites)
        if unknown:
            log.warning(
                "the rule file routes Structured Reports to sites that are not in the sites "
                "file; they go to report.failed (unknown_site)",
                extra={"sites": sorted(unknown)},
            )
        return (routed & set(self._sites)) | ({UNKNOWN} if unknown else set())

    def _route_structured_reports(self, rules: RuleSet | None) -> None:
        for name in sorted(self._wanted(rules) - set(self._sr_consumers)):
            handlers = (
                [(ReportChannel.ORU, self._unknown.handle_batch)]
                if name == UNKNOWN and self._unknown is not None
                else [(r.channel, r.handle_batch) for r in self.returners[name]]
            )
            consumers = [
                self._consumer(
                    _group(name, channel, lane.value),
                    lane.topic(Topic.FORWARD_REQUESTED),
                    ForwardRequested,
                    handler,
                )
                for channel, handler in handlers
                for lane in LANES
            ]
            self._sr_consumers[name] = consumers
            for consumer in consumers:
                self.shell.consume(consumer)

    async def _apply(self, rules: RuleSet) -> None:
        """Start or stop sites' Structured Report consumers to match ``rules``."""
        wanted = self._wanted(rules)
        for name in sorted(set(self._sr_consumers) - wanted):
            await self.shell.retire(self._sr_consumers.pop(name))
            log.info("Structured Reports no longer routed to site", extra={"site": name})
        started = wanted - set(self._sr_consumers)
        self._route_structured_reports(rules)
        for name in sorted(started):
            log.info("Structured Reports now routed to site", extra={"site": name})

    async def start(self) -> None:
        try:
            self._build()
        except (SitesFileError, RuleFileError, ConfigurationError) as exc:
            self.shell.cannot_run(
                "cannot return reports with this configuration; not starting",
                str(exc).splitlines(),
            )
            return
        await self.shell.start()

    async def stop(self) -> None:
        await self.shell.stop()
