"""The worklist against real peers: HL7 orders from python-hl7's MLLP client, queries
from DCMTK's findscu and pynetdicom, the real broker and S3 server."""

from __future__ import annotations

import hashlib
import socket
import ssl
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from radflow_core.tls import client_context
from radflow_core.topics import Topic
from radflow_devstack.parts import prepare, start_broker
from radflow_devstack.pki import development_pki
from radflow_devstack.processes import free_port
from support.stack import IngestProcess, Stack, make_stack
from support.worklist import SITES, Order, ack_code, ack_text, findscu, query, send

pytestmark = pytest.mark.pipeline


def start(start_worklist, tmp_path: Path, **settings: str) -> tuple[IngestProcess, int, int]:  # type: ignore[no-untyped-def]
    sites = tmp_path / "sites.yaml"
    if not sites.exists():
        sites.write_text(SITES)
    mllp, dimse = (
        settings.pop("mllp_port", str(free_port())),
        settings.pop("dimse_port", str(free_port())),
    )
    proc = start_worklist(sites_file=str(sites), mllp_port=mllp, dimse_port=dimse, **settings)
    return proc, int(mllp), int(dimse)


def accessions(found: list[Dataset]) -> list[str]:
    return sorted(str(ds.AccessionNumber) for ds in found)


def test_an_order_is_acknowledged_aa_and_its_step_is_on_the_topic_without_phi(
    start_worklist, stack: Stack, tmp_path: Path
) -> None:
    proc, mllp, dimse = start(start_worklist, tmp_path)
    ack = send(mllp, Order("ACC100", patient_name="Müller^Jörg").er7())
    assert ack_code(ack) == "AA"
    assert str(ack.segment("MSA")[2]) == "MSG0001"
    events = stack.events(Topic.WORKLIST_ITEMS)
    assert len(events) == 1
    data = events[0]["data"]
    assert data["site"] == "hospital-a" and data["step_id"] == "SPS1"
    assert data["modality"] == "CT" and data["scheduled_station_ae"] == "CT_A"
    raw = str(events[0])
    for phi in ("ACC100", "MRN123", "Müller", "19700101"):
        assert phi not in raw
    ref = data["document"]
    document = stack.object_bytes(ref["key"])
    assert hashlib.sha256(document).hexdigest() == ref["sha256"] and len(document) == ref["size"]
    assert b"ACC100" in document  # the claim check: the order itself is in the blob store
    (found,) = query(dimse, "CT_A", accession="ACC100")
    assert str(found.PatientName) == "Müller^Jörg"
    assert found.SpecificCharacterSet == "ISO_IR 192"
    refused = send(mllp, Order("ACC101", patient_name="Müller^Jörg", start="bad").er7())
    assert ack_code(refused) == "AE"
    log = proc.log()
    assert "order accepted" in log and "order refused" in log
    for phi in ("ACC10", "MRN123", "Müller", "19700101"):
        assert phi not in log


def test_invalid_orders_get_ae_or_ar_with_the_reason(
    start_worklist, stack: Stack, tmp_path: Path
) -> None:
    _, mllp, _ = start(start_worklist, tmp_path)
    unknown_site = send(mllp, Order("ACC1", facility="NOWHERE").er7())
    assert ack_code(unknown_site) == "AR"
    assert "sites file" in ack_text(unknown_site)
    no_accession = send(mllp, Order("").er7())
    assert ack_code(no_accession) == "AE"
    assert "accession number missing" in ack_text(no_accession)
    assert str(no_accession.segment("ERR")[3]).startswith("101")
    wrong_type = send(mllp, Order("ACC2", message_type="ADT^A01").er7())
    assert ack_code(wrong_type) == "AR"
    assert str(wrong_type.segment("ERR")[3]).startswith("200")
    no_start = send(mllp, Order("ACC3", start="").er7())
    assert ack_code(no_start) == "AE"
    assert "scheduled start" in ack_text(no_start)
    assert stack.events(Topic.WORKLIST_ITEMS) == []


def test_findscu_and_pynetdicom_match_wildcards_dates_station_and_modality(
    start_worklist, stack: Stack, tmp_path: Path
) -> None:
    _, mllp, dimse = start(start_worklist, tmp_path)
    orders = [
        Order("ACC1", patient_name="Smith^Anna", start="202612011000", modality="CT"),
        Order(
            "ACC2",
            patient_name="Smythe^Bob",
            start="202612021400",
            modality="MR",
            station_ae="MR_A",
            step_id="SPS2",
        ),
        Order("ACC3", patient_name="Jones^Carl", patient_id="MRN999", start="202612051000"),
    ]
    for order in orders:
        assert ack_code(send(mllp, order.er7())) == "AA"
    assert accessions(query(dimse, "CT_A", patient_name="Sm*")) == ["ACC1", "ACC2"]
    assert accessions(query(dimse, "CT_A", patient_name="sm?th^*")) == ["ACC1"]
    assert accessions(query(dimse, "CT_A", start_date="20261201-20261202")) == ["ACC1", "ACC2"]
    assert accessions(query(dimse, "CT_A", start_date="20261203-")) == ["ACC3"]
    assert accessions(query(dimse, "CT_A", station_ae="MR_A")) == ["ACC2"]
    assert accessions(query(dimse, "CT_A", modality="CT")) == ["ACC1", "ACC3"]
    assert accessions(query(dimse, "CT_A", patient_id="MRN9*")) == ["ACC3"]
    assert accessions(query(dimse, "CT_A", requested_procedure_id="RPACC2")) == ["ACC2"]
    found = findscu(
        dimse,
        "CT_A",
        [
            "PatientName=S*",
            "AccessionNumber",
            "PatientBirthDate",
            "ReferringPhysicianName",
            "RequestedProcedureDescription",
            "ScheduledProcedureStepSequence[0].Modality=CT",
            "ScheduledProcedureStepSequence[0].ScheduledProcedureStepStartDate=20261201-20261201",
            "ScheduledProcedureStepSequence[0].ScheduledStationAETitle",
            "ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName",
        ],
        tmp_path / "findscu",
    )
    (answer,) = found
    assert answer.AccessionNumber == "ACC1"
    assert answer.PatientBirthDate == "19700101"
    assert str(answer.ReferringPhysicianName) == "Welby^Marcus"
    assert answer.RequestedProcedureDescription == "CT head without contrast"
    sps = answer.ScheduledProcedureStepSequence[0]
    assert sps.ScheduledStationAETitle == "CT_A"
    assert sps.ScheduledPerformingPhysicianName == ""  # asked, not known: returned empty
    assert "PatientID" not in answer  # not asked: not returned


def test_a_cancelled_completed_or_changed_order_leaves_the_worklist(
    start_worklist, stack: Stack, tmp_path: Path
) -> None:
    _, mllp, dimse = start(start_worklist, tmp_path)
    for accession in ("ACC1", "ACC2", "ACC3"):
        assert ack_code(send(mllp, Order(accession).er7())) == "AA"
    assert accessions(query(dimse, "CT_A")) == ["ACC1", "ACC2", "ACC3"]
    assert ack_code(send(mllp, Order("ACC1", control="CA").er7())) == "AA"
    assert ack_code(send(mllp, Order("ACC2", control="SC", status="CM").er7())) == "AA"
    assert accessions(query(dimse, "CT_A")) == ["ACC3"]
    records = stack.events(Topic.WORKLIST_ITEMS)
    assert len([r for r in records if r is not None]) == 3
    assert records.count(None) == 2  # the cancel and the completion: tombstones
    two = Order("ACC4", step_id="S2", control_id="M4b")
    assert ack_code(send(mllp, Order("ACC4", step_id="S1", control_id="M4a").er7())) == "AA"
    assert ack_code(send(mllp, two.er7())) == "AA"
    assert accessions(query(dimse, "CT_A")) == ["ACC3", "ACC4", "ACC4"]
    changed = Order("ACC4", control="XO", step_id="S2", modality="MR", control_id="M4c")
    assert ack_code(send(mllp, changed.er7())) == "AA"  # the change names S2 only
    (kept,) = query(dimse, "CT_A", accession="ACC4")
    assert kept.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "S2"
    assert kept.ScheduledProcedureStepSequence[0].Modality == "MR"
    assert ack_code(send(mllp, Order("ACC4", control="CA", step_id="").er7())) == "AA"
    assert ack_code(send(mllp, Order("ACC3", control="SC", status="IP").er7())) == "AA"
    (started,) = query(dimse, "CT_A")
    assert started.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID == "SPS1"


def test_a_restart_keeps_every_open_item(start_worklist, stack: Stack, tmp_path: Path) -> None:
    first, mllp, dimse = start(start_worklist, tmp_path)
    for n in range(12):
        order = Order(f"ACC{n}", control_id=f"M{n}", step_id=f"S{n}")
        assert ack_code(send(mllp, order.er7())) == "AA"
    assert ack_code(send(mllp, Order("ACC0", control="CA", step_id="S0").er7())) == "AA"
    first.proc.terminate()
    assert first.proc.stop() == 0
    start(start_worklist, tmp_path, mllp_port=str(mllp), dimse_port=str(dimse))
    assert accessions(query(dimse, "CT_A")) == sorted(f"ACC{n}" for n in range(1, 12))


def test_sites_are_separated_by_calling_ae_unless_federated(
    start_worklist, stack: Stack, tmp_path: Path
) -> None:
    _, mllp, dimse = start(start_worklist, tmp_path)
    assert ack_code(send(mllp, Order("A1").er7())) == "AA"
    latin = Order(
        "B1",
        facility="HOSP_B",
        application="RIS_B",
        patient_name="Ñúñez^José",
        station_ae="CT_B",
        charset="8859/1",
    )
    assert ack_code(send(mllp, latin.er7(), encoding="latin-1")) == "AA"
    assert accessions(query(dimse, "CT_A")) == ["A1"]
    (b,) = query(dimse, "CT_B")
    assert b.AccessionNumber == "B1"
    assert b.SpecificCharacterSet == "ISO_IR 100"
    assert str(b.PatientName) == "Ñúñez^José"
    assert accessions(query(dimse, "READ_ALL")) == ["A1", "B1"]
    with pytest.raises(ConnectionRefusedError):
        query(dimse, "STRANGER")


def test_no_aa_while_the_broker_cannot_take_the_order(
    start_worklist, stack: Stack, tmp_path: Path, s3_server
) -> None:
    """A broker that is down: the order is answered AE (send again), never AA."""
    broker = start_broker(free_port(), tmp_path)
    try:
        assert broker.port and s3_server.port
        own = make_stack(broker.port, s3_server.port, tmp_path)
        prepare(own.kafka, own.s3, [own.topic(t) for t in Topic])
        # Waits for the broker's ack 2 s (not the test stack's 5): the AE comes sooner.
        quick = {"RADFLOW_KAFKA_ACK_TIMEOUT_S": "2"}
        _, mllp, dimse = start(lambda **kw: start_worklist(stack_=own, env=quick, **kw), tmp_path)
        assert ack_code(send(mllp, Order("ACC1").er7())) == "AA"
        broker.kill()
        started = time.monotonic()
        down = send(mllp, Order("ACC2", control_id="M2").er7())
        assert ack_code(down) == "AE"
        assert "send again" in ack_text(down)
        assert str(down.segment("ERR")[3]).startswith("207")
        assert time.monotonic() - started < 15
        assert accessions(query(dimse, "CT_A")) == ["ACC1"]
    finally:
        broker.kill()


def test_orders_over_tls_need_a_client_certificate_of_the_ca(
    start_worklist, stack: Stack, tmp_path: Path
) -> None:
    pki = development_pki(tmp_path / "tls")
    _, mllp, dimse = start(
        start_worklist,
        tmp_path,
        mllp_tls_cert_file=str(pki.server.cert),
        mllp_tls_key_file=str(pki.server.key),
        mllp_tls_client_ca_file=str(pki.ca_file),
    )
    context = client_context(
        ca_file=pki.ca_file, cert_file=pki.client.cert, key_file=pki.client.key
    )
    answer = _tls_exchange(mllp, Order("TLS1").er7().encode(), context)
    assert b"MSA|AA|MSG0001" in answer
    assert accessions(query(dimse, "CT_A")) == ["TLS1"]
    anonymous = client_context(ca_file=pki.ca_file)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _tls_exchange(mllp, Order("TLS2").er7().encode(), anonymous)
    assert accessions(query(dimse, "CT_A")) == ["TLS1"]


def _tls_exchange(port: int, message: bytes, context: ssl.SSLContext) -> bytes:
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as sock,
    ):
        sock.sendall(b"\x0b" + message + b"\x1c\x0d")
        answer = b""
        while not answer.endswith(b"\x1c\x0d"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before an answer")
            answer += chunk
        return answer
