"""Delivery verification against real destinations: a DICOMweb destination that
answers 200 and drops an instance is caught by QIDO-RS, and Orthanc's storage
commitment SCP commits to what it holds, reporting on an association of its own."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    _STORAGE_CLASSES,
    StorageCommitmentPushModel,
)

from radflow_core.topics import Topic
from radflow_devstack.kit.rules_file import dimse_destination, write_rules
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess, free_port
from radflow_rules.destinations import DestinationKind, DimsePeer, Verification
from radflow_rules.rules import Destination
from stow_forwarder.client import StowClient
from stow_forwarder.commitment import (
    STORAGE_COMMITMENT_INSTANCE,
    CommitmentBook,
    CommitmentListener,
)
from stow_forwarder.dimse import DimseClient
from stow_forwarder.markers import DELIVERED_MARKER, State, decode, merge
from stow_forwarder.settings import ForwarderSettings
from stow_forwarder.verify import VerificationUnanswered
from support.cli import json_lines, radflow
from support.dicom import make_instance
from support.forward import publish, routed
from support.metrics import metric, metric_sum
from support.orthanc import OrthancView
from support.stack import Stack
from support.swallow import SwallowingProxy

pytestmark = pytest.mark.pipeline

CT = "1.2.840.10008.5.1.4.1.1.2"


class StatusServer:
    """An HTTP server on loopback that answers every request with one status."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path.split("?")[0])
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> StatusServer:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def events(stack: Stack, topic: Topic) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(topic)]


def one_series(tmp_path: Path, count: int) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    return [
        make_instance(
            tmp_path / f"{i:03d}.dcm",
            study_instance_uid=study,
            series_instance_uid=series,
            rows=32,
            columns=32,
        )
        for i in range(count)
    ]


def uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


@pytest.fixture
def swallowing() -> Iterator[Callable[[ManagedProcess], SwallowingProxy]]:
    started: list[SwallowingProxy] = []

    def start(orthanc: ManagedProcess) -> SwallowingProxy:
        proxy = SwallowingProxy(f"http://127.0.0.1:{orthanc.port}").start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


def test_qido_catches_a_destination_that_answers_200_and_drops_an_instance(
    stack: Stack,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    swallowing: Callable[[ManagedProcess], SwallowingProxy],
    tmp_path: Path,
) -> None:
    orthanc_proc = start_orthanc_server()
    orthanc = OrthancView(orthanc_proc)
    proxy = swallowing(orthanc_proc)
    files = one_series(tmp_path, 5)
    lost = uid_of(files[2])
    proxy.swallow = {lost}
    rules = write_rules(
        tmp_path / "rules.yaml",
        {"pacs": f"url: {proxy.url}/dicom-web\nverify: qido"},
        ["pacs"],
    )
    requests = routed(stack, files, "pacs")
    forwarder = start_forwarder(rules_file=str(rules), verify_delay_s="0.5", verify_window_s="4")
    wait_for(
        "4 verified and 1 failed",
        lambda: (
            len(events(stack, Topic.FORWARD_VERIFIED)) == 4
            and len(events(stack, Topic.FORWARD_FAILED)) == 1
        ),
        timeout_s=90,
    )
    # The destination acknowledged all five, each completion announcing the check...
    completions = events(stack, Topic.FORWARD_COMPLETED)
    assert [c["verification"] for c in completions] == ["qido"] * 5
    assert proxy.swallowed == [lost]
    # ...holds four, each verified with the SOP Class it was sent as...
    verified = events(stack, Topic.FORWARD_VERIFIED)
    assert {v["sop_instance_uid"] for v in verified} == {uid_of(f) for f in files} - {lost}
    assert {(v["method"], v["sop_class_uid"]) for v in verified} == {("qido", CT)}
    assert all(v["checks"] >= 1 and v["verified_at"] >= v["delivered_at"] for v in verified)
    # ...and the one it dropped is a failure of its own.
    (failure,) = events(stack, Topic.FORWARD_FAILED)
    assert failure["sop_instance_uid"] == lost
    assert failure["reason"] == "not_held_after_delivery"
    assert failure["retriable"] is False
    assert "QIDO-RS did not list it" in failure["message"]
    assert lost not in orthanc.sop_instance_uids()
    labels = {"destination": "pacs", "reason": "not_held_after_delivery"}
    assert metric(forwarder.url, "radflow_forwarder_failed_total", **labels) == 1
    assert (
        metric(forwarder.url, "radflow_forwarder_verification_failures_total", destination="pacs")
        == 1
    )
    assert (
        metric(forwarder.url, "radflow_forwarder_verified_total", destination="pacs", method="qido")
        == 4
    )

    # The runbook's replay: dicom.forward.completed shows it delivered (it was
    # acknowledged), but before its letter, so that does not settle it; its marker says
    # "sending" again, so the forwarder sends it instead of skipping it as delivered,
    # and the others stay delivered and are not sent again.
    proxy.swallow = set()
    runbook = [
        "dlq",
        "replay",
        "--topic",
        "dicom.forward.failed",
        "--reason",
        "not_held_after_delivery",
        "--destination",
        "pacs",
        "--json",
    ]
    (replayed,) = json_lines(radflow(stack, *runbook))
    assert replayed["outcome"] == "replay", replayed
    wait_for(
        "the replayed instance verified",
        lambda: lost in {v["sop_instance_uid"] for v in events(stack, Topic.FORWARD_VERIFIED)},
        timeout_s=60,
    )
    # Delivered again after its letter: a second replay has nothing to do.
    (skipped,) = json_lines(radflow(stack, *runbook))
    assert skipped["outcome"] == "skip" and "delivered" in skipped["why"], skipped
    assert lost in orthanc.sop_instance_uids()
    assert orthanc.count() == 5
    assert len(events(stack, Topic.FORWARD_FAILED)) == 1
    states: dict[str, State] = {}
    for key in stack.keys(f"{DELIVERED_MARKER}/"):
        answer = stack.minio().get_object(stack.s3.bucket, key)
        try:
            merge(states, decode(answer.read()))
        finally:
            answer.close()
            answer.release_conn()
    assert states == dict.fromkeys((r.idempotency_key for r in requests), State.DELIVERED)


def test_a_destination_without_verify_gets_no_question_and_no_verified_event(
    stack: Stack,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    swallowing: Callable[[ManagedProcess], SwallowingProxy],
    tmp_path: Path,
) -> None:
    orthanc_proc = start_orthanc_server()
    proxy = swallowing(orthanc_proc)
    files = one_series(tmp_path, 2)
    proxy.swallow = {uid_of(files[0])}
    rules = write_rules(tmp_path / "rules.yaml", {"pacs": f"url: {proxy.url}/dicom-web"}, ["pacs"])
    routed(stack, files, "pacs")
    forwarder = start_forwarder(rules_file=str(rules), verify_delay_s="0.5")
    wait_for("2 completed", lambda: len(events(stack, Topic.FORWARD_COMPLETED)) == 2)
    assert metric_sum(forwarder.url, "radflow_forwarder_verification_checks_total") == 0
    assert [c["verification"] for c in events(stack, Topic.FORWARD_COMPLETED)] == [None] * 2
    assert events(stack, Topic.FORWARD_VERIFIED) == []
    assert events(stack, Topic.FORWARD_FAILED) == []


def _orthanc_that_knows_us(
    start_orthanc_server: Callable[..., ManagedProcess], listener_port: int
) -> ManagedProcess:
    """An Orthanc whose DicomModalities has our calling AE title at the listener's
    address: where its storage commitment SCP sends the N-EVENT-REPORT."""
    return start_orthanc_server(
        config={"DicomModalities": {"radflow": ["RADFLOW", "127.0.0.1", listener_port]}}
    )


def test_storage_commitment_against_orthanc_verifies_every_instance(
    stack: Stack,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    listener_port = free_port()
    orthanc_proc = _orthanc_that_knows_us(start_orthanc_server, listener_port)
    files = one_series(tmp_path, 4)
    rules = write_rules(
        tmp_path / "rules.yaml",
        {
            "pacs": dimse_destination(
                orthanc_proc.dicom_port, "ORTHANC", verify="storage-commitment"
            )
        },
        ["pacs"],
    )
    routed(stack, files, "pacs")
    forwarder = start_forwarder(
        rules_file=str(rules),
        commitment_port=str(listener_port),
        commitment_same_association_s="0.5",
    )
    wait_for(
        "4 verified by storage commitment",
        lambda: len(events(stack, Topic.FORWARD_VERIFIED)) == 4,
        timeout_s=90,
    )
    verified = events(stack, Topic.FORWARD_VERIFIED)
    assert {v["sop_instance_uid"] for v in verified} == {uid_of(f) for f in files}
    assert {v["method"] for v in verified} == {"storage-commitment"}
    transactions = {v["transaction_uid"] for v in verified}
    assert len(transactions) == 1 and None not in transactions, "one N-ACTION per batch"
    assert events(stack, Topic.FORWARD_FAILED) == []
    assert (
        metric(
            forwarder.url,
            "radflow_forwarder_verified_total",
            destination="pacs",
            method="storage-commitment",
        )
        == 4
    )


def _dimse_client(orthanc: ManagedProcess, book: CommitmentBook, **settings: float) -> DimseClient:
    destination = Destination(
        "pacs",
        f"dicom://ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        None,
        (),
        50,
        kind=DestinationKind.DIMSE,
        dimse=DimsePeer("127.0.0.1", orthanc.dicom_port, "ORTHANC"),
        verify=Verification.STORAGE_COMMITMENT,
    )
    values = {
        "connect_timeout_s": 5.0,
        "request_timeout_s": 30.0,
        "commitment_same_association_s": 0.2,
        **settings,
    }
    return DimseClient(destination, ForwarderSettings(**values), book)


def test_orthanc_reports_what_it_does_not_hold_in_the_failed_sop_sequence(
    start_orthanc_server: Callable[..., ManagedProcess], tmp_path: Path
) -> None:
    listener_port = free_port()
    orthanc_proc = _orthanc_that_knows_us(start_orthanc_server, listener_port)
    stored = make_instance(tmp_path / "stored.dcm", rows=16, columns=16)
    OrthancView(orthanc_proc).upload(stored.read_bytes())
    never_sent = generate_uid()
    book = CommitmentBook()
    listener = CommitmentListener(book, "127.0.0.1", listener_port, "RADFLOW")
    listener.start()
    try:
        client = _dimse_client(orthanc_proc, book, commitment_timeout_s=60.0)
        report = asyncio.run(client.commit([(uid_of(stored), CT), (never_sent, CT)]))
    finally:
        listener.stop()
    assert report.held == {uid_of(stored): CT}
    assert list(report.failed) == [never_sent]
    assert report.failed[never_sent] == 0x0112  # no such object instance


def test_no_report_in_time_is_unanswered_not_a_loss(
    start_orthanc_server: Callable[..., ManagedProcess], tmp_path: Path
) -> None:
    # Orthanc knows us at a port nobody listens on: it cannot deliver its report.
    orthanc_proc = _orthanc_that_knows_us(start_orthanc_server, free_port())
    stored = make_instance(tmp_path / "stored.dcm", rows=16, columns=16)
    OrthancView(orthanc_proc).upload(stored.read_bytes())
    client = _dimse_client(orthanc_proc, CommitmentBook(), commitment_timeout_s=3.0)
    with pytest.raises(VerificationUnanswered, match="no storage commitment report"):
        asyncio.run(client.commit([(uid_of(stored), CT)]))


class SameAssociationCommitter:
    """A storage commitment SCP (pynetdicom) that sends its N-EVENT-REPORT on the
    N-ACTION's own association, right after answering it: the other way PS3.4 J.3.3
    allows, and the way some PACS report when everything is already stored."""

    def __init__(self, port: int, holds: set[str], lose: set[str] | None = None) -> None:
        self.port = port
        self.holds = holds
        """What it commits to (besides what it stored and did not lose)."""
        self.lose = lose or set()
        """Instances it answers C-STORE success for and then does not keep."""
        self.reports_sent = 0
        self._ae = AE(ae_title="PACS")
        self._ae.add_supported_context(StorageCommitmentPushModel)
        for sop_class in _STORAGE_CLASSES.values():
            self._ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)

    def start(self) -> SameAssociationCommitter:
        self._ae.start_server(
            ("127.0.0.1", self.port),
            block=False,
            evt_handlers=[(evt.EVT_N_ACTION, self._on), (evt.EVT_C_STORE, self._store)],
        )
        return self

    def _store(self, event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid not in self.lose:
            self.holds.add(uid)
        return 0x0000

    def stop(self) -> None:
        self._ae.shutdown()

    def _on(self, event: evt.Event) -> tuple[int, None]:
        request = event.action_information
        report = Dataset()
        report.TransactionUID = request.TransactionUID
        held, failed = [], []
        for item in request.ReferencedSOPSequence:
            out = Dataset()
            out.ReferencedSOPClassUID = item.ReferencedSOPClassUID
            out.ReferencedSOPInstanceUID = item.ReferencedSOPInstanceUID
            if item.ReferencedSOPInstanceUID in self.holds:
                held.append(out)
            else:
                out.FailureReason = 0x0112
                failed.append(out)
        report.ReferencedSOPSequence = held
        if failed:
            report.FailedSOPSequence = failed

        def send() -> None:
            time.sleep(0.2)  # after the N-ACTION response has gone out
            status, _ = event.assoc.send_n_event_report(
                report, 2 if failed else 1, StorageCommitmentPushModel, STORAGE_COMMITMENT_INSTANCE
            )
            if status.get("Status") == 0:
                self.reports_sent += 1

        threading.Thread(target=send, daemon=True).start()
        return 0x0000, None


def test_a_report_on_the_n_action_association_is_taken_there_without_a_listener() -> None:
    held, missing = generate_uid(), generate_uid()
    scp = SameAssociationCommitter(free_port(), holds={held}).start()
    try:
        destination = Destination(
            "pacs",
            f"dicom://PACS@127.0.0.1:{scp.port}",
            None,
            (),
            50,
            kind=DestinationKind.DIMSE,
            dimse=DimsePeer("127.0.0.1", scp.port, "PACS"),
            verify=Verification.STORAGE_COMMITMENT,
        )
        settings = ForwarderSettings(commitment_same_association_s=10.0, commitment_timeout_s=10.0)
        client = DimseClient(destination, settings, CommitmentBook())
        started = time.monotonic()
        report = asyncio.run(client.commit([(held, CT), (missing, CT)]))
        took = time.monotonic() - started
        wait_for("the PACS got our answer to its report", lambda: scp.reports_sent == 1)
    finally:
        scp.stop()
    assert report.held == {held: CT}
    assert report.failed == {missing: 0x0112}
    assert took < 8, "released as soon as the report came"


@pytest.mark.parametrize("status", [503, 404])
def test_a_qido_search_that_gets_no_usable_answer_is_unanswered_not_a_loss(status: int) -> None:
    server = StatusServer(status).start()
    try:
        destination = Destination(
            "pacs", f"{server.url}/dicom-web", None, (), 50, verify=Verification.QIDO
        )
        client = StowClient(destination, ForwarderSettings(connect_timeout_s=2.0))
        with pytest.raises(VerificationUnanswered, match=f"HTTP {status}"):
            asyncio.run(client.instances_held(generate_uid(), generate_uid()))
    finally:
        server.stop()
    assert server.paths and all("/series/" in p and p.endswith("/instances") for p in server.paths)


def test_a_qido_search_of_a_destination_that_is_down_is_unanswered() -> None:
    destination = Destination(
        "pacs", f"http://127.0.0.1:{free_port()}/dicom-web", None, (), 50, verify=Verification.QIDO
    )
    client = StowClient(destination, ForwarderSettings(connect_timeout_s=2.0))
    with pytest.raises(VerificationUnanswered, match="no answer"):
        asyncio.run(client.instances_held(generate_uid(), generate_uid()))


def test_the_forwarder_does_not_start_when_its_commitment_port_is_taken(
    stack: Stack, start_forwarder, tmp_path: Path
) -> None:
    rules = write_rules(
        tmp_path / "rules.yaml",
        {"pacs": dimse_destination(free_port(), "PACS", verify="storage-commitment")},
        ["pacs"],
    )
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        forwarder = start_forwarder(
            rules_file=str(rules), commitment_port=str(port), wait_ready=False, wait_port=False
        )
        forwarder.expected_exit = 3
        assert forwarder.proc.proc is not None
        assert forwarder.proc.proc.wait(timeout=60) == 3
    assert f"RADFLOW_FORWARDER_COMMITMENT_PORT={port}" in forwarder.log()


def test_a_pacs_that_stores_and_then_fails_commitment_is_not_held_and_resent_on_replay(
    stack: Stack, start_forwarder, tmp_path: Path
) -> None:
    files = one_series(tmp_path, 3)
    lost = uid_of(files[1])
    scp = SameAssociationCommitter(free_port(), holds=set(), lose={lost}).start()
    try:
        rules = write_rules(
            tmp_path / "rules.yaml",
            {"pacs": dimse_destination(scp.port, "PACS", verify="storage-commitment")},
            ["pacs"],
        )
        requests = routed(stack, files, "pacs")
        start_forwarder(rules_file=str(rules), commitment_same_association_s="10")
        wait_for(
            "2 verified and 1 failed",
            lambda: (
                len(events(stack, Topic.FORWARD_VERIFIED)) == 2
                and len(events(stack, Topic.FORWARD_FAILED)) == 1
            ),
            timeout_s=90,
        )
        (failure,) = events(stack, Topic.FORWARD_FAILED)
        assert failure["sop_instance_uid"] == lost
        assert failure["reason"] == "not_held_after_delivery"
        assert failure["dicom_status"] == 0x0112
        assert "Failed SOP Sequence" in failure["message"]
        # Replayed once the PACS keeps it: sent again (a DIMSE peer is not asked
        # first), committed, verified.
        scp.lose.clear()
        publish(stack, [r for r in requests if r.sop_instance_uid == lost])
        wait_for(
            "the replayed instance verified",
            lambda: lost in {v["sop_instance_uid"] for v in events(stack, Topic.FORWARD_VERIFIED)},
            timeout_s=60,
        )
        assert lost in scp.holds
    finally:
        scp.stop()


def test_a_forwarder_stopped_while_verifying_leaves_it_to_the_next_which_verifies_without_resending(
    stack: Stack,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    files = one_series(tmp_path, 3)
    rules = write_rules(
        tmp_path / "rules.yaml", {"pacs": f"url: {orthanc.dicomweb}\nverify: qido"}, ["pacs"]
    )
    routed(stack, files, "pacs")
    first = start_forwarder(rules_file=str(rules), verify_delay_s="600")
    wait_for("3 completed", lambda: len(events(stack, Topic.FORWARD_COMPLETED)) == 3)
    assert first.proc.stop() == 0, "a stop does not wait for the verification"
    assert events(stack, Topic.FORWARD_VERIFIED) == []
    start_forwarder(rules_file=str(rules), verify_delay_s="0.5")
    wait_for("3 verified", lambda: len(events(stack, Topic.FORWARD_VERIFIED)) == 3, timeout_s=60)
    completed = events(stack, Topic.FORWARD_COMPLETED)
    assert sorted(c["already_delivered"] for c in completed) == [False] * 3 + [True] * 3
    assert orthanc.count() == 3
    assert events(stack, Topic.FORWARD_FAILED) == []
