"""RADFLOW_INGEST_WORKERS: several ingest processes sharing the public ports, under one
supervising parent, against the real broker and S3 server."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE

from ingest.settings import IngestSettings
from radflow_core.dicom_status import StoreStatus
from radflow_core.errors import ConfigurationError
from radflow_core.scu import keep_responses
from radflow_core.tls import client_context
from radflow_devstack.kit.dcmtk import storescu
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.pki import Authority
from radflow_devstack.processes import free_port
from support.dicom import make_instance
from support.metrics import metric_sum
from support.stack import IngestProcess, Stack
from support.stow import AUTH_HEADERS, multipart, stow

pytestmark = pytest.mark.pipeline

ASSOCIATIONS = 16
"""Concurrent associations sent at once. The kernel picks a worker by a hash of each
connection's addresses and ports: all 16 on one of two workers has odds of 2**-15."""
PER_ASSOCIATION = 2
STOW_REQUESTS = 6
TLS_ASSOCIATIONS = 12


def _send(port: int, files: list[Path], calling_ae: str) -> list[int]:
    """One association carrying ``files``; their C-STORE statuses."""
    ae = AE(ae_title=calling_ae)
    datasets = [pydicom.dcmread(f) for f in files]
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title="RADFLOW"))
    assert assoc.is_established, "association not established"
    try:
        statuses = []
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if rsp is not None and "Status" in rsp else -1)
    finally:
        assoc.release()
    return statuses


def _send_concurrently(port: int, folder: Path, tag: str) -> set[str]:
    """ASSOCIATIONS associations at once; every instance must be answered success.
    Returns the SOP Instance UIDs sent."""
    batches = [
        [make_instance(folder / f"{tag}-{a}-{i}.dcm") for i in range(PER_ASSOCIATION)]
        for a in range(ASSOCIATIONS)
    ]
    with ThreadPoolExecutor(ASSOCIATIONS) as pool:
        # One calling AE per association: max_associations_per_sender is not the subject.
        results = list(pool.map(lambda a: _send(port, batches[a], f"SCU{a}"), range(ASSOCIATIONS)))
    assert all(s == StoreStatus.SUCCESS for r in results for s in r), results
    return {str(pydicom.dcmread(f).SOPInstanceUID) for batch in batches for f in batch}


def _workers(ingest: IngestProcess) -> dict[str, dict]:
    """The parent's /readyz view of its workers (pid, ready, restarts)."""
    return httpx.get(f"{ingest.url}/readyz", timeout=15).json()["workers"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_workers_share_the_dimse_port_and_store_every_concurrent_association(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest(workers="2")
    workers = _workers(ingest)
    assert sorted(workers) == ["0", "1"]
    assert all(w["ready"] for w in workers.values())
    assert len({w["pid"] for w in workers.values()}) == 2

    sent = _send_concurrently(ingest.dimse_port, tmp_path, "a")
    # STOW-RS's port is shared too: requests on new connections, all stored.
    posted = [make_instance(tmp_path / f"stow-{i}.dcm") for i in range(STOW_REQUESTS)]
    with ThreadPoolExecutor(STOW_REQUESTS) as pool:
        answers = list(pool.map(lambda f: stow(ingest.stow_url, [f.read_bytes()]), posted))
    assert [a.status_code for a in answers] == [200] * STOW_REQUESTS
    sent |= {str(pydicom.dcmread(f).SOPInstanceUID) for f in posted}

    events = stack.events()
    announced = [e["data"]["sop_instance_uid"] for e in events]
    assert sorted(announced) == sorted(sent), "each instance announced exactly once"
    for event in events:
        stack.assert_event_matches_blob(event)
    # One /metrics for the pod: the workers' counters summed, and both workers served.
    stored = metric_sum(ingest.url, "radflow_ingest_instances_total", outcome="stored")
    assert stored == len(sent)
    assert metric_sum(ingest.url, "radflow_ingest_stow_requests_total") == STOW_REQUESTS
    served = {
        worker: metric_sum(ingest.url, "radflow_ingest_worker_connections_total", worker=worker)
        for worker in ("0", "1")
    }
    assert sum(served.values()) == ASSOCIATIONS
    assert all(count > 0 for count in served.values()), served
    # The workers' log lines say which worker wrote them.
    assert '"worker":0' in ingest.log() and '"worker":1' in ingest.log()


def test_a_killed_worker_is_restarted_and_ingest_keeps_accepting(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest(workers="2")
    victim = _workers(ingest)["0"]["pid"]
    os.kill(victim, signal.SIGKILL)

    def restarted() -> bool:
        worker = _workers(ingest)["0"]
        return worker["pid"] not in (None, victim) and worker["ready"]

    wait_for("worker 0 running again under a new pid", restarted, 60)
    assert _workers(ingest)["0"]["restarts"] == 1
    assert metric_sum(ingest.url, "radflow_ingest_worker_restarts_total", worker="0") == 1
    assert "worker exited unexpectedly; restarting it" in ingest.log()

    sent = _send_concurrently(ingest.dimse_port, tmp_path, "b")
    announced = sorted(e["data"]["sop_instance_uid"] for e in stack.events())
    assert announced == sorted(sent)


def test_sigterm_drains_every_worker_and_the_parent_exits_0(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    """An association open at SIGTERM still gets its instance stored (the worker's own
    graceful stop: listeners closed, open associations given their grace)."""
    ingest: IngestProcess = start_ingest(workers="2")
    pids = [w["pid"] for w in _workers(ingest).values()]
    assert all(_alive(pid) for pid in pids)
    late = pydicom.dcmread(make_instance(tmp_path / "late.dcm"))
    ae = AE(ae_title="HELD")
    ae.add_requested_context(late.SOPClassUID, [late.file_meta.TransferSyntaxUID])
    held = keep_responses(ae.associate("127.0.0.1", ingest.dimse_port, ae_title="RADFLOW"))
    assert held.is_established

    ingest.proc.terminate()
    wait_for(
        "the pod no longer ready",
        lambda: httpx.get(f"{ingest.url}/readyz", timeout=15).status_code == 503,
        30,
    )
    status = held.send_c_store(late)
    held.release()
    assert status is not None and int(status.Status) == StoreStatus.SUCCESS

    assert ingest.proc.stop(timeout_s=60) == 0
    assert not any(_alive(pid) for pid in pids)
    (event,) = stack.events()
    assert event["data"]["sop_instance_uid"] == late.SOPInstanceUID
    log = ingest.log()
    assert log.count("worker stopped") == 2, log
    assert "ingest workers stopped" in log


def test_workers_that_keep_failing_make_the_pod_exit_3(start_ingest, tmp_path: Path) -> None:
    """Here every worker fails at start (a certificate file that is not one; the
    parent reads no TLS file): restarting cannot help, and the parent must give up so
    that Kubernetes sees the pod fail instead of a pod that never becomes ready."""
    garbage = tmp_path / "not-a-certificate.pem"
    garbage.write_text("not a certificate\n")
    ingest: IngestProcess = start_ingest(
        workers="2", tls_cert_file=str(garbage), tls_key_file=str(garbage), wait_ready=False
    )
    ingest.expected_exit = 3
    assert ingest.proc.proc is not None
    assert ingest.proc.proc.wait(timeout=120) == 3
    assert "ingest workers keep exiting; stopping the pod" in ingest.log()


def test_more_than_one_worker_needs_fixed_ports() -> None:
    with pytest.raises(ConfigurationError, match="RADFLOW_INGEST_WORKERS > 1 needs fixed ports"):
        IngestSettings.from_env({"RADFLOW_INGEST_WORKERS": "2", "RADFLOW_INGEST_DIMSE_PORT": "0"})
    assert IngestSettings.from_env({"RADFLOW_INGEST_DIMSE_PORT": "0"}).workers == 1


def test_two_workers_share_the_dicom_tls_and_https_ports(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ca = Authority(tmp_path / "ca")
    server = ca.issue("ingest", server=True, hosts=("127.0.0.1",))
    client = ca.issue("STORESCU", server=False, file_stem="client")
    https_port = free_port()
    ingest: IngestProcess = start_ingest(
        workers="2",
        https_port=str(https_port),
        tls_cert_file=str(server.cert),
        tls_key_file=str(server.key),
        tls_client_ca_file=str(ca.ca_file),
    )
    trusted = ["+tls", str(client.key), str(client.cert), "+cf", str(ca.ca_file)]
    files = [make_instance(tmp_path / f"tls-{i}.dcm") for i in range(TLS_ASSOCIATIONS)]
    with ThreadPoolExecutor(TLS_ASSOCIATIONS) as pool:
        results = list(pool.map(lambda f: storescu(ingest.dimse_tls_port, f, extra=trusted), files))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    posted = make_instance(tmp_path / "https.dcm")
    body, ctype = multipart([posted.read_bytes()])
    answer = httpx.post(
        f"https://127.0.0.1:{https_port}/dicomweb/studies",
        content=body,
        headers={"Content-Type": ctype, **AUTH_HEADERS},
        verify=client_context(ca_file=ca.ca_file),
        timeout=30,
    )
    assert answer.status_code == 200, answer.text

    sent = {str(pydicom.dcmread(f).SOPInstanceUID) for f in [*files, posted]}
    assert sorted(e["data"]["sop_instance_uid"] for e in stack.events()) == sorted(sent)
    served = [
        metric_sum(ingest.url, "radflow_ingest_worker_connections_total", worker=w)
        for w in ("0", "1")
    ]
    assert sum(served) == TLS_ASSOCIATIONS and all(served), served


def test_two_listeners_on_one_port_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="DIMSE_TLS_PORT and RADFLOW_INGEST_DIMSE_PORT"):
        IngestSettings.from_env(
            {
                "RADFLOW_INGEST_DIMSE_PORT": "4000",
                "RADFLOW_INGEST_DIMSE_TLS_PORT": "4000",
                "RADFLOW_INGEST_TLS_CERT_FILE": "/certs/tls.crt",
                "RADFLOW_INGEST_TLS_KEY_FILE": "/certs/tls.key",
            }
        )
    # A listener that is not opened holds no port: TLS ports without a certificate,
    # and the same port on two different addresses.
    IngestSettings.from_env(
        {"RADFLOW_INGEST_DIMSE_PORT": "4000", "RADFLOW_INGEST_DIMSE_TLS_PORT": "4000"}
    )
    IngestSettings.from_env(
        {
            "RADFLOW_INGEST_DIMSE_PORT": "4000",
            "RADFLOW_INGEST_HTTP_PORT": "4000",
            "RADFLOW_INGEST_DIMSE_HOST": "10.0.0.5",
        }
    )
    with pytest.raises(ConfigurationError, match="OPS_PORT and RADFLOW_INGEST_DIMSE_PORT"):
        IngestSettings.from_env(
            {
                "RADFLOW_INGEST_DIMSE_PORT": "4000",
                "RADFLOW_INGEST_OPS_PORT": "4000",
                "RADFLOW_INGEST_HTTP_HOST": "0.0.0.0",
            }
        )


def test_free_port_never_hands_out_one_port_twice_nor_one_a_connection_could_take() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    first_ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    assert all(20000 <= p < first_ephemeral for p in ports)
