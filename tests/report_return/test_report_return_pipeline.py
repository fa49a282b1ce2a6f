"""report-return on the real broker and S3 against a real MLLP peer (hl7apy's server):
reports arrive exactly as written, each answer code ends where it should, an outage
delays but delivers each report once, a correction goes out as C, and bad input is
dead-lettered without anything sent."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from cli.test_dlq_replay_pipeline import radflow
from radflow_core.events import ReportStatus
from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.mllp_peer import MllpPeer, Reply
from radflow_devstack.processes import free_port
from report_return.hl7 import control_id
from support.audit import audit_records, patient_ids
from support.metrics import metric
from support.mllp import field, sections
from support.reports import Publish, document, write_sites
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

NASTY = (
    "Pipes | carets ^ ampersands & tildes ~ backslashes \\ and \\F\\ \\.br\\ literally.\n"
    "  Second line, indented; CR LF next\r\n"
    "Third after a lone CR\rFourth.\n"
    "\n"
    "After an empty line: Zürich ½ résumé ∅ µ"
)


def returned(stack: Stack) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(Topic.REPORT_RETURNED)]


def failed(stack: Stack) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(Topic.REPORT_FAILED)]


def site(port: int, **settings: Any) -> dict[str, Any]:
    return {
        "host": "127.0.0.1",
        "port": port,
        "receiving_application": "RIS",
        "receiving_facility": "NORTH",
        "patient_identifier": {"assigning_authority": "NORTH"},
        "ack_timeout_s": 5,
        "connect_timeout_s": 2,
        **settings,
    }


def start(start_report_return, tmp_path: Path, sites: dict[str, Any], **settings: str):
    path = write_sites(tmp_path / "sites.yaml", sites)
    return start_report_return(
        sites_file=str(path), retry_initial_s="0.1", retry_max_s="0.5", **settings
    )


def test_report_text_with_every_delimiter_and_line_break_arrives_exactly(
    stack: Stack,
    start_report_return,
    mllp_peer: MllpPeer,
    publish_report: Publish,
    tmp_path: Path,
) -> None:
    service: IngestProcess = start(
        start_report_return,
        tmp_path,
        {"north": site(mllp_peer.port), "north-tx": site(mllp_peer.port, text="TX")},
    )
    doc = document(
        sections=[
            {"heading": "Findings | ^ & ~ \\", "text": NASTY},
            {
                "heading": "Technique",
                "code": {"code": "55111-9", "meaning": "Current imaging procedure", "scheme": "LN"},
                "text": "Axial 1 mm & coronal MPR ~ 3 mm",
            },
        ],
        impression="1. Nothing ^ to | report.\n2. Follow-up ~ none.",
        accession_number="ACC|^&~\\1",
    )
    ft = publish_report(doc, site="north")
    tx = publish_report(doc, site="north-tx")
    wait_for("both reports acknowledged", lambda: len(returned(stack)) == 2, timeout_s=60)

    expected = [
        ("^Findings | ^ & ~ \\", NASTY.replace("\r\n", "\n").replace("\r", "\n")),
        ("55111-9^Technique^LN", "Axial 1 mm & coronal MPR ~ 3 mm"),
        ("19005-8^Impression^LN", "1. Nothing ^ to | report.\n2. Follow-up ~ none."),
    ]
    by_id = {m.control_id: m for m in mllp_peer.received}
    assert len(mllp_peer.received) == 2 and all(m.valid for m in mllp_peer.received)
    for event in (ft, tx):
        (answer,) = [r for r in returned(stack) if r["report_id"] == event.report_id]
        message = by_id[answer["message_control_id"]]
        assert answer["message_control_id"] == control_id(
            event.site, f"report\n{event.report_id}\n1"
        )
        assert answer["status"] == "final" and answer["attempts"] == 1
        assert answer["already_returned"] is False
        got = sections(message)
        # python-hl7 leaves the component separators of OBX-3 escaped-free; compare text.
        assert [text for _, text in got] == [text for _, text in expected]
        assert field(message, "OBR", 18) == "ACC|^&~\\1"
        assert field(message, "OBR", 25) == "F"
        assert field(message, "MSH", 18) == "UNICODE UTF-8"
    assert {field(m, "OBX", 2) for m in mllp_peer.received} == {"FT", "TX"}
    pid = mllp_peer.received[0]
    assert field(pid, "PID", 3) == "MRN-4711^^^NORTH^MR"
    assert field(pid, "ORC", 2) == "PL-77" and field(pid, "ORC", 3) == "FI-88"
    assert metric(service.url, "radflow_report_return_sent_total", site="north") == 1
    assert metric(service.url, "radflow_report_return_acks_total", site="north", code="AA") == 1
    assert (
        metric(service.url, "radflow_report_return_ack_latency_seconds_count", site="north-tx") == 1
    )
    log = service.log()
    assert "SENTINEL" not in log and "MRN-4711" not in log and "Pipes" not in log


def test_answers_ar_ae_and_garbage_end_in_report_failed_with_the_ack_s_codes_only(
    stack: Stack,
    start_report_return,
    mllp_peer: MllpPeer,
    publish_report: Publish,
    tmp_path: Path,
) -> None:
    service = start(
        start_report_return,
        tmp_path,
        {"north": site(mllp_peer.port, application_error_retries=1)},
    )
    mllp_peer.script(
        Reply("AR", "Unknown order \\F\\ ACC-1001"),
        Reply("AE", "Database busy"),
        Reply("AA"),
        Reply("AE", "Still busy"),
        Reply("AE", "Busy again"),
        Reply("garbage"),
    )
    rejected = publish_report(document())
    wait_for("the rejection", lambda: len(failed(stack)) == 1, timeout_s=60)
    recovered = publish_report(document())
    wait_for("the AE then AA", lambda: len(returned(stack)) == 1, timeout_s=60)
    exhausted = publish_report(document())
    wait_for("AE twice", lambda: len(failed(stack)) == 2, timeout_s=60)
    garbled = publish_report(document())
    wait_for("the garbage answer", lambda: len(failed(stack)) == 3, timeout_s=60)

    by_report = {f["report_id"]: f for f in failed(stack)}
    ar = by_report[rejected.report_id]
    assert ar["reason"] == "rejected" and ar["ack_code"] == "AR" and ar["retriable"] is False
    ris_error = {"hl7_error_code": None, "severity": "E", "location": None}
    assert ar["ack_errors"] == [ris_error]
    assert "ACC-1001" not in json.dumps(failed(stack)), "the RIS's words stay out of events"
    assert ar["message_control_id"] == mllp_peer.received[0].control_id
    ok = returned(stack)[0]
    assert ok["report_id"] == recovered.report_id and ok["attempts"] == 2
    assert mllp_peer.received[1].control_id == mllp_peer.received[2].control_id
    ae = by_report[exhausted.report_id]
    assert ae["reason"] == "application_error" and ae["ack_code"] == "AE"
    assert ae["attempts"] == 2 and ae["ack_errors"] == [ris_error]
    bad = by_report[garbled.report_id]
    assert bad["reason"] == "invalid_ack" and bad["ack_code"] is None
    assert bad["ack_errors"] == [] and "not an HL7 message" in bad["message"]
    for code, count in (("AA", 1), ("AE", 3), ("AR", 1), ("invalid", 1)):
        assert (
            metric(service.url, "radflow_report_return_acks_total", site="north", code=code)
            == count
        )
    assert metric(service.url, "radflow_report_return_retries_total", site="north") == 2
    # The audit trail: an Export per report sent, a failure for each one not taken.
    exports = wait_for(
        "four exports", lambda: len(e := audit_records(stack, "110106")) == 4 and e, every_s=0.5
    )
    assert sorted(e["outcome"] for e in exports) == [0, 4, 4, 4]
    # PS3.15 A.5.3: each names the patient by the identifier PID-3 gave the RIS.
    assert [patient_ids(e["message"]) for e in exports] == [["MRN-4711"]] * 4
    assert (
        metric(service.url, "radflow_report_return_failed_total", site="north", reason="rejected")
        == 1
    )


def test_a_ris_that_is_down_then_back_gets_each_report_exactly_once(
    stack: Stack, start_report_return, publish_report: Publish, tmp_path: Path
) -> None:
    port = free_port()
    service = start(start_report_return, tmp_path, {"north": site(port)})
    events = [publish_report(document()) for _ in range(5)]
    wait_for(
        "retries while the RIS is down",
        lambda: (
            (metric(service.url, "radflow_report_return_retries_total", site="north") or 0) >= 3
        ),
        timeout_s=60,
    )
    assert returned(stack) == [] and failed(stack) == []
    peer = MllpPeer(port).start()
    try:
        wait_for("5 reports acknowledged", lambda: len(returned(stack)) == 5, timeout_s=60)
        time.sleep(1)
        ids = [m.control_id for m in peer.received]
        assert len(ids) == 5 and len(set(ids)) == 5
        assert sorted(r["report_id"] for r in returned(stack)) == sorted(
            e.report_id for e in events
        )
        assert max(r["attempts"] for r in returned(stack)) > 1
        # A replay of an acknowledged report is recognised and not sent again.
        replayed = events[0]
        publish_report(
            document(),
            report_id=replayed.report_id,
            version=1,
            study=replayed.study_instance_uid,
        )
        wait_for("the replay answered", lambda: len(returned(stack)) == 6, timeout_s=60)
        assert len(peer.received) == 5
        # Events of different studies come back from different partitions: pick by id.
        answers = [r for r in returned(stack) if r["report_id"] == replayed.report_id]
        assert sorted(r["already_returned"] for r in answers) == [False, True]
    finally:
        peer.stop()
    assert failed(stack) == []


def test_a_ris_that_never_answers_is_retried_until_the_budget_runs_out(
    stack: Stack,
    start_report_return,
    mllp_peer: MllpPeer,
    publish_report: Publish,
    tmp_path: Path,
) -> None:
    mllp_peer.default = Reply("silent")
    start(
        start_report_return,
        tmp_path,
        {"north": site(mllp_peer.port, ack_timeout_s=0.5)},
        retry_budget_s="2",
    )
    event = publish_report(document())
    wait_for("retries exhausted", lambda: len(failed(stack)) == 1, timeout_s=60)
    (dead,) = failed(stack)
    assert dead["reason"] == "retries_exhausted" and dead["retriable"] is True
    assert "no acknowledgement" in dead["message"]
    assert dead["report_id"] == event.report_id
    assert len(mllp_peer.received) == dead["attempts"] >= 2
    assert {m.control_id for m in mllp_peer.received} == {dead["message_control_id"]}
    assert returned(stack) == []


def test_a_corrected_report_after_a_final_one_goes_out_with_status_c(
    stack: Stack,
    start_report_return,
    mllp_peer: MllpPeer,
    publish_report: Publish,
    tmp_path: Path,
) -> None:
    start(start_report_return, tmp_path, {"north": site(mllp_peer.port)})
    doc = document(accession_number="ACC-CORR")
    first = publish_report(doc, report_id="REP-1", status=ReportStatus.PRELIMINARY)
    publish_report(doc, report_id="REP-1", version=2, study=first.study_instance_uid)
    publish_report(doc, report_id="REP-1", version=3, study=first.study_instance_uid)
    publish_report(
        doc,
        report_id="REP-1",
        version=4,
        status=ReportStatus.CORRECTED,
        study=first.study_instance_uid,
    )
    wait_for("4 versions acknowledged", lambda: len(returned(stack)) == 4, timeout_s=60)
    assert [field(m, "OBR", 25) for m in mllp_peer.received] == ["P", "F", "C", "C"]
    assert [field(m, "OBX", 11) for m in mllp_peer.received] == ["P", "F", "C", "C"]
    assert [r["status"] for r in returned(stack)] == [
        "preliminary",
        "final",
        "corrected",
        "corrected",
    ]
    assert len({m.control_id for m in mllp_peer.received}) == 4


@pytest.mark.parametrize(
    ("reason", "publish_args"),
    [
        ("missing_accession_number", {"doc": document(accession_number="  ")}),
        ("missing_patient_identifier", {"doc": document(patient={"identifiers": []})}),
        (
            "missing_patient_identifier",
            {
                "doc": document(
                    patient={"identifiers": [{"id": "X1", "assigning_authority": "SOUTH"}]}
                )
            },
        ),
        ("unknown_site", {"doc": document(), "site": "nowhere"}),
        ("empty_report", {"doc": document(sections=[{"text": " \n "}], impression=None)}),
        ("invalid_report", {"doc": document(signed_at="yesterday")}),
        ("unreadable_report", {"doc": b"%PDF-1.4 not json"}),
        ("blob_integrity_error", {"doc": document(), "sha256": "0" * 64}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_bad_input_is_dead_lettered_with_its_reason_and_nothing_is_sent(
    stack: Stack,
    start_report_return,
    mllp_peer: MllpPeer,
    publish_report: Publish,
    tmp_path: Path,
    reason: str,
    publish_args: dict[str, Any],
) -> None:
    service = start(start_report_return, tmp_path, {"north": site(mllp_peer.port)})
    args = dict(publish_args)
    event = publish_report(args.pop("doc"), **args)
    wait_for(f"report.failed ({reason})", lambda: len(failed(stack)) == 1, timeout_s=60)
    (dead,) = failed(stack)
    assert dead["reason"] == reason, dead
    assert dead["report_id"] == event.report_id and dead["retriable"] is False
    assert dead["attempts"] == 0 and dead["message_control_id"] is None
    assert dead["source_topic"] == stack.topic(Topic.REPORTS_FINALIZED)
    assert "SENTINEL" not in dead["message"] and "X1" not in dead["message"]
    time.sleep(0.5)
    assert mllp_peer.received == [] and returned(stack) == []
    assert (
        metric(
            service.url,
            "radflow_report_return_failed_total",
            site=event.site,
            reason=reason,
        )
        == 1
    )


def test_an_invalid_sites_file_stops_the_service_with_its_lines(
    start_report_return, tmp_path: Path
) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text("version: 1\nsites:\n  north:\n    host: ris\n    port: 99999\n    txt: FT\n")
    service = start_report_return(sites_file=str(path), wait_ready=False, wait_port=False)
    service.expected_exit = 3
    assert service.proc.proc is not None
    wait_for("report-return to give up", lambda: service.proc.proc.poll() is not None)
    log = service.log()
    assert f"{path}:5: port must be a whole number from 1 to 65535" in log
    assert f"{path}:6: unknown key 'txt'" in log


def test_sigterm_while_retrying_loses_nothing_and_a_restart_returns_the_report_once(
    stack: Stack, start_report_return, publish_report: Publish, tmp_path: Path
) -> None:
    port = free_port()
    first = start(start_report_return, tmp_path, {"north": site(port)})
    event = publish_report(document())
    wait_for(
        "a retry while the RIS is down",
        lambda: (metric(first.url, "radflow_report_return_retries_total", site="north") or 0) >= 1,
        timeout_s=60,
    )
    started = time.monotonic()
    assert first.proc.stop() == 0
    assert time.monotonic() - started < 10
    assert failed(stack) == [] and returned(stack) == []
    peer = MllpPeer(port).start()
    try:
        start(start_report_return, tmp_path, {"north": site(port)})
        wait_for("the report returned after the restart", lambda: returned(stack), timeout_s=60)
        time.sleep(1)
        assert [m.control_id for m in peer.received] == [returned(stack)[0]["message_control_id"]]
        assert returned(stack)[0]["report_id"] == event.report_id
    finally:
        peer.stop()


def test_reports_out_of_retries_are_returned_once_by_dlq_replay(
    stack: Stack, start_report_return, publish_report: Publish, tmp_path: Path
) -> None:
    port = free_port()
    start(start_report_return, tmp_path, {"north": site(port)}, retry_budget_s="2")
    events = [publish_report(document()) for _ in range(2)]
    wait_for("2 reports out of retries", lambda: len(failed(stack)) == 2, timeout_s=60)
    assert {f["reason"] for f in failed(stack)} == {"retries_exhausted"}
    peer = MllpPeer(port).start()
    try:
        first = radflow(stack, "dlq", "replay", "--topic", "report.failed")
        assert first.returncode == 0, first.stderr
        assert "replayed 2, skipped 0, not replayable 0" in first.stdout
        wait_for("2 reports acknowledged", lambda: len(returned(stack)) == 2, timeout_s=60)
        assert sorted(r["report_id"] for r in returned(stack)) == sorted(
            e.report_id for e in events
        )
        assert len(peer.received) == 2
        second = radflow(stack, "dlq", "replay", "--topic", "report.failed")
        assert second.returncode == 0, second.stderr
        assert "replayed 0, skipped 2, not replayable 0" in second.stdout
        assert second.stdout.count("already returned") == 2
        assert len(stack.events(Topic.REPORTS_FINALIZED)) == 4  # 2 published, 2 replayed
        assert len(peer.received) == 2
    finally:
        peer.stop()
