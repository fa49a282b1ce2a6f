"""The forwarder's lifecycle: destinations from the rule file (STOW-RS and DIMSE;
report-return's are left to it), one consumer per destination and lane, ops endpoint.

Each destination has its own consumer groups (``<prefix>.<destination>.stat`` and
``.routine``), so a destination that is down holds back only its own requests, and
its lag is its backlog. The STAT consumer runs beside the routine one and takes the
destination first. On SIGTERM every consumer stops after the request on the wire;
what was not acknowledged is not committed and is read again.

The rule file is watched like the router watches it: a destination added, changed or
removed starts, restarts or stops on its own, without touching the others. Requests
routed to a new destination before the change was seen wait in the topic for it.
Requests for a destination the rule file does not define are reported by the consumers
of :mod:`stow_forwarder.unknown`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore
from radflow_core.consumer import EventConsumer
from radflow_core.errors import ConfigurationError
from radflow_core.events import LANES, ForwardRequested
from radflow_core.kafka import EventProducer
from radflow_core.shell import Shell
from radflow_core.topics import Topic
from radflow_rules.destinations import DestinationKind
from radflow_rules.live import LiveRules, RulesMetrics
from radflow_rules.loader import RuleFileError
from radflow_rules.rules import Destination, RuleSet
from stow_forwarder import metrics
from stow_forwarder.answer import DestinationClient
from stow_forwarder.client import StowClient
from stow_forwarder.commitment import CommitmentBook, CommitmentListener
from stow_forwarder.delivery import Deliverer
from stow_forwarder.dimse import DimseClient
from stow_forwarder.pseudonyms import Pseudonyms
from stow_forwarder.settings import DeidSettings, ForwarderConfig
from stow_forwarder.slo import ObjectiveGauges
from stow_forwarder.unknown import unknown_destination_consumers

log = logging.getLogger(__name__)

SERVICE = "stow-forwarder"
"""How the consumers of requests for undefined destinations are named in logs."""
RULES_METRICS = RulesMetrics(metrics.RULES_GENERATION, metrics.RULES_VALID, metrics.RULES_RELOADS)


def delivered_here(rules: RuleSet) -> dict[str, Destination]:
    return {
        name: d
        for name, d in rules.destinations.items()
        if d.kind is not DestinationKind.REPORT_RETURN
    }


def pseudonyms_for(rules: RuleSet, deid: DeidSettings) -> Pseudonyms | None:
    """The pseudonym key, when one is set.

    Raises:
        ConfigurationError: the rule file defines de-identification profiles and no key
            is set (nothing may go out identified for want of it), or the key file
            cannot be read.
    """
    key = deid.resolve()
    if rules.profiles and key is None:
        raise ConfigurationError(
            "the rule file defines de-identification profiles and no pseudonym key "
            f"is set ({deid.env_name('key')} or {deid.env_name('key_file')})"
        )
    return Pseudonyms(key) if key is not None else None


@dataclass
class Running:
    """One destination being delivered to: its client, deliverer and two consumers."""

    destination: Destination
    client: DestinationClient
    deliverer: Deliverer
    consumers: list[EventConsumer[ForwardRequested]]


class ForwarderService:
    def __init__(self, config: ForwarderConfig) -> None:
        self._config = config
        settings = config.forwarder
        self._blobs = BlobStore(config.s3)
        self._producer = EventProducer(config.kafka, SERVICE)
        self._audit = Auditor(SERVICE, self._producer, config.audit)
        self._rules = LiveRules(settings.rules_file, RULES_METRICS, audit=self._audit)
        self.running: dict[str, Running] = {}
        self._pseudonyms: Pseudonyms | None = None
        self.commitments = CommitmentBook()
        self.commitment_listener: CommitmentListener | None = None
        self._objectives = ObjectiveGauges()
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
        self.shell.loop("rule file watcher", self._watch)
        self.shell.on_close(self._close_clients)

    @property
    def deliverers(self) -> dict[str, Deliverer]:
        return {name: r.deliverer for name, r in self.running.items()}

    def _build(self, destination: Destination) -> Running:
        """Raises ConfigurationError (e.g. a referenced secret is missing)."""
        settings = self._config.forwarder
        kafka = self._config.kafka
        client: DestinationClient = (
            DimseClient(destination, settings, self.commitments)
            if destination.kind is DestinationKind.DIMSE
            else StowClient(destination, settings)
        )
        deliverer = Deliverer(
            destination,
            client,
            self._blobs,
            self._producer,
            settings,
            audit=self._audit,
            pseudonyms=self._pseudonyms,
        )
        consumers = [
            EventConsumer(
                kafka,
                service=SERVICE,
                group_id=f"{settings.group_prefix}.{destination.name}.{lane.value}",
                topics=[kafka.topic(lane.topic(Topic.FORWARD_REQUESTED))],
                model=ForwardRequested,
                batch_handler=deliverer.handle_batch,
                producer=self._producer,
                dead_letter_topic=kafka.topic(Topic.INSTANCE_FAILED),
                # Several batches per fetch, so the next is staged while one is on
                # the wire instead of waiting for the commit and the next fetch.
                max_records=max(100, 4 * destination.max_batch),
            )
            for lane in LANES
        ]
        return Running(destination, client, deliverer, consumers)

    def _launch(self, running: Running) -> None:
        self.running[running.destination.name] = running
        for consumer in running.consumers:
            self.shell.consume(consumer)

    async def start(self) -> None:
        settings = self._config.forwarder
        # The bucket client blocks, so its calls run in the loop's default executor,
        # which Python sizes by CPU count (6 threads on 2 cores): fewer than the requests
        # a deliverer keeps in flight while it stages one batch and settles another.
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max_workers=4 * settings.io_concurrency, thread_name_prefix="io")
        )
        try:
            rules = self._rules.load()
            self._pseudonyms = pseudonyms_for(rules, self._config.deid)
            built = [self._build(d) for d in delivered_here(rules).values()]
        except (RuleFileError, ConfigurationError) as exc:
            self.shell.cannot_run(
                "cannot deliver with this configuration; not starting", str(exc).splitlines()
            )
            return
        if settings.commitment_port:
            self.commitment_listener = CommitmentListener(
                self.commitments,
                settings.commitment_host,
                settings.commitment_port,
                settings.commitment_ae_title,
            )
            try:
                self.commitment_listener.start()
            except OSError as exc:
                self.shell.cannot_run(
                    "cannot listen for storage commitment reports; not starting",
                    [
                        f"RADFLOW_FORWARDER_COMMITMENT_PORT={settings.commitment_port} on "
                        f"{settings.commitment_host}: {exc.strerror or exc}"
                    ],
                )
                return
        for running in built:
            self._launch(running)
        for consumer in unknown_destination_consumers(
            lambda: self._rules.current,
            self._producer,
            self._config.kafka,
            settings,
            SERVICE,
        ):
            self.shell.consume(consumer)
        metrics.DESTINATIONS.set(len(self.running))
        self._objectives.publish(r.destination for r in self.running.values())
        log.info(
            "destinations loaded",
            extra={"destinations": sorted(self.running), "rules_digest": rules.digest},
        )
        await self.shell.start()

    async def _watch(self) -> None:
        await self._rules.watch(self._config.forwarder.reload_interval_s, self._apply)

    async def _apply(self, rules: RuleSet) -> None:
        """Start, restart or stop destinations so that the running ones match ``rules``."""
        wanted = delivered_here(rules)
        for name in sorted(set(self.running) | set(wanted)):
            old, new = self.running.get(name), wanted.get(name)
            if old is not None and old.destination == new:
                continue
            if (
                old is not None
                and new is not None
                and dataclasses.replace(old.destination, slo=new.slo) == new
            ):
                # Only the latency objectives changed: nothing to reconnect or restart.
                old.destination = old.deliverer.destination = new
                log.info("destination objectives changed", extra={"destination": name})
                continue
            if old is not None:
                await self._retire(self.running.pop(name))
            if new is None:
                # Its circuit would stay on /metrics at its last state, and an open one
                # would alert (RadflowCircuitOpen) until the forwarder restarts.
                with contextlib.suppress(KeyError):
                    metrics.CIRCUIT.remove(name)
                log.info("destination removed", extra={"destination": name})
                continue
            try:
                running = self._build(new)
            except ConfigurationError as exc:
                log.error(  # noqa: TRY400 - the problem is the message, no traceback wanted
                    "destination not started; fix its configuration",
                    extra={"destination": name, "problems": str(exc).splitlines()},
                )
                continue
            self._launch(running)
            log.info(
                "destination changed" if old is not None else "destination added",
                extra={"destination": name},
            )
        metrics.DESTINATIONS.set(len(self.running))
        self._objectives.publish(r.destination for r in self.running.values())

    async def _retire(self, running: Running) -> None:
        """Stop one destination's consumers after the request in hand, then its client."""
        await self.shell.retire(running.consumers)
        await running.client.close()

    async def _close_clients(self) -> None:
        for running in self.running.values():
            await running.client.close()
        if self.commitment_listener is not None:
            self.commitment_listener.stop()

    async def stop(self) -> None:
        await self.shell.stop()
