"""The claim check under failure: S3 or the broker taken away while senders send,
the broker missing at start-up, and SIGTERM in the middle of an association."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE

from radflow_core.dicom_status import StoreStatus
from radflow_core.scu import keep_responses
from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.parts import prepare, start_broker
from radflow_devstack.processes import ManagedProcess, free_port
from support.dicom import make_instance, pynetdicom_store
from support.proxy import FaultProxy
from support.stack import IngestProcess, Stack, make_stack
from support.stow import stow
from support.strict_s3 import StrictS3

pytestmark = pytest.mark.pipeline


def _send_through_outage(
    port: int, files: list[Path], proxy: FaultProxy, cut_at: int, restore_at: int
) -> dict[Path, int]:
    """Send ``files`` on one association; cut the proxy before file ``cut_at`` and
    restore it before file ``restore_at``. Returns each file's C-STORE status."""
    ae = AE(ae_title="OUTAGE")
    sop_class = pydicom.dcmread(files[0]).SOPClassUID
    ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1"])
    ae.dimse_timeout = 120
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="RADFLOW"))
    assert assoc.is_established
    statuses: dict[Path, int] = {}
    try:
        for i, path in enumerate(files):
            if i == cut_at:
                proxy.cut()
            if i == restore_at:
                proxy.restore()
            rsp = assoc.send_c_store(pydicom.dcmread(path))
            statuses[path] = int(rsp.Status)
    finally:
        proxy.restore()
        assoc.release()
    return statuses


def _assert_claim_check(stack: Stack, statuses: dict[Path, int]) -> None:
    """Every success is in S3 and announced; every other answer is a retryable A7xx;
    every announced event points at a stored blob with the announced sha256."""
    events = stack.events()
    by_sha = {e["data"]["blob"]["sha256"]: e for e in events}
    for event in events:
        stack.assert_event_matches_blob(event)
    for path, status in statuses.items():
        if status == StoreStatus.SUCCESS:
            uid = pydicom.dcmread(path).SOPInstanceUID
            matching = [e for e in by_sha.values() if e["data"]["sop_instance_uid"] == uid]
            assert len(matching) == 1, f"{path.name} acknowledged but announced {len(matching)}x"
        else:
            assert 0xA700 <= status <= 0xA7FF, f"{path.name}: {status:#06x}"


def test_s3_outage_while_sending_acknowledges_only_what_is_stored_and_announced(
    broker: ManagedProcess, s3_server: ManagedProcess, tmp_path: Path, start_ingest
) -> None:
    assert broker.port and s3_server.port
    stack = make_stack(broker.port, s3_server.port, tmp_path)
    prepare(stack.kafka, stack.s3, [stack.topic(t) for t in Topic])
    proxy = FaultProxy(s3_server.port)
    try:
        ingest: IngestProcess = start_ingest(
            stack,
            env={
                "RADFLOW_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}",
                "RADFLOW_S3_RETRIES": "0",
            },
        )
        files = [make_instance(tmp_path / f"{i}.dcm") for i in range(40)]
        statuses = _send_through_outage(ingest.dimse_port, files, proxy, cut_at=10, restore_at=20)
    finally:
        proxy.close()
    failed = [p for p, s in statuses.items() if s != StoreStatus.SUCCESS]
    assert failed, "the outage caused no failure: the test did not test anything"
    assert statuses[files[-1]] == StoreStatus.SUCCESS, "ingest did not recover after S3 returned"
    _assert_claim_check(stack, statuses)
    assert stack.keys("original/"), "nothing stored"


def test_a_claim_check_past_the_store_timeout_is_answered_a700_and_the_association_goes_on(
    broker: ManagedProcess, s3_server: ManagedProcess, tmp_path: Path, start_ingest
) -> None:
    """An S3 server that takes a PUT and never answers: the sender hears 0xA700 once
    the store timeout is up (not its own DIMSE timeout, which would cut the
    association), and the next instance on the same association is stored."""
    assert broker.port and s3_server.port
    stack = make_stack(broker.port, s3_server.port, tmp_path)
    prepare(stack.kafka, stack.s3, [stack.topic(t) for t in Topic])
    proxy = FaultProxy(s3_server.port)
    files = [make_instance(tmp_path / f"{i}.dcm") for i in range(3)]
    ae = AE(ae_title="PATIENT")
    ae.add_requested_context(pydicom.dcmread(files[0]).SOPClassUID, ["1.2.840.10008.1.2.1"])
    ae.dimse_timeout = 30  # pynetdicom's default: what the store timeout is set under
    try:
        ingest: IngestProcess = start_ingest(
            stack,
            env={
                "RADFLOW_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}",
                "RADFLOW_S3_RETRIES": "0",
                "RADFLOW_S3_READ_TIMEOUT_S": "60",
            },
            store_timeout_s="3",
        )
        assoc = keep_responses(ae.associate("127.0.0.1", ingest.dimse_port, ae_title="RADFLOW"))
        assert assoc.is_established
        try:
            statuses = [int(assoc.send_c_store(pydicom.dcmread(files[0])).Status)]
            proxy.cut()  # the pooled connection goes; new ones are taken and never answered
            proxy.restore()
            proxy.stall()
            started = time.monotonic()
            rsp = assoc.send_c_store(pydicom.dcmread(files[1]))
            waited = time.monotonic() - started
            assert "Status" in rsp, "no answer: the sender's DIMSE timeout came first"
            statuses.append(int(rsp.Status))
            assert rsp.ErrorComment == "storage timed out; retry"
            proxy.restore()
            assert assoc.is_established
            statuses.append(int(assoc.send_c_store(pydicom.dcmread(files[2])).Status))
        finally:
            if assoc.is_established:
                assoc.release()
    finally:
        proxy.close()
    assert proxy.stalled >= 1, "no PUT was held: the test did not test anything"
    assert statuses == [StoreStatus.SUCCESS, StoreStatus.OUT_OF_RESOURCES, StoreStatus.SUCCESS]
    assert 3 <= waited < 20, f"answered after {waited:.1f} s"
    _assert_claim_check(stack, dict(zip(files, statuses, strict=True)))


def test_broker_outage_while_sending_acknowledges_only_what_is_announced(
    s3_server: ManagedProcess, tmp_path: Path, start_ingest
) -> None:
    assert s3_server.port
    proxy_port = free_port()
    tansu = start_broker(free_port(), tmp_path, advertised_port=proxy_port)
    assert tansu.port
    proxy = FaultProxy(tansu.port, listen_port=proxy_port)
    try:
        stack = make_stack(proxy_port, s3_server.port, tmp_path)
        prepare(stack.kafka, stack.s3, [stack.topic(t) for t in Topic])
        ingest: IngestProcess = start_ingest(stack, env={"RADFLOW_KAFKA_ACK_TIMEOUT_S": "1"})
        files = [make_instance(tmp_path / f"{i}.dcm") for i in range(40)]
        statuses = _send_through_outage(ingest.dimse_port, files, proxy, cut_at=10, restore_at=16)
        failed = [p for p, s in statuses.items() if s != StoreStatus.SUCCESS]
        assert failed, "the outage caused no failure: the test did not test anything"
        assert statuses[files[-1]] == StoreStatus.SUCCESS, "ingest did not recover"
        _assert_claim_check(stack, statuses)
    finally:
        proxy.close()
        tansu.stop()


def test_missing_broker_at_start_makes_ingest_unready_and_refuse_with_retryable_status(
    s3_server: ManagedProcess, tmp_path: Path, start_ingest
) -> None:
    assert s3_server.port
    stack = make_stack(free_port(), s3_server.port, tmp_path)  # nothing listens there
    stack.make_bucket()
    ingest: IngestProcess = start_ingest(stack, wait_ready=False)
    assert httpx.get(f"{ingest.url}/healthz").status_code == 200
    ready = httpx.get(f"{ingest.url}/readyz")
    assert ready.status_code == 503
    assert ready.json()["checks"]["broker"].startswith("broker_unavailable")
    path = make_instance(tmp_path / "a.dcm")
    assert pynetdicom_store(ingest.dimse_port, path).status == StoreStatus.OUT_OF_RESOURCES
    response = stow(ingest.stow_url, [path.read_bytes()])
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0


@pytest.mark.parametrize(
    ("fault", "code"), [("wrong_secret", "AccessDenied"), ("missing_bucket", "NoSuchBucket")]
)
def test_misconfigured_s3_makes_ingest_unready_naming_it_and_refuse_with_retryable_status(
    stack: Stack, strict_s3: StrictS3, tmp_path: Path, start_ingest, fault: str, code: str
) -> None:
    bucket = stack.s3.bucket
    if fault == "wrong_secret":
        strict_s3.make_bucket(bucket)
        s3_env = strict_s3.env(bucket, secret_key="not-the-secret")
    else:
        s3_env = strict_s3.env(bucket)
    ingest: IngestProcess = start_ingest(stack, env=s3_env, wait_ready=False)
    ready = httpx.get(f"{ingest.url}/readyz")
    assert ready.status_code == 503
    check = ready.json()["checks"]["blob_store"]
    assert check.startswith("blob_store_misconfigured") and code in check, check
    path = make_instance(tmp_path / "a.dcm")
    assert pynetdicom_store(ingest.dimse_port, path).status == StoreStatus.OUT_OF_RESOURCES
    response = stow(ingest.stow_url, [path.read_bytes()])
    assert response.status_code == 503
    assert stack.events() == []
    assert "blob_store_misconfigured" in ingest.log()
    assert "not-the-secret" not in ingest.log()


def test_sigterm_lets_an_open_association_finish_and_loses_nothing(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    files = [make_instance(tmp_path / f"{i}.dcm", rows=256, columns=256) for i in range(30)]
    sender = subprocess.Popen(
        ["storescu", "-aec", "RADFLOW", "127.0.0.1", str(ingest.dimse_port), *map(str, files)],
        stderr=subprocess.PIPE,
        text=True,
        env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    wait_for("the first instances to be stored", lambda: '"instance stored"' in ingest.log())
    ingest.proc.signal(15)
    _, stderr = sender.communicate(timeout=60)
    assert ingest.proc.proc is not None
    assert ingest.proc.proc.wait(timeout=60) == 0
    assert sender.returncode == 0, stderr
    events = stack.events()
    assert len(events) == len(files)
    for event in events:
        stack.assert_event_matches_blob(event)


def test_idempotent_producer_refused_by_tansu_stops_ingest_with_a_clear_reason(
    stack: Stack, start_ingest
) -> None:
    ingest: IngestProcess = start_ingest(
        stack, env={"RADFLOW_KAFKA_IDEMPOTENCE": "true"}, wait_ready=False
    )
    ingest.expected_exit = 3
    assert ingest.proc.proc is not None
    assert ingest.proc.proc.wait(timeout=60) == 3
    assert "RADFLOW_KAFKA_IDEMPOTENCE=false" in ingest.log()
