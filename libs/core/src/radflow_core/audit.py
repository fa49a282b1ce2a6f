"""The audit trail: DICOM audit messages (PS3.15 A.5) for what a service did, published
on ``radflow.audit`` and, optionally, sent to an audit record repository over syslog/TLS.

Auditing never blocks or fails the work it describes. Every method here returns at
once and never raises: a message is handed to the service's producer without waiting
for the broker (at most ``max_pending`` in flight) and to a bounded syslog queue; what
cannot be sent is dropped and counted (``radflow_audit_dropped_total{reason}``). The
methods may be called from any thread (pynetdicom's association threads included).

Instances are audited as archives do (dcm4chee writes one DICOM Instances Transferred
message per association and study): the instances of one study from one sender, or
to one destination, are collected for ``transfer_window_s`` and written as one
message listing their SOP classes and instances.

Patient identifiers: PS3.15 A.5.3 requires the patient (ParticipantObjectTypeCode 1,
role 1, ID type RFC-3881 "2" Patient Number) in DICOM Instances Transferred and Export,
so those messages carry the Patient ID, and only the ID: it answers "who received or
sent this patient's images" in the audit record repository; the name would add PHI
and nothing to that answer. The events on the bus carry no patient identifier, so the
caller hands the ID over (ingest from the header it parses anyway, report-return from
the report it sends) or, for a forwarded study, a lookup run once per message when its
window closes; a patient that cannot be found is left out and counted
(``radflow_audit_patient_unknown_total{reason}``). Every other message names no
patient. radflow.audit is therefore a PHI topic (docs/security.md).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from prometheus_client import Counter

from radflow_core.audit_message import (
    Action,
    ActiveParticipant,
    AuditRecord,
    AuditSource,
    Code,
    Codes,
    ObjectRole,
    ObjectType,
    Outcome,
    ParticipantObject,
)
from radflow_core.errors import BrokerUnavailable
from radflow_core.events import AuditRecorded, Sender
from radflow_core.kafka import EventProducer
from radflow_core.settings import AuditSettings
from radflow_core.syslog import SEVERITY_NOTICE, SEVERITY_WARNING, SyslogSender, syslog_message
from radflow_core.tls import client_context

log = logging.getLogger(__name__)

MESSAGES = Counter(
    "radflow_audit_messages_total",
    "DICOM audit messages written, by EventID and outcome.",
    ["event", "outcome"],
)
DROPPED = Counter(
    "radflow_audit_dropped_total",
    "Audit messages (or their syslog copies) not delivered, by reason.",
    ["reason"],
)

PATIENT_UNKNOWN = Counter(
    "radflow_audit_patient_unknown_total",
    "Instances Transferred or Export messages written without the patient, by reason "
    "(absent: the data names none; lookup_failed: reading it failed or took too long).",
    ["reason"],
)

PATIENT_LOOKUP_TIMEOUT_S = 10.0
"""Longest wait for a forwarded study's Patient ID before its message goes without it."""

PatientLookup = Callable[[], Awaitable[str | None]]
"""Finds a study's Patient ID when its transfer message is written (None: it has none).
Any exception it raises means the patient is unknown."""

DESCRIPTION_LIMIT = 512
"""Characters of an EventOutcomeDescription kept (radflow's own words, never partner text)."""


class Door(StrEnum):
    """Where an authentication failed."""

    STOW_RS = "stow-rs"
    DIMSE = "dimse"
    DICOM_TLS = "dicom-tls"


@dataclass
class _Batch:
    """Instances of one study collected for one transfer message."""

    make: Callable[[Mapping[str, Sequence[str]], Sequence[str]], AuditRecord]
    """Builds the message from the instances and the Patient IDs."""
    study: str
    instances: dict[str, list[str]] = field(default_factory=dict)
    count: int = 0
    patients: dict[str, None] = field(default_factory=dict)
    """The distinct Patient IDs the instances carried (received), in order of arrival."""
    lookup: PatientLookup | None = None
    """Finds the Patient ID when the message is written (sent): one lookup per message."""


class Auditor:
    """One per service process; the shell starts it and writes its start and stop."""

    def __init__(
        self, service: str, producer: EventProducer | None, settings: AuditSettings
    ) -> None:
        """``producer``: the service's own (None: syslog only, e.g. in a tool)."""
        self.service = service
        self._producer = producer
        self._settings = settings
        self._source = AuditSource(
            settings.source_id or f"radflow-{service}", settings.enterprise_site_id or None
        )
        self._host = socket.gethostname()
        self._pid = str(os.getpid())
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._batches: dict[Hashable, _Batch] = {}
        self._lookup_timeout_s = PATIENT_LOOKUP_TIMEOUT_S
        self._syslog: SyslogSender | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Bind to the running loop and connect to the repository in the background.

        Raises:
            TlsFilesUnusable: the syslog CA, certificate or key cannot be used.
        """
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._lookup_timeout_s = PATIENT_LOOKUP_TIMEOUT_S
        s = self._settings
        if s.syslog_host and self._syslog is None:
            context = client_context(
                ca_file=s.syslog_ca_file, cert_file=s.syslog_cert_file, key_file=s.syslog_key_file
            )
            self._syslog = SyslogSender(
                s.syslog_host,
                s.syslog_port,
                context,
                queue_size=s.syslog_queue_size,
                connect_timeout_s=s.syslog_timeout_s,
                on_drop=lambda reason: DROPPED.labels(reason).inc(),
            )
            self._syslog.start()

    async def stop(self, timeout_s: float = 2.0) -> None:
        """Write out collected transfers, wait (up to ``timeout_s``) for the broker and
        the repository to take what is queued; safe to call twice."""
        if self._loop is None:
            return
        # Lookups started now get half the time, so their messages can still be sent.
        self._lookup_timeout_s = min(PATIENT_LOOKUP_TIMEOUT_S, timeout_s / 2)
        for key in list(self._batches):
            self._flush(key, self._batches[key])
        # A patient lookup, once done, hands its message to the producer: wait for both.
        deadline = self._loop.time() + timeout_s
        while self._pending and (left := deadline - self._loop.time()) > 0:
            await asyncio.wait(set(self._pending), timeout=left)
        for task in set(self._pending):
            task.cancel()
        if self._syslog is not None:
            await self._syslog.close(timeout_s)
            self._syslog = None
        self._loop = None

    # -- the events ------------------------------------------------------------------

    def application_started(self) -> None:
        """Application Activity / Application Start: the service is running."""
        self._record(self._application(Codes.APPLICATION_START))

    def application_stopped(self) -> None:
        """Application Activity / Application Stop: the service is stopping."""
        self._record(self._application(Codes.APPLICATION_STOP))

    def instance_received(
        self,
        sender: Sender,
        *,
        study: str,
        sop_class: str,
        sop_instance: str,
        receiver_ae: str | None = None,
        patient_id: str | None = None,
    ) -> None:
        """DICOM Instances Transferred (Create): ingest stored an instance it received.

        ``patient_id``: the instance's Patient ID, for the message's patient object only
        (instances of one message with different IDs give one patient object each)."""
        source = ActiveParticipant(
            user_id=sender.calling_ae or sender.identity or sender.peer_address or "unknown",
            user_name=sender.identity if sender.calling_ae else None,
            requestor=True,
            role=Codes.SOURCE,
            address=sender.peer_address,
        )
        receiver = self._me(Codes.DESTINATION, requestor=False, user_id=receiver_ae)
        key = ("received", source, receiver_ae, study)
        self._collect(
            key,
            study,
            sop_class,
            sop_instance,
            lambda instances, patients: self._transfer(
                Action.CREATE, source, receiver, study, instances, patients
            ),
            patient_id=patient_id,
        )

    def instance_sent(
        self,
        destination: str,
        *,
        study: str,
        sop_class: str,
        sop_instance: str,
        address: str | None = None,
        destination_ae: str | None = None,
        calling_ae: str | None = None,
        failure: str | None = None,
        patient: PatientLookup | None = None,
        deidentified: str | None = None,
    ) -> None:
        """DICOM Instances Transferred (Read): the forwarder delivered an instance to a
        destination, or (``failure``: radflow's reason, e.g. ``rejected``) gave up.

        ``patient``: how to find the study's Patient ID; only the first instance's is
        kept and it runs once, when the message is written, never while delivering.
        ``deidentified``: the de-identification profile applied before delivery (the
        study object says ``Anonymized`` true and carries a ``Deidentified`` detail
        with the profile; the UIDs and Patient ID recorded are the original's, which
        the audit trail is there to trace)."""
        receiver = ActiveParticipant(
            user_id=destination_ae or destination,
            user_name=destination if destination_ae else None,
            requestor=False,
            role=Codes.DESTINATION,
            address=address,
        )
        source = self._me(Codes.SOURCE, requestor=True, user_id=calling_ae)
        key = ("sent", destination, study, failure, deidentified)
        self._collect(
            key,
            study,
            sop_class,
            sop_instance,
            lambda instances, patients: self._transfer(
                Action.READ, source, receiver, study, instances, patients, failure, deidentified
            ),
            lookup=patient,
        )

    def report_sent(
        self,
        site: str,
        *,
        report_id: str,
        report_version: int | None,
        study: str,
        address: str | None = None,
        failure: str | None = None,
        patient_id: str | None = None,
    ) -> None:
        """Export: a report left radflow for a site's RIS (acknowledged, or ``failure``).

        ``patient_id``: the identifier the message gave the RIS (PID-3), without its
        assigning authority; the patient object is left out (and counted) without it."""
        details = [] if report_version is None else [("ReportVersion", str(report_version))]
        if not patient_id:
            PATIENT_UNKNOWN.labels("absent").inc()
        objects = [
            ParticipantObject(
                object_id=report_id,
                id_type=Codes.REPORT_NUMBER,
                type_code=ObjectType.SYSTEM_OBJECT,
                role=ObjectRole.REPORT,
                details=[(k, v.encode()) for k, v in details],
            ),
            _study(study, {}),
            *_patients([patient_id] if patient_id else []),
        ]
        self._record(
            AuditRecord(
                event=Codes.EXPORT,
                action=Action.READ,
                outcome=Outcome.MINOR_FAILURE if failure else Outcome.SUCCESS,
                at=datetime.now(UTC),
                description=_short(failure),
                participants=[
                    self._me(Codes.SOURCE, requestor=True),
                    ActiveParticipant(
                        user_id=site, requestor=False, role=Codes.DESTINATION, address=address
                    ),
                ],
                objects=objects,
            ),
            study,
        )

    def authentication_failure(
        self,
        door: Door | str,
        *,
        reason: str,
        peer_address: str | None = None,
        user: str | None = None,
        node: bool = False,
    ) -> None:
        """An authentication failed at a door of this service.

        ``node=False`` (a user or client: a bad, expired or unscoped token, an unknown
        API key) writes User Authentication / Login, minor failure. ``node=True`` (a
        peer node: a refused TLS handshake or client certificate, an AE title or address
        not allowed) writes Security Alert / Node Authentication. ``user`` is who the
        peer claimed to be (AE title, certificate CN, token subject), ``reason`` radflow's
        words for what was wrong (never the peer's own text).
        """
        door_name = door.value if isinstance(door, Door) else door
        description = _short(f"{door_name}: {reason}")
        event, event_type = (
            (Codes.SECURITY_ALERT, Codes.NODE_AUTHENTICATION)
            if node
            else (Codes.USER_AUTHENTICATION, Codes.LOGIN)
        )
        self._record(
            AuditRecord(
                event=event,
                action=Action.EXECUTE,
                outcome=Outcome.MINOR_FAILURE,
                at=datetime.now(UTC),
                event_types=[event_type],
                description=description,
                participants=[
                    ActiveParticipant(
                        user_id=user or peer_address or "unknown",
                        requestor=True,
                        address=peer_address,
                    ),
                    self._me(Codes.APPLICATION, requestor=False),
                ],
            )
        )

    def configuration_change(
        self,
        path: Path | str,
        *,
        accepted: bool,
        digest: str | None = None,
        problem: str | None = None,
        network: bool = False,
    ) -> None:
        """Security Alert / Software (or, ``network``, Network) Configuration: a changed
        configuration file was applied (success) or rejected (minor failure, with the
        problem; the last valid one stays in force)."""
        details = [("sha256", digest.encode("ascii"))] if digest else []
        self._record(
            AuditRecord(
                event=Codes.SECURITY_ALERT,
                action=Action.EXECUTE,
                outcome=Outcome.SUCCESS if accepted else Outcome.MINOR_FAILURE,
                at=datetime.now(UTC),
                event_types=[
                    Codes.NETWORK_CONFIGURATION if network else Codes.SOFTWARE_CONFIGURATION
                ],
                description=_short(problem),
                participants=[self._me(Codes.APPLICATION, requestor=True)],
                objects=[
                    ParticipantObject(
                        object_id=str(path),
                        id_type=Codes.URI,
                        type_code=ObjectType.SYSTEM_OBJECT,
                        role=ObjectRole.MASTER_FILE,
                        details=details,
                    )
                ],
            )
        )

    # -- building --------------------------------------------------------------------

    def _me(self, role: Code, *, requestor: bool, user_id: str | None = None) -> ActiveParticipant:
        return ActiveParticipant(
            user_id=user_id or self._source.source_id,
            alternative_user_id=self._pid,
            requestor=requestor,
            role=role,
            address=self._host,
        )

    def _application(self, event_type: Code) -> AuditRecord:
        return AuditRecord(
            event=Codes.APPLICATION_ACTIVITY,
            action=Action.EXECUTE,
            outcome=Outcome.SUCCESS,
            at=datetime.now(UTC),
            event_types=[event_type],
            participants=[self._me(Codes.APPLICATION, requestor=False)],
        )

    def _transfer(
        self,
        action: Action,
        source: ActiveParticipant,
        destination: ActiveParticipant,
        study: str,
        instances: Mapping[str, Sequence[str]],
        patients: Sequence[str],
        failure: str | None = None,
        deidentified: str | None = None,
    ) -> AuditRecord:
        return AuditRecord(
            event=Codes.INSTANCES_TRANSFERRED,
            action=action,
            outcome=Outcome.MINOR_FAILURE if failure else Outcome.SUCCESS,
            at=datetime.now(UTC),
            description=_short(failure),
            participants=[source, destination],
            objects=[_study(study, instances, deidentified), *_patients(patients)],
        )

    # -- collecting and sending ---------------------------------------------------------

    def _collect(
        self,
        key: Hashable,
        study: str,
        sop_class: str,
        sop_instance: str,
        make: Callable[[Mapping[str, Sequence[str]], Sequence[str]], AuditRecord],
        patient_id: str | None = None,
        lookup: PatientLookup | None = None,
    ) -> None:
        if not self._on_loop(
            self._collect, key, study, sop_class, sop_instance, make, patient_id, lookup
        ):
            return
        batch = self._batches.get(key)
        if batch is None:
            batch = self._batches[key] = _Batch(make, study, lookup=lookup)
            assert self._loop is not None
            self._loop.call_later(self._settings.transfer_window_s, self._flush, key, batch)
        uids = batch.instances.setdefault(sop_class, [])
        if sop_instance not in uids:
            uids.append(sop_instance)
            batch.count += 1
        if patient_id:
            batch.patients[patient_id] = None
        if batch.count >= self._settings.transfer_max_instances:
            self._flush(key, batch)

    def _flush(self, key: Hashable, batch: _Batch) -> None:
        if self._batches.get(key) is not batch:
            return  # already written (full, or at stop)
        del self._batches[key]
        if batch.lookup is None:
            if not batch.patients:
                PATIENT_UNKNOWN.labels("absent").inc()
            self._record(batch.make(batch.instances, list(batch.patients)), batch.study)
            return
        task = asyncio.create_task(self._look_up_and_record(batch, batch.lookup))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _look_up_and_record(self, batch: _Batch, lookup: PatientLookup) -> None:
        found: str | None = None
        try:
            async with asyncio.timeout(self._lookup_timeout_s):
                found = await lookup()
        except Exception as exc:  # noqa: BLE001 - the message goes without the patient
            PATIENT_UNKNOWN.labels("lookup_failed").inc()
            log.warning(
                "patient of an audited transfer not found",
                extra={"study_instance_uid": batch.study, "reason": type(exc).__name__},
            )
        else:
            if found is None:
                PATIENT_UNKNOWN.labels("absent").inc()
        self._record(batch.make(batch.instances, [found] if found else []), batch.study)

    def _record(self, record: AuditRecord, study: str | None = None) -> None:
        if not self._on_loop(self._record, record, study):
            return
        try:
            self._emit(record, study)
        except Exception:
            DROPPED.labels("unwritable").inc()
            log.exception("audit message could not be written")

    def _emit(self, record: AuditRecord, study: str | None) -> None:
        MESSAGES.labels(_label(record.event.meaning), _label(record.outcome.name)).inc()
        xml = record.to_xml(self._source)
        if self._syslog is not None:
            severity = SEVERITY_NOTICE if record.outcome is Outcome.SUCCESS else SEVERITY_WARNING
            self._syslog.offer(
                syslog_message(
                    xml, app_name=self._source.source_id, severity=severity, at=record.at
                )
            )
        if not self._settings.enabled or self._producer is None:
            return
        if len(self._pending) >= self._settings.max_pending:
            DROPPED.labels("backlog").inc()
            return
        payload = AuditRecorded(
            event_id=record.event.code,
            event_type=record.event_types[0].code if record.event_types else None,
            outcome=int(record.outcome),
            study_instance_uid=study,
            message=xml.decode("utf-8"),
        )
        key = (study or self._source.source_id).encode("ascii", "replace")
        task = asyncio.create_task(self._publish(payload, key))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, payload: AuditRecorded, key: bytes) -> None:
        assert self._producer is not None
        try:
            await self._producer.publish(payload, key)
        except BrokerUnavailable:
            DROPPED.labels("broker_unavailable").inc()
        except Exception:
            DROPPED.labels("publish_failed").inc()
            log.exception("audit message not published")

    def _on_loop(self, method: Callable[..., None], *args: object) -> bool:
        """True if the caller is on the auditor's loop; otherwise hand the call over
        (or, not started, drop it)."""
        loop = self._loop
        if loop is None:
            DROPPED.labels("not_started").inc()
            return False
        if threading.get_ident() == self._thread:
            return True
        try:
            loop.call_soon_threadsafe(method, *args)
        except RuntimeError:  # the loop closed meanwhile
            DROPPED.labels("not_started").inc()
        return False


def _study(
    study: str, instances: Mapping[str, Sequence[str]], deidentified: str | None = None
) -> ParticipantObject:
    return ParticipantObject(
        object_id=study,
        id_type=Codes.STUDY_INSTANCE_UID,
        type_code=ObjectType.SYSTEM_OBJECT,
        role=ObjectRole.REPORT,
        sop_classes=instances,
        details=(("Deidentified", deidentified.encode()),) if deidentified else (),
        anonymized=deidentified is not None,
    )


def _patients(patient_ids: Sequence[str]) -> list[ParticipantObject]:
    """The patient objects PS3.15 A.5.3 requires: the ID only, never the name."""
    return [
        ParticipantObject(
            object_id=patient,
            id_type=Codes.PATIENT_NUMBER,
            type_code=ObjectType.PERSON,
            role=ObjectRole.PATIENT,
        )
        for patient in patient_ids
    ]


def _short(text: str | None) -> str | None:
    return text[:DESCRIPTION_LIMIT] if text else None


def _label(text: str) -> str:
    return text.lower().replace(" ", "_")
