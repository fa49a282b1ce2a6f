"""The audit trail to an audit record repository: every kind of message, as RFC 5424
syslog over TLS with RFC 5425 framing, received by a real TLS listener (client
certificate required) and validated against the DICOM audit message schema."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lxml import etree

from radflow_core.audit import DROPPED, PATIENT_UNKNOWN, Auditor, Door
from radflow_core.audit_message import (
    Action,
    ActiveParticipant,
    AuditRecord,
    AuditSource,
    Codes,
    Outcome,
)
from radflow_core.errors import ConfigurationError
from radflow_core.events import Protocol, Sender
from radflow_core.settings import AuditSettings
from radflow_core.tls import TlsFilesUnusable
from radflow_devstack.pki import Authority
from radflow_devstack.processes import free_port
from support.audit import patient_ids

SCHEMA = etree.RelaxNG(etree.parse(str(Path(__file__).with_name("dicom-audit-message.rng"))))
HEADER = re.compile(
    rb"^<(?P<pri>\d{1,3})>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<procid>\S+) "
    rb"IHE\+RFC-3881 - \xef\xbb\xbf"
)
STUDY = "1.2.826.0.1.3680043.8.498.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Repository:
    """A syslog-over-TLS receiver that parses octet-counted frames strictly."""

    port: int
    messages: list[bytes] = field(default_factory=list)
    cut_short: list[bytes] = field(default_factory=list)
    """What a connection ended with in the middle of a frame (nothing, if well framed)."""
    received: asyncio.Event = field(default_factory=asyncio.Event)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                length = await reader.readuntil(b" ")
                assert re.fullmatch(rb"[1-9][0-9]*", length[:-1]), length
                self.messages.append(await reader.readexactly(int(length[:-1])))
                self.received.set()
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                self.cut_short.append(exc.partial)
        finally:
            writer.close()

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[bytes]:
        async with asyncio.timeout(timeout_s):
            while len(self.messages) < count:
                self.received.clear()
                await self.received.wait()
        return self.messages


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority(tmp_path / "pki")


@pytest.fixture
async def repository(authority: Authority) -> AsyncIterator[Repository]:
    issued = authority.issue("audit-repository", server=True)
    repo = Repository(free_port())
    context = authority.server_context(issued, require_client_cert=True)
    server = await asyncio.start_server(repo.serve, "127.0.0.1", repo.port, ssl=context)
    yield repo
    server.close()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await server.wait_closed()


def _auditor(tmp_path: Path, **settings: object) -> Auditor:
    return Auditor(
        "audit-test",
        None,  # syslog only
        AuditSettings.model_validate({"enabled": False, "transfer_window_s": 0.05, **settings}),
    )


def _codes(message: etree._Element) -> tuple[str, str | None]:
    event = message.find("EventIdentification")
    assert event is not None
    event_id = event.find("EventID")
    event_type = event.find("EventTypeCode")
    assert event_id is not None
    return event_id.get("csd-code", ""), (
        None if event_type is None else event_type.get("csd-code")
    )


async def test_every_audit_message_reaches_the_repository_framed_and_valid(
    tmp_path: Path, authority: Authority, repository: Repository
) -> None:
    client = authority.issue("radflow-ingest", server=False)
    auditor = _auditor(
        tmp_path,
        syslog_host="127.0.0.1",
        syslog_port=repository.port,
        syslog_ca_file=authority.ca_file,
        syslog_cert_file=client.cert,
        syslog_key_file=client.key,
        enterprise_site_id="HOSPITAL-A",
    )
    sender = Sender(
        protocol=Protocol.DIMSE, calling_ae="CT1", called_ae="RADFLOW", peer_address="10.1.2.3"
    )
    await auditor.start()
    auditor.application_started()
    lookups = []

    async def patient() -> str:
        lookups.append(STUDY)
        return "PID-SENT"

    # Two instances of one study, one sender, one window, with different Patient IDs.
    for n, patient_id in ((1, "PID-A"), (2, "PID-B"), (3, "PID-A")):
        auditor.instance_received(
            sender,
            study=STUDY,
            sop_class=CT,
            sop_instance=f"{STUDY}.{n}",
            receiver_ae="RADFLOW",
            patient_id=patient_id,
        )
    for n in (1, 2):
        auditor.instance_sent(
            "pacs",
            study=STUDY,
            sop_class=CT,
            sop_instance=f"{STUDY}.{n}",
            address="pacs.example",
            patient=patient,
        )
    auditor.report_sent(
        "site-a", report_id="R-17", report_version=2, study=STUDY, patient_id="PID-RIS"
    )
    auditor.authentication_failure(
        Door.STOW_RS, reason="expired token", peer_address="10.9.9.9", user="jwt:iss#u"
    )
    auditor.authentication_failure(
        Door.DIMSE, reason="calling AE not allowed", peer_address="10.9.9.8", user="X", node=True
    )
    auditor.configuration_change(
        tmp_path / "rules.yaml", accepted=False, digest="ab" * 32, problem="line 3: bad"
    )
    auditor.application_stopped()
    await asyncio.sleep(0.2)  # the transfer window closes
    await auditor.stop()

    frames = await repository.wait_for(8)
    assert len(frames) == 8
    assert repository.cut_short == []
    seen = {}
    for frame in frames:
        header = HEADER.match(frame)
        assert header is not None, frame[:120]
        assert header["app"] == b"radflow-audit-test"
        document = etree.fromstring(frame[header.end() :])
        SCHEMA.assertValid(document)
        outcome = document.find("EventIdentification").get("EventOutcomeIndicator")
        # facility authpriv (10): notice for a success, warning for a failure
        assert int(header["pri"]) == (85 if outcome == "0" else 84)
        assert document.find("AuditSourceIdentification").get("AuditEnterpriseSiteID") == (
            "HOSPITAL-A"
        )
        seen.setdefault(_codes(document), []).append(document)

    assert sorted(seen) == sorted(
        [
            ("110100", "110120"),
            ("110100", "110121"),
            ("110104", None),
            ("110106", None),
            ("110114", "110122"),
            ("110113", "110126"),
            ("110113", "110131"),
        ]
    )
    received, sent = sorted(
        seen[("110104", None)], key=lambda d: d.find("EventIdentification").get("EventActionCode")
    )
    assert received.find("EventIdentification").get("EventActionCode") == "C"
    assert sent.find("EventIdentification").get("EventActionCode") == "R"
    # The instances of one study from one sender are one message, listing them all.
    sop = received.find("ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert sop.get("UID") == CT and sop.get("NumberOfInstances") == "3"
    assert [i.get("UID") for i in sop] == [f"{STUDY}.1", f"{STUDY}.2", f"{STUDY}.3"]
    # PS3.15 A.5.3: the patient, one object per distinct Patient ID, the ID only.
    assert patient_ids(received) == ["PID-A", "PID-B"]
    assert patient_ids(sent) == ["PID-SENT"]
    assert lookups == [STUDY], "one lookup per message, not per instance"
    (export,) = seen[("110106", None)]
    assert patient_ids(export) == ["PID-RIS"]
    assert all(d.find(".//ParticipantObjectName") is None for d in frames_as(seen))
    for kind, documents in seen.items():
        if kind[0] not in ("110104", "110106"):
            assert all(patient_ids(d) == [] for d in documents), kind
    roles = {
        p.get("UserID"): p.find("RoleIDCode").get("csd-code")
        for p in received.iter("ActiveParticipant")
    }
    assert roles == {"CT1": "110153", "RADFLOW": "110152"}
    destination = [p for p in sent.iter("ActiveParticipant") if p.get("UserID") == "pacs"]
    assert destination[0].find("RoleIDCode").get("csd-code") == "110152"
    assert destination[0].get("NetworkAccessPointTypeCode") == "1"
    rejected = seen[("110113", "110131")][0].find("EventIdentification")
    assert rejected.get("EventOutcomeIndicator") == "4"
    assert rejected.findtext("EventOutcomeDescription") == "line 3: bad"


def frames_as(seen: dict[tuple[str, str | None], list[etree._Element]]) -> list[etree._Element]:
    return [d for documents in seen.values() for d in documents]


async def test_a_patient_lookup_that_fails_or_hangs_leaves_the_patient_out_and_is_counted(
    tmp_path: Path, authority: Authority, repository: Repository
) -> None:
    """Auditing never fails a delivery: the message is written without the patient."""
    client = authority.issue("radflow-forwarder", server=False)
    auditor = _auditor(
        tmp_path,
        syslog_host="127.0.0.1",
        syslog_port=repository.port,
        syslog_ca_file=authority.ca_file,
        syslog_cert_file=client.cert,
        syslog_key_file=client.key,
    )

    async def unreadable() -> str:
        raise OSError("blob store down")

    async def hanging() -> str:
        await asyncio.sleep(60)
        return "never"

    before = PATIENT_UNKNOWN.labels("lookup_failed")._value.get()
    await auditor.start()
    for destination, lookup in (("pacs", unreadable), ("archive", hanging)):
        auditor.instance_sent(
            destination, study=STUDY, sop_class=CT, sop_instance=f"{STUDY}.1", patient=lookup
        )
    started = time.perf_counter()
    await auditor.stop(timeout_s=1)
    assert time.perf_counter() - started < 1.5, "a hanging lookup does not hold up the stop"
    frames = await repository.wait_for(2)
    for frame in frames:
        document = etree.fromstring(frame[HEADER.match(frame).end() :])
        SCHEMA.assertValid(document)
        assert _codes(document) == ("110104", None)
        assert patient_ids(document) == []
    assert PATIENT_UNKNOWN.labels("lookup_failed")._value.get() - before == 2


async def test_an_unreachable_repository_costs_the_caller_nothing_but_counted_drops(
    tmp_path: Path, authority: Authority
) -> None:
    auditor = _auditor(
        tmp_path,
        syslog_host="127.0.0.1",
        syslog_port=free_port(),  # nothing listens
        syslog_ca_file=authority.ca_file,
        syslog_queue_size=2,
        syslog_timeout_s=0.5,
    )
    before = DROPPED.labels("syslog_queue_full")._value.get()
    await auditor.start()
    started = time.perf_counter()
    for _ in range(10):
        auditor.configuration_change("rules.yaml", accepted=True)
    assert time.perf_counter() - started < 0.1
    assert DROPPED.labels("syslog_queue_full")._value.get() - before >= 7
    await asyncio.wait_for(auditor.stop(timeout_s=0.5), timeout=5)


async def test_audit_calls_from_other_threads_arrive(
    tmp_path: Path, authority: Authority, repository: Repository
) -> None:
    """pynetdicom calls from its association threads; the call is handed to the loop."""
    issued = authority.issue("client", server=False)
    auditor = _auditor(
        tmp_path,
        syslog_host="127.0.0.1",
        syslog_port=repository.port,
        syslog_ca_file=authority.ca_file,
        syslog_cert_file=issued.cert,
        syslog_key_file=issued.key,
    )
    await auditor.start()
    await asyncio.to_thread(
        auditor.authentication_failure, Door.DICOM_TLS, reason="no client certificate", node=True
    )
    frames = await repository.wait_for(1)
    await auditor.stop()
    assert b"110126" in frames[0]


async def test_an_unusable_client_certificate_stops_the_auditor_at_start(
    tmp_path: Path, authority: Authority
) -> None:
    """The shell turns this into a service that cannot run (exit 3), not a silent gap."""
    missing = tmp_path / "missing"
    auditor = _auditor(
        tmp_path,
        syslog_host="127.0.0.1",
        syslog_ca_file=authority.ca_file,
        syslog_cert_file=missing.with_suffix(".crt"),
        syslog_key_file=missing.with_suffix(".key"),
    )
    with pytest.raises(TlsFilesUnusable):
        await auditor.start()


def test_a_client_certificate_without_its_key_is_refused_by_name() -> None:
    with pytest.raises(ConfigurationError, match="RADFLOW_AUDIT_SYSLOG_KEY_FILE"):
        AuditSettings.from_env({"RADFLOW_AUDIT_SYSLOG_CERT_FILE": "/tls/audit.crt"})


def test_a_claimed_name_with_control_characters_still_gives_a_valid_message() -> None:
    record = AuditRecord(
        event=Codes.USER_AUTHENTICATION,
        action=Action.EXECUTE,
        outcome=Outcome.MINOR_FAILURE,
        at=datetime.now(UTC),
        participants=[ActiveParticipant(user_id="jwt:evil\x00\x1b#<sub>", requestor=True)],
    )
    document = etree.fromstring(record.to_xml(AuditSource("radflow-test")))
    SCHEMA.assertValid(document)
    assert document.find("ActiveParticipant").get("UserID") == "jwt:evil\ufffd\ufffd#<sub>"
