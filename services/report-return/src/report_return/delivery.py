"""Returning reports to one site, per channel: read the report, build its ORU^R01 (and
send it over MLLP until the RIS answers) or its FHIR DiagnosticReport (and create or
update it on the site's FHIR server), and say what happened.

A site with output ``both`` has one returner per channel, each on its own consumer
groups: a RIS that is down holds back only the ORU channel, and each channel publishes
its own outcome (``channel`` in report.returned / report.failed) and keeps its own
markers. FHIR: see report_return.fhir_client for the requests, docs/fhir-interface.md
for the resource.

Order of effects for each report: message sent → RIS answers AA → marker in the bucket
(``returned/<site hash>/<delivery hash>``) → ``report.returned`` → offset committed. A
replayed report finds its marker and is not sent again; a crash between the AA and the
marker sends it once more with the same MSH-10, which the RIS can recognise.

Answers: AA returns the report; AR (rejected) and an unreadable answer are final;
AE (application error) is retried ``application_error_retries`` times, then final;
no connection, no answer in time, or a connection closed early are retried with
backoff for ``RADFLOW_REPORT_RETURN_RETRY_BUDGET_S``, then ``retries_exhausted``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

from aiokafka import ConsumerRecord

from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore
from radflow_core.errors import BlobStoreUnavailable, BrokerUnavailable, PipelineError
from radflow_core.events import (
    BlobRef,
    Envelope,
    FhirIssue,
    FhirResult,
    ForwardRequested,
    ReportChannel,
    ReportFailed,
    ReportFinalized,
    ReportReturned,
    ReportSource,
    ReportStatus,
)
from radflow_core.kafka import EventProducer
from radflow_core.report_document import ReportDocument
from radflow_core.retry import HandedBack, current_turn
from radflow_rules.destinations import DestinationKind
from radflow_rules.rules import RuleSet
from report_return.fhir_client import FhirAnswer, FhirClient, FhirError, FhirUnavailable
from report_return.fhir_report import BuiltReport, build_diagnostic_report, redactor
from report_return.hl7 import Ack, Oru, build_oru, control_id, parse_ack, patient_identifier
from report_return.metrics import (
    ACK_LATENCY,
    ACKS,
    ALREADY_RETURNED,
    FAILED,
    FHIR_LATENCY,
    FHIR_REQUESTS,
    FHIR_TOKENS,
    OUTCOMES,
    RETRIES,
    SENT,
)
from report_return.mllp import MllpClient, MllpError
from report_return.report import ReportTooLarge, UnknownSite, UnreadableReport, document_from
from report_return.settings import ReportReturnSettings
from report_return.sites import Site
from report_return.sr import document_from_sr

log = logging.getLogger(__name__)

RETURNED_MARKER = "returned"

Item = tuple[Envelope[Any], ConsumerRecord[bytes, bytes]]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Origin:
    """One report to return, and where it came from."""

    site: str
    source: ReportSource
    report_id: str
    report_version: int | None
    study_instance_uid: str
    sop_instance_uid: str | None
    destination: str | None
    delivery_key: str
    """What the control ID and marker derive from: the same report version (or SR
    delivery) always has the same key."""
    requested: ReportStatus
    blob: BlobRef
    record: ConsumerRecord[bytes, bytes]

    @classmethod
    def of_report(cls, event: ReportFinalized, record: ConsumerRecord[bytes, bytes]) -> Origin:
        return cls(
            site=event.site,
            source=ReportSource.REPORTS_FINALIZED,
            report_id=event.report_id,
            report_version=event.report_version,
            study_instance_uid=event.study_instance_uid,
            sop_instance_uid=None,
            destination=None,
            delivery_key=f"report\n{event.report_id}\n{event.report_version}",
            requested=event.status,
            blob=event.document,
            record=record,
        )

    @classmethod
    def of_request(
        cls, request: ForwardRequested, site: str, record: ConsumerRecord[bytes, bytes]
    ) -> Origin:
        return cls(
            site=site,
            source=ReportSource.STRUCTURED_REPORT,
            report_id=request.sop_instance_uid,
            report_version=None,
            study_instance_uid=request.study_instance_uid,
            sop_instance_uid=request.sop_instance_uid,
            destination=request.destination,
            delivery_key=f"sr\n{request.idempotency_key}",
            requested=ReportStatus.FINAL,
            blob=request.blob,
            record=record,
        )

    @property
    def control_id(self) -> str:
        return control_id(self.site, self.delivery_key)

    def request_id(self, channel: ReportChannel) -> str:
        """MSH-10 (oru) or X-Request-Id (fhir): the same on every retry and replay."""
        if channel is ReportChannel.ORU:
            return self.control_id
        return control_id(f"{self.site}\n{channel.value}", self.delivery_key)

    def identity(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "source": self.source,
            "report_id": self.report_id,
            "report_version": self.report_version,
            "study_instance_uid": self.study_instance_uid,
            "sop_instance_uid": self.sop_instance_uid,
            "destination": self.destination,
        }

    def log_fields(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "report_id": self.report_id,
            "report_version": self.report_version,
            "study_instance_uid": self.study_instance_uid,
            "control_id": self.control_id,
        }


Rules = Callable[[], RuleSet | None]
"""The rule file in force now (it is reloaded live), or None without one."""


def site_of(envelope: Envelope[Any], rules: RuleSet | None) -> tuple[str, bool] | None:
    """(site, is a structured report) of an input record, or None if it is not a report
    for report-return (a forward request to another kind of destination)."""
    data = envelope.data
    if isinstance(data, ReportFinalized):
        return data.site, False
    if isinstance(data, ForwardRequested) and rules is not None:
        destination = rules.destinations.get(data.destination)
        if destination is not None and destination.kind is DestinationKind.REPORT_RETURN:
            return destination.site or "", True
    return None


def origin_of(envelope: Envelope[Any], site: str, record: ConsumerRecord[bytes, bytes]) -> Origin:
    data = envelope.data
    if isinstance(data, ReportFinalized):
        return Origin.of_report(data, record)
    return Origin.of_request(data, site, record)


class Outcomes:
    """Publishes what became of each report, and counts it."""

    def __init__(self, producer: EventProducer, audit: Auditor | None = None) -> None:
        self._producer = producer
        self._audit = audit

    async def returned(
        self,
        origin: Origin,
        status: ReportStatus,
        attempts: int,
        latency_s: float,
        *,
        channel: ReportChannel = ReportChannel.ORU,
        replay: bool = False,
        patient_id: str | None = None,
        fhir: FhirResult | None = None,
    ) -> None:
        oru = channel is ReportChannel.ORU
        event = ReportReturned(
            **origin.identity(),
            channel=channel,
            attempts=attempts,
            status=status,
            message_control_id=origin.request_id(channel),
            ack_code="AA" if oru else None,
            acked_at=datetime.now(UTC),
            ack_latency_s=latency_s,
            already_returned=replay,
            fhir=fhir,
        )
        await self._producer.publish(event, event.key)
        if not replay:
            self._audit_sent(origin, patient_id=patient_id)
        if replay:
            ALREADY_RETURNED.labels(origin.site).inc()
        OUTCOMES.labels(
            origin.site, channel.value, "already_returned" if replay else "returned"
        ).inc()
        answer = {"ack_code": "AA"} if oru else {"http_status": fhir.http_status if fhir else None}
        log.info(
            "already returned; not sent again" if replay else "returned",
            extra={**origin.log_fields(), "channel": channel.value, "attempt": attempts, **answer},
        )

    async def failed(
        self,
        origin: Origin,
        reason: str,
        message: str,
        *,
        retriable: bool,
        attempts: int = 0,
        status: ReportStatus | None = None,
        ack: Ack | None = None,
        sent: bool = False,
        patient_id: str | None = None,
        channel: ReportChannel = ReportChannel.ORU,
        http_status: int | None = None,
        fhir_issues: tuple[FhirIssue, ...] = (),
    ) -> None:
        """``patient_id``: what PID-3 (or the FHIR subject) gave the site, for the audit
        message only. ``fhir_issues`` are already redacted."""
        record = origin.record
        event = ReportFailed(
            **origin.identity(),
            channel=channel,
            attempts=attempts,
            reason=reason,
            message=message,
            retriable=retriable,
            status=status or origin.requested,
            message_control_id=origin.request_id(channel) if sent else None,
            http_status=http_status,
            fhir_issues=fhir_issues,
            ack_code=ack.code if ack is not None and ack.code != "AA" else None,
            ack_errors=ack.errors if ack is not None else (),
            source_topic=record.topic,
            source_partition=record.partition,
            source_offset=record.offset,
            failed_at=datetime.now(UTC),
            original_key=record.key.decode("utf-8", "replace") if record.key else None,
            original_value=(record.value or b"").decode("utf-8", "replace"),
        )
        await self._producer.publish(event, event.key)
        if sent:
            self._audit_sent(origin, failure=reason, patient_id=patient_id)
        FAILED.labels(origin.site, reason).inc()
        OUTCOMES.labels(origin.site, channel.value, "failed").inc()
        log.warning(
            "report not returned",
            extra={
                **origin.log_fields(),
                "channel": channel.value,
                "reason": reason,
                "http_status": http_status,
            },
        )

    def _audit_sent(
        self, origin: Origin, failure: str | None = None, patient_id: str | None = None
    ) -> None:
        if self._audit is not None:
            self._audit.report_sent(
                origin.site,
                report_id=origin.report_id,
                report_version=origin.report_version,
                study=origin.study_instance_uid,
                failure=failure,
                patient_id=patient_id,
            )


class Returner:
    """Everything returned to one site on one channel goes through one of these (one
    report at a time); subclasses deliver."""

    channel: ClassVar[ReportChannel]

    def __init__(
        self,
        site: Site,
        blobs: BlobStore,
        outcomes: Outcomes,
        settings: ReportReturnSettings,
        rules: Rules,
    ) -> None:
        self.site = site
        self._blobs = blobs
        self._outcomes = outcomes
        self._settings = settings
        self._rules = rules
        for outcome in ("returned", "failed", "already_returned"):
            OUTCOMES.labels(site.name, self.channel.value, outcome)
        self._turn = asyncio.Lock()
        # The ORU channel's markers keep the place they had before FHIR existed.
        scope = site.name if self.channel is ReportChannel.ORU else f"{site.name}\n{self.channel}"
        self._scope = _digest(scope)[:16]

    async def close(self) -> None:
        """Release the channel's connections (safe to call twice)."""

    async def handle_batch(self, items: list[Item]) -> None:
        """A partition's fetch: return the reports for this site, in order."""
        for envelope, record in items:
            found = site_of(envelope, self._rules())
            if found is None or found[0] != self.site.name:
                continue
            origin = origin_of(envelope, self.site.name, record)
            async with self._turn:
                await self.handle(origin, structured=found[1])

    async def handle(self, origin: Origin, *, structured: bool) -> None:
        """Return one report; every outcome but an outage is published here."""
        try:
            if await self._blobs.exists(self._marker(origin)):
                await self._outcomes.returned(
                    origin,
                    await self._returned_status(origin),
                    0,
                    0.0,
                    replay=True,
                    channel=self.channel,
                )
                return
            document = await self._read(origin, structured)
            await self._deliver(origin, document)
        except (BrokerUnavailable, BlobStoreUnavailable, HandedBack):
            raise
        except PipelineError as exc:
            await self._outcomes.failed(
                origin, exc.reason, str(exc), retriable=exc.retriable, channel=self.channel
            )
        except Exception as exc:
            log.exception("unexpected error returning a report", extra=origin.log_fields())
            await self._outcomes.failed(
                origin,
                "unexpected_error",
                type(exc).__name__,
                retriable=False,
                channel=self.channel,
            )

    def _marker(self, origin: Origin) -> str:
        return f"{RETURNED_MARKER}/{self._scope}/{_digest(origin.delivery_key)}"

    def _order_marker(self, document: ReportDocument) -> str:
        """Exists once a final (or corrected) report of this order was acknowledged."""
        return f"{RETURNED_MARKER}/{self._scope}/orders/{_digest(document.accession_number)}"

    async def _returned_status(self, origin: Origin) -> ReportStatus:
        """The status a replayed report was returned with (kept in its marker)."""
        raw = await self._blobs.read_marker(self._marker(origin))
        if not raw:
            return origin.requested
        try:
            return ReportStatus(json.loads(raw)["status"])
        except (ValueError, KeyError, TypeError):
            return origin.requested

    async def _read(self, origin: Origin, structured: bool) -> ReportDocument:
        if origin.blob.size > self._settings.max_report_bytes:
            raise ReportTooLarge(
                f"{origin.blob.size} bytes, more than RADFLOW_REPORT_RETURN_MAX_REPORT_BYTES"
            )
        data = await self._blobs.read(origin.blob)
        if structured:
            return await asyncio.to_thread(document_from_sr, data)
        try:
            parsed = json.loads(data)
        except ValueError:
            raise UnreadableReport("the report document is not JSON") from None
        return document_from(parsed)

    async def _deliver(self, origin: Origin, document: ReportDocument) -> None:
        raise NotImplementedError

    async def _backoff(self, attempt: int, reason: str) -> None:
        """Wait before the next attempt, shown as the group waiting on its site.

        Raises:
            HandedBack: the turn is handed back meanwhile (stop, or revocation).
        """
        RETRIES.labels(self.site.name).inc()
        await current_turn().pause(
            attempt,
            reason,
            initial_s=self._settings.retry_initial_s,
            max_s=self._settings.retry_max_s,
        )

    async def _mark(self, origin: Origin, status: ReportStatus) -> None:
        marker = json.dumps(
            {"status": status.value, "control_id": origin.request_id(self.channel)}
        ).encode()
        await self._blobs.put_bytes(
            self._marker(origin), marker, kind=RETURNED_MARKER, check_existing=False
        )


class OruReturner(Returner):
    """HL7 ORU^R01 over MLLP to the site's RIS."""

    channel = ReportChannel.ORU

    def __init__(
        self,
        site: Site,
        client: MllpClient,
        blobs: BlobStore,
        outcomes: Outcomes,
        settings: ReportReturnSettings,
        rules: Rules,
    ) -> None:
        super().__init__(site, blobs, outcomes, settings, rules)
        self._client = client
        # At 0 from the start, for what a RIS can answer or fail with: the dashboard's
        # rate() then draws a site's first AE, AR or retry, which a counter appearing
        # at 1 would hide.
        RETRIES.labels(site.name)
        for code in ("AA", "AE", "AR", "invalid"):
            ACKS.labels(site.name, code)
        for reason in ("rejected", "application_error", "invalid_ack", "retries_exhausted"):
            FAILED.labels(site.name, reason)

    async def _deliver(self, origin: Origin, document: ReportDocument) -> None:
        status = origin.requested
        order_marker = self._order_marker(document)
        if status is ReportStatus.FINAL and await self._blobs.exists(order_marker):
            status = ReportStatus.CORRECTED
        oru = build_oru(document, status, self.site, origin.control_id, datetime.now(UTC))
        sent = await self._send(origin, oru)
        if sent is None:
            return
        attempts, latency = sent
        await self._mark(origin, status)
        if status is not ReportStatus.PRELIMINARY:
            await self._blobs.put_bytes(
                order_marker, oru.control_id.encode(), kind=RETURNED_MARKER, check_existing=False
            )
        await self._outcomes.returned(origin, status, attempts, latency, patient_id=oru.patient_id)

    async def _send(self, origin: Origin, oru: Oru) -> tuple[int, float] | None:
        """Send until AA; returns (attempts, ack latency), or None when the report went
        to report.failed instead."""
        site = self.site.name
        first = time.monotonic()
        attempts = errors = 0
        while True:
            current_turn().check()
            attempts += 1
            try:
                answer = await self._client.exchange(oru.payload)
            except MllpError as exc:
                if exc.written:
                    SENT.labels(site).inc()
                if time.monotonic() - first >= self._settings.retry_budget_s:
                    await self._outcomes.failed(
                        origin,
                        "retries_exhausted",
                        f"retry budget of {self._settings.retry_budget_s:g}s used up; last: {exc}",
                        retriable=True,
                        attempts=attempts,
                        status=oru.status,
                        sent=True,
                        patient_id=oru.patient_id,
                    )
                    return None
                log.warning(
                    "RIS not reached; will retry",
                    extra={**origin.log_fields(), "reason": exc.reason, "attempt": attempts},
                )
                await self._backoff(attempts, "ris_unavailable")
                continue
            SENT.labels(site).inc()
            ack = parse_ack(answer.data, self.site.codec, oru.control_id)
            ACKS.labels(site, ack.code or "invalid").inc()
            ACK_LATENCY.labels(site).observe(answer.latency_s)
            if ack.code == "AA":
                return attempts, answer.latency_s
            if ack.code == "AE" and errors < self.site.application_error_retries:
                errors += 1
                log.warning(
                    "RIS answered AE; will retry",
                    extra={**origin.log_fields(), "ack_code": "AE", "attempt": attempts},
                )
                await self._backoff(attempts, "ris_application_error")
                continue
            reason, message = {
                "AE": ("application_error", "the RIS answered AE (application error)"),
                "AR": ("rejected", "the RIS answered AR (rejected)"),
            }.get(ack.code or "", ("invalid_ack", "the RIS's answer is not a valid ACK"))
            await self._outcomes.failed(
                origin,
                reason,
                f"{message}: {ack.problem}" if ack.problem else message,
                retriable=ack.code == "AE",
                attempts=attempts,
                status=oru.status,
                ack=ack,
                sent=True,
                patient_id=oru.patient_id,
            )
            return None


class FhirReturner(Returner):
    """A FHIR R4 DiagnosticReport on the site's FHIR server.

    The first version of a report the site gets is a conditional create; once one went
    through (marker ``reports/<identifier>``) every later version is a conditional
    update of the same resource, and a final after a final goes as corrected (or
    amended). A correction for a report never sent here is an update too, which the
    server turns into a create. A later version whose create finds the report there
    (sent before a crash lost our marker) is sent again as an update."""

    channel = ReportChannel.FHIR

    def __init__(
        self,
        site: Site,
        client: FhirClient,
        blobs: BlobStore,
        outcomes: Outcomes,
        settings: ReportReturnSettings,
        rules: Rules,
    ) -> None:
        super().__init__(site, blobs, outcomes, settings, rules)
        self._client = client
        RETRIES.labels(site.name)
        FHIR_TOKENS.labels(site.name)
        for reason in ("fhir_rejected", "fhir_ambiguous", "fhir_invalid_resource"):
            FAILED.labels(site.name, reason)

    async def close(self) -> None:
        await self._client.aclose()

    def _report_marker(self, system: str, value: str) -> str:
        return f"{RETURNED_MARKER}/{self._scope}/reports/{_digest(f'{system}|{value}')}"

    async def _last_status(self, marker: str) -> ReportStatus | None:
        """The status the report was last sent with, or None if never."""
        raw = await self._blobs.read_marker(marker)
        if raw is None:
            return None
        try:
            return ReportStatus(json.loads(raw)["status"])
        except (ValueError, KeyError, TypeError):
            return ReportStatus.FINAL

    async def _deliver(self, origin: Origin, document: ReportDocument) -> None:
        structured = origin.source is ReportSource.STRUCTURED_REPORT
        status = origin.requested
        built = build_diagnostic_report(
            document,
            status,
            self.site,
            report_id=origin.report_id,
            report_version=origin.report_version,
            structured=structured,
        )
        report_marker = self._report_marker(built.identifier_system, built.identifier_value)
        last = await self._last_status(report_marker)
        if status is ReportStatus.FINAL and last in (ReportStatus.FINAL, ReportStatus.CORRECTED):
            status = ReportStatus.CORRECTED
            built = build_diagnostic_report(
                document,
                status,
                self.site,
                report_id=origin.report_id,
                report_version=origin.report_version,
                structured=structured,
            )
        update = last is not None or status is ReportStatus.CORRECTED
        patient_id = patient_identifier(document, self.site).id
        redact = redactor(document)
        sent = await self._send(origin, built, status, update, redact, patient_id)
        if sent is None:
            return
        attempts, answer = sent
        if not answer.created and not update and (origin.report_version or 1) > 1:
            # The create found the report already there, but without our marker: an
            # earlier version sent before a crash, or this one. Make sure it is this one.
            again = await self._send(origin, built, status, True, redact, patient_id)
            if again is None:
                return
            attempts, answer = attempts + again[0], again[1]
        await self._mark(origin, status)
        await self._blobs.put_bytes(
            report_marker,
            json.dumps({"status": status.value}).encode(),
            kind=RETURNED_MARKER,
            check_existing=False,
        )
        result = FhirResult(
            interaction=answer.interaction,
            http_status=answer.http_status,
            created=answer.created,
            resource_id=answer.resource_id,
            version_id=answer.version_id,
        )
        await self._outcomes.returned(
            origin,
            status,
            attempts,
            answer.latency_s,
            channel=self.channel,
            fhir=result,
            patient_id=patient_id,
        )

    async def _send(
        self,
        origin: Origin,
        built: BuiltReport,
        status: ReportStatus,
        update: bool,
        redact: Callable[[str], str],
        patient_id: str,
    ) -> tuple[int, FhirAnswer] | None:
        """Send until the server takes it; (attempts, answer), or None when the report
        went to report.failed instead."""
        site = self.site.name
        interaction = "update" if update else "create"
        first = time.monotonic()
        attempts = 0
        while True:
            current_turn().check()
            attempts += 1
            tokens = self._client.auth.fetched if self._client.auth else 0
            try:
                answer = await self._client.send(
                    built,
                    update=update,
                    request_id=origin.request_id(self.channel),
                    redact=redact,
                )
            except FhirError as exc:
                FHIR_REQUESTS.labels(site, interaction, str(exc.http_status or "none")).inc()
                self._count_tokens(tokens)
                failure: dict[str, Any] = {
                    "attempts": attempts,
                    "status": status,
                    "sent": True,
                    "patient_id": patient_id,
                    "channel": self.channel,
                    "http_status": exc.http_status,
                    "fhir_issues": exc.issues,
                }
                if not isinstance(exc, FhirUnavailable):
                    await self._outcomes.failed(
                        origin, exc.reason, str(exc), retriable=False, **failure
                    )
                    return None
                if time.monotonic() - first >= self._settings.retry_budget_s:
                    await self._outcomes.failed(
                        origin,
                        "retries_exhausted",
                        f"retry budget of {self._settings.retry_budget_s:g}s used up; last: {exc}",
                        retriable=True,
                        **failure,
                    )
                    return None
                log.warning(
                    "FHIR server did not take the report; will retry",
                    extra={
                        **origin.log_fields(),
                        "channel": self.channel.value,
                        "reason": exc.reason,
                        "http_status": exc.http_status,
                        "attempt": attempts,
                    },
                )
                await self._backoff(attempts, "fhir_unavailable")
                continue
            self._count_tokens(tokens)
            FHIR_REQUESTS.labels(site, interaction, str(answer.http_status)).inc()
            FHIR_LATENCY.labels(site).observe(answer.latency_s)
            return attempts, answer

    def _count_tokens(self, before: int) -> None:
        if self._client.auth is not None:
            FHIR_TOKENS.labels(self.site.name).inc(self._client.auth.fetched - before)


class UnknownSites:
    """Dead-letters reports for sites that are not in the sites file."""

    def __init__(self, sites: Mapping[str, Site], rules: Rules, outcomes: Outcomes) -> None:
        self._sites = sites
        self._rules = rules
        self._outcomes = outcomes

    async def handle_batch(self, items: list[Item]) -> None:
        for envelope, record in items:
            found = site_of(envelope, self._rules())
            if found is None or found[0] in self._sites:
                continue
            origin = origin_of(envelope, found[0] or "unnamed", record)
            error = UnknownSite(
                f"site {found[0]!r} is not in the sites file (known: "
                f"{', '.join(sorted(self._sites))})"
            )
            await self._outcomes.failed(origin, error.reason, str(error), retriable=False)
