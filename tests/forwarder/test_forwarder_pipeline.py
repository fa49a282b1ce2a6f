"""The whole pipeline with everything real: DCMTK storescu → ingest → transcode →
router → stow-forwarder → Orthanc (DICOMweb). Each instance arrives once, with the
original's pixels, through outages, refusals and a forwarder crash."""

from __future__ import annotations

import io
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from radflow_codecs.codecs import decode
from radflow_core.topics import Topic
from radflow_devstack.kit.dcmtk import storescu
from radflow_devstack.kit.rules_file import dimse_destination, write_rules
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.pki import Authority
from radflow_devstack.processes import ManagedProcess, free_port
from support.audit import audit_records, participant_ids, patient_ids
from support.dicom import PHI_ID, make_instance
from support.dimse_peer import DimsePeer
from support.metrics import metric, metric_sum
from support.oauth import OAuthGateway
from support.orthanc import OrthancView
from support.proxy import FaultProxy
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def completed(stack: Stack) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(Topic.FORWARD_COMPLETED)]


def failed(stack: Stack) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(Topic.FORWARD_FAILED)]


def series(tmp_path: Path, count: int, study: str | None = None, **kwargs: Any) -> list[Path]:
    study = study or generate_uid()
    series_uid = generate_uid()
    folder = tmp_path / f"series-{series_uid[-8:]}"
    folder.mkdir()
    return [
        make_instance(
            folder / f"{i:04d}.dcm",
            study_instance_uid=study,
            series_instance_uid=series_uid,
            **{"rows": 64, "columns": 64, **kwargs},
        )
        for i in range(count)
    ]


def send(ingest: IngestProcess, files: list[Path], ts: str | None = None) -> None:
    for start in range(0, len(files), 100):
        done = storescu(ingest.dimse_port, *files[start : start + 100], ts=ts)
        assert done.returncode == 0, done.stderr


def same_pixels(received: bytes, original: Path) -> bool:
    ours = pydicom.dcmread(io.BytesIO(received))
    theirs = pydicom.dcmread(original)
    if "PixelData" not in theirs:
        return "PixelData" not in ours
    return bool(np.array_equal(decode(ours), decode(theirs)))


@pytest.fixture
def pipeline(stack: Stack, start_ingest, start_transcode, start_router) -> Callable[..., Any]:
    """Start ingest and transcode now; returns a starter for the router (with rules)."""
    ingest: IngestProcess = start_ingest(wait_ready=False, wait_port=False)
    start_transcode(wait_ready=False, wait_port=False).wait_ready()
    ingest.wait_ready()

    def with_rules(rules: Path) -> IngestProcess:
        start_router(rules_file=str(rules))
        return ingest

    return with_rules


@dataclass
class Guarded:
    """An Orthanc behind a fault proxy: what the forwarder is pointed at is the proxy."""

    orthanc: OrthancView
    proxy: FaultProxy
    url: str
    """The DICOMweb root, through the proxy."""

    def rules(self, path: Path) -> Path:
        return write_rules(path, {"orthanc": f"url: {self.url}"}, ["orthanc"])


@pytest.fixture
def orthanc_behind_proxy(
    start_orthanc_server: Callable[..., ManagedProcess],
) -> Iterator[Callable[..., Guarded]]:
    proxies: list[FaultProxy] = []

    def start(tls: ssl.SSLContext | None = None) -> Guarded:
        server = start_orthanc_server()
        assert server.port is not None
        proxy = FaultProxy(server.port, tls=tls)
        proxies.append(proxy)
        scheme = "https" if tls else "http"
        return Guarded(OrthancView(server), proxy, f"{scheme}://127.0.0.1:{proxy.port}/dicom-web")

    yield start
    for proxy in proxies:
        proxy.close()


def test_a_few_hundred_instances_across_syntaxes_arrive_once_with_their_pixels(
    stack: Stack,
    pipeline,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    ts_corpus: dict[str, Path],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    rules = write_rules(
        tmp_path / "rules.yaml", {"orthanc": f"url: {orthanc.dicomweb}"}, ["orthanc"]
    )
    ingest = pipeline(rules)
    forwarder = start_forwarder(rules_file=str(rules))
    generated = series(tmp_path, 150) + series(tmp_path, 100)
    send(ingest, generated)
    for ts, path in ts_corpus.items():
        send(ingest, [path], ts=ts)
    sent = [*generated, *ts_corpus.values()]
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in sent]
    # Several bundled files share one SOP Instance UID with different bytes: each is
    # its own delivery (its own idempotency key); the destination keeps one.
    wait_for(f"{len(sent)} deliveries", lambda: len(completed(stack)) >= len(sent), timeout_s=300)
    assert failed(stack) == []
    done = completed(stack)
    assert len(done) == len(sent)
    assert len({d["idempotency_key"] for d in done}) == len(sent), "a request delivered twice"
    assert sorted(orthanc.sop_instance_uids()) == sorted(set(uids))
    assert all(d["latency_s"] > 0 and d["destination"] == "orthanc" for d in done)
    unique = {u: p for u, p in zip(uids, sent, strict=True) if uids.count(u) == 1}
    checked = [*generated[:5], *(p for p in ts_corpus.values() if p in unique.values())]
    for path in checked:
        uid = pydicom.dcmread(path).SOPInstanceUID
        assert same_pixels(orthanc.file(uid), path), path.name
    delivered = metric(
        forwarder.url, "radflow_forwarder_delivered_total", destination="orthanc", lane="routine"
    )
    assert delivered == len(sent)


def test_a_destination_that_accepts_one_syntax_gets_it_converted_losslessly(
    stack: Stack,
    pipeline,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    ts_corpus: dict[str, Path],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    rules = write_rules(
        tmp_path / "rules.yaml",
        {"orthanc": f"url: {orthanc.dicomweb}\ntransfer_syntaxes: [{EXPLICIT_LE}]"},
        ["orthanc"],
    )
    ingest = pipeline(rules)
    start_forwarder(rules_file=str(rules))
    lossless = {
        ts: p
        for ts, p in ts_corpus.items()
        if ts
        in (
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.2",
        )
    }
    for ts, path in lossless.items():
        send(ingest, [path], ts=ts)
    wait_for("deliveries", lambda: len(completed(stack)) == len(lossless), timeout_s=120)
    for path in lossless.values():
        uid = pydicom.dcmread(path).SOPInstanceUID
        received = orthanc.file(uid)
        assert pydicom.dcmread(io.BytesIO(received)).file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert same_pixels(received, path), path.name
    assert {d["transfer_syntax_uid"] for d in completed(stack)} == {EXPLICIT_LE}


def test_an_outage_of_the_destination_delays_but_delivers_everything_once(
    stack: Stack,
    pipeline,
    start_forwarder,
    orthanc_behind_proxy: Callable[..., Guarded],
    tmp_path: Path,
) -> None:
    guarded = orthanc_behind_proxy()
    proxy, orthanc = guarded.proxy, guarded.orthanc
    rules = guarded.rules(tmp_path / "rules.yaml")
    ingest = pipeline(rules)
    forwarder = start_forwarder(
        rules_file=str(rules),
        retry_initial_s="0.2",
        retry_max_s="1",
        breaker_cooldown_s="1",
        breaker_failures="2",
    )
    proxy.cut()
    files = series(tmp_path, 30)
    send(ingest, files)
    wait_for(
        "the circuit to open",
        lambda: (
            metric(forwarder.url, "radflow_forwarder_circuit_state", destination="orthanc") == 2
        ),
        timeout_s=60,
    )
    assert completed(stack) == [] and failed(stack) == []
    proxy.restore()
    wait_for("30 deliveries", lambda: len(completed(stack)) == 30, timeout_s=120)
    assert orthanc.count() == 30
    assert failed(stack) == []
    assert max(d["attempts"] for d in completed(stack)) > 1
    assert metric(forwarder.url, "radflow_forwarder_circuit_state", destination="orthanc") == 0


def test_a_refusing_destination_dead_letters_while_another_keeps_receiving(
    stack: Stack,
    pipeline,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    good = OrthancView(start_orthanc_server())
    rules = write_rules(
        tmp_path / "rules.yaml",
        {
            "good": f"url: {good.dicomweb}",
            "refusing": f"url: {good.url}/no-such-dicomweb-root",
        },
        ["good", "refusing"],
    )
    ingest = pipeline(rules)
    start_forwarder(rules_file=str(rules), env={"RADFLOW_AUDIT_TRANSFER_WINDOW_S": "0.2"})
    files = series(tmp_path, 12)
    send(ingest, files)
    wait_for(
        "12 delivered and 12 dead-lettered",
        lambda: len(completed(stack)) == 12 and len(failed(stack)) == 12,
        timeout_s=120,
    )
    assert good.count() == 12
    assert {(f["destination"], f["reason"], f["http_status"]) for f in failed(stack)} == {
        ("refusing", "rejected", 404)
    }
    assert {f["retriable"] for f in failed(stack)} == {False}

    # The audit trail: Instances Transferred (Read), a success to one, a failure to the
    # other, each naming the patient by the ID read from the stored instance's header.
    def audited() -> dict[str, tuple[int, list[str]]] | None:
        outcomes = {}
        for transfer in audit_records(stack, "110104"):
            for name in {"good", "refusing"} & participant_ids(transfer):
                outcomes[name] = (transfer["outcome"], patient_ids(transfer["message"]))
        return outcomes if len(outcomes) == 2 else None

    assert wait_for("a transfer audited per destination", audited, every_s=0.5) == {
        "good": (0, [PHI_ID]),
        "refusing": (4, [PHI_ID]),
    }


def test_a_forwarder_killed_mid_batch_delivers_every_instance_once_after_restart(
    stack: Stack,
    pipeline,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    rules = write_rules(
        tmp_path / "rules.yaml", {"orthanc": f"url: {orthanc.dicomweb}\nmax_batch: 5"}, ["orthanc"]
    )
    ingest = pipeline(rules)
    files = series(tmp_path, 60, rows=256, columns=256)
    send(ingest, files)
    wait_for("60 routed", lambda: len(stack.events(Topic.FORWARD_REQUESTED)) == 60, timeout_s=120)
    forwarder = start_forwarder(rules_file=str(rules))
    wait_for("some delivered", lambda: orthanc.count() >= 10, timeout_s=60)
    forwarder.proc.kill()
    forwarder.expected_exit = -9
    start_forwarder(rules_file=str(rules))
    wait_for("all delivered", lambda: orthanc.count() == 60, timeout_s=120)
    wait_for(
        "every instance acknowledged",
        lambda: (
            {d["sop_instance_uid"] for d in completed(stack)}
            == {pydicom.dcmread(f).SOPInstanceUID for f in files}
        ),
        timeout_s=60,
    )
    assert failed(stack) == []
    assert orthanc.count() == 60


def test_a_stat_instance_is_delivered_ahead_of_a_routine_backlog(
    stack: Stack,
    pipeline,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        f"version: 1\ndestinations:\n  orthanc: {{url: '{orthanc.dicomweb}', max_batch: 5}}\n"
        "stat: {calling_aes: [ER_CT1]}\n"
        "rules:\n  - name: everything\n    route: [orthanc]\ndefault: {hold: x}\n"
    )
    ingest = pipeline(rules)
    backlog = series(tmp_path, 300, rows=128, columns=128)
    send(ingest, backlog)
    (stat_file,) = series(tmp_path, 1)
    done = storescu(ingest.dimse_port, stat_file, calling_ae="ER_CT1")
    assert done.returncode == 0, done.stderr
    wait_for(
        "the backlog and the STAT request routed",
        lambda: stack.routed(routine=300, stat=1),
        timeout_s=180,
    )
    start_forwarder(rules_file=str(rules))
    wait_for("all delivered", lambda: len(completed(stack)) == 301, timeout_s=180)
    stat_uid = pydicom.dcmread(stat_file).SOPInstanceUID
    (stat,) = [d for d in completed(stack) if d["sop_instance_uid"] == stat_uid]
    assert stat["lane"] == "stat"
    ahead = [
        d
        for d in completed(stack)
        if d["lane"] == "routine" and d["delivered_at"] < stat["delivered_at"]
    ]
    assert len(ahead) < 100, f"{len(ahead)} routine instances went before the STAT one"


def test_basic_auth_delivers_with_the_referenced_secret_and_a_wrong_one_is_refused(
    stack: Stack,
    pipeline,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    server = start_orthanc_server(users={"radflow": "s3cret-Pa55"})
    orthanc = OrthancView(server, auth=("radflow", "s3cret-Pa55"))
    rules = write_rules(
        tmp_path / "rules.yaml",
        {
            "right": f"url: {orthanc.dicomweb}\n"
            "auth: {type: basic, username: radflow, password_env: RIGHT_PASSWORD}",
            "wrong": f"url: {orthanc.dicomweb}\n"
            "auth: {type: basic, username: radflow, password_file: "
            f"{tmp_path / 'wrong-password'}}}",
        },
        ["right", "wrong"],
    )
    (tmp_path / "wrong-password").write_text("guess\n")
    ingest = pipeline(rules)
    forwarder = start_forwarder(rules_file=str(rules), env={"RIGHT_PASSWORD": "s3cret-Pa55"})
    send(ingest, series(tmp_path, 3))
    wait_for(
        "3 delivered, 3 refused",
        lambda: len(completed(stack)) == 3 and len(failed(stack)) == 3,
        timeout_s=120,
    )
    assert orthanc.count() == 3
    assert {(f["destination"], f["http_status"]) for f in failed(stack)} == {("wrong", 401)}
    log = forwarder.log()
    assert "s3cret-Pa55" not in log and "guess" not in log


def test_the_forwarder_does_not_start_without_a_referenced_secret(
    stack: Stack, start_forwarder, tmp_path: Path
) -> None:
    rules = write_rules(
        tmp_path / "rules.yaml",
        {"pacs": "url: https://pacs.example\nauth: {type: bearer, token_env: PACS_TOKEN_X}"},
        ["pacs"],
    )
    forwarder = start_forwarder(rules_file=str(rules), wait_ready=False, wait_port=False)
    forwarder.expected_exit = 3
    assert forwarder.proc.proc is not None
    assert forwarder.proc.proc.wait(timeout=60) == 3
    assert "environment variable PACS_TOKEN_X is not set" in forwarder.log()


def test_a_dimse_destination_receives_every_instance_once_with_its_pixels(
    stack: Stack,
    pipeline,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    ts_corpus: dict[str, Path],
    tmp_path: Path,
) -> None:
    server = start_orthanc_server()
    assert server.dicom_port is not None
    orthanc = OrthancView(server)
    rules = write_rules(
        tmp_path / "rules.yaml",
        {"pacs": dimse_destination(server.dicom_port, "ORTHANC", max_batch="20")},
        ["pacs"],
    )
    ingest = pipeline(rules)
    forwarder = start_forwarder(rules_file=str(rules))
    generated = series(tmp_path, 40)
    send(ingest, generated)
    lossless = [
        ts_corpus[ts]
        for ts in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5")
    ]
    for path in lossless:
        send(ingest, [path], ts=pydicom.dcmread(path).file_meta.TransferSyntaxUID)
    sent = [*generated, *lossless]
    wait_for(f"{len(sent)} deliveries", lambda: len(completed(stack)) >= len(sent), timeout_s=180)
    assert failed(stack) == []
    assert len({d["idempotency_key"] for d in completed(stack)}) == len(sent)
    uids = {pydicom.dcmread(p).SOPInstanceUID for p in sent}
    assert set(orthanc.sop_instance_uids()) == uids
    for path in [*generated[:3], *lossless]:
        uid = pydicom.dcmread(path).SOPInstanceUID
        assert same_pixels(orthanc.file(uid), path), path.name
    assert metric(
        forwarder.url, "radflow_forwarder_delivered_total", destination="pacs", lane="routine"
    ) == len(sent)


def test_a_dimse_destination_retries_out_of_resources_and_dead_letters_a_refusal(
    stack: Stack, pipeline, start_forwarder, tmp_path: Path
) -> None:
    port = free_port()
    peer = DimsePeer(port)
    rules = write_rules(
        tmp_path / "rules.yaml", {"pacs": dimse_destination(port, "PACS")}, ["pacs"]
    )
    ingest = pipeline(rules)
    files = series(tmp_path, 8)
    uids = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    peer.script[uids[0]] = [0xA700, 0xA702]
    peer.script[uids[1]] = [0xA900]
    peer.script[uids[2]] = [0xC000]
    forwarder = start_forwarder(
        rules_file=str(rules),
        retry_initial_s="0.2",
        retry_max_s="1",
        breaker_cooldown_s="1",
        breaker_failures="3",
    )
    send(ingest, files)  # the PACS is down while the first requests arrive
    wait_for(
        "retries while the PACS is down",
        lambda: (
            metric_sum(forwarder.url, "radflow_forwarder_retries_total", destination="pacs") > 0
        ),
        timeout_s=60,
    )
    peer.start()
    try:
        wait_for(
            "6 delivered and 2 refused",
            lambda: len(completed(stack)) == 6 and len(failed(stack)) == 2,
            timeout_s=120,
        )
    finally:
        peer.stop()
    assert sorted(peer.stored()) == sorted(set(uids) - {uids[1], uids[2]})
    assert len(peer.stored()) == 6, "each stored once"
    assert {(f["sop_instance_uid"], f["reason"], f["dicom_status"]) for f in failed(stack)} == {
        (uids[1], "rejected", 0xA900),
        (uids[2], "rejected", 0xC000),
    }
    (retried,) = [d for d in completed(stack) if d["sop_instance_uid"] == uids[0]]
    assert retried["attempts"] >= 3


def test_a_destination_answering_503_is_retried_after_its_retry_after_then_delivered_once(
    stack: Stack,
    pipeline,
    start_forwarder,
    orthanc_behind_proxy: Callable[..., Guarded],
    tmp_path: Path,
) -> None:
    guarded = orthanc_behind_proxy()
    proxy, orthanc = guarded.proxy, guarded.orthanc
    proxy.answer_http(503, "Service Unavailable", retry_after_s=2)
    rules = guarded.rules(tmp_path / "rules.yaml")
    ingest = pipeline(rules)
    forwarder = start_forwarder(
        rules_file=str(rules), retry_initial_s="0.05", retry_max_s="0.2", breaker_failures="1000"
    )
    send(ingest, series(tmp_path, 10))
    wait_for("the first 503", lambda: proxy.answered >= 1, timeout_s=60)
    first = proxy.answered
    time.sleep(6)
    # Without Retry-After, a 0.05-0.2 s backoff would have asked ~30 times per batch.
    assert 1 <= proxy.answered - first <= 8, proxy.answered - first
    assert completed(stack) == [] and failed(stack) == []
    assert (
        metric_sum(
            forwarder.url,
            "radflow_forwarder_retries_total",
            destination="orthanc",
            cause="HTTP 503",
        )
        >= 2
    )
    proxy.restore()
    wait_for("10 deliveries", lambda: len(completed(stack)) == 10, timeout_s=60)
    assert orthanc.count() == 10
    assert failed(stack) == []


def test_a_destination_that_takes_requests_and_never_answers_is_timed_out_and_retried(
    stack: Stack,
    pipeline,
    start_forwarder,
    orthanc_behind_proxy: Callable[..., Guarded],
    tmp_path: Path,
) -> None:
    guarded = orthanc_behind_proxy()
    proxy, orthanc = guarded.proxy, guarded.orthanc
    proxy.stall()
    rules = guarded.rules(tmp_path / "rules.yaml")
    ingest = pipeline(rules)
    forwarder = start_forwarder(
        rules_file=str(rules), request_timeout_s="1", retry_initial_s="0.2", retry_max_s="0.5"
    )
    send(ingest, series(tmp_path, 5))
    wait_for(
        "a timed-out request retried",
        lambda: (
            metric_sum(
                forwarder.url,
                "radflow_forwarder_retries_total",
                destination="orthanc",
                cause="no answer",
            )
            >= 1
        ),
        timeout_s=60,
    )
    assert proxy.stalled >= 1 and completed(stack) == []
    proxy.restore()
    wait_for("5 deliveries", lambda: len(completed(stack)) == 5, timeout_s=60)
    assert orthanc.count() == 5 and failed(stack) == []


def test_tls_with_a_private_ca_and_a_client_certificate_delivers_and_wrong_trust_is_refused(
    stack: Stack,
    pipeline,
    start_forwarder,
    orthanc_behind_proxy: Callable[..., Guarded],
    tmp_path: Path,
) -> None:
    ca = Authority(tmp_path / "pki")
    client = ca.issue("radflow-forwarder", server=False)
    # Orthanc's own HTTPS (civetweb on OpenSSL 3, Debian) crashes on the first
    # handshake: TLS is terminated in front of it, as a reverse proxy would.
    tls = ca.server_context(ca.issue("pacs", server=True), require_client_cert=True)
    guarded = orthanc_behind_proxy(tls)
    proxy, orthanc, url = guarded.proxy, guarded.orthanc, guarded.url
    rules = write_rules(
        tmp_path / "rules.yaml",
        {
            "mtls": f"url: {url}\n"
            f"tls: {{ca_file: {ca.ca_file}, cert_file: {client.cert}, key_file: {client.key}}}",
            "no-client-cert": f"url: {url}\ntls: {{ca_file: {ca.ca_file}}}",
            "system-trust": f"url: {url}",
        },
        ["mtls", "no-client-cert", "system-trust"],
    )
    ingest = pipeline(rules)
    start_forwarder(
        rules_file=str(rules), retry_initial_s="0.2", retry_max_s="0.5", retry_budget_s="3"
    )
    send(ingest, series(tmp_path, 3))
    wait_for(
        "3 delivered over mutual TLS, 6 dead-lettered",
        lambda: len(completed(stack)) == 3 and len(failed(stack)) == 6,
        timeout_s=120,
    )
    assert {d["destination"] for d in completed(stack)} == {"mtls"}
    assert orthanc.count() == 3
    reasons = {(f["destination"], f["reason"]) for f in failed(stack)}
    assert reasons == {
        ("no-client-cert", "retries_exhausted"),
        ("system-trust", "retries_exhausted"),
    }
    (untrusted,) = {f["message"] for f in failed(stack) if f["destination"] == "system-trust"}
    assert "TLS: certificate verify failed" in untrusted, untrusted
    # Without a client certificate the server ends the handshake; the client only sees
    # the connection reset (TLS 1.3 finishes the client's side first).
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in proxy.handshake_failures


def test_oauth2_tokens_are_fetched_refreshed_before_expiry_and_renewed_after_revocation(
    stack: Stack,
    pipeline,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    server = start_orthanc_server()
    assert server.port is not None
    orthanc = OrthancView(server)
    gateway = OAuthGateway(server.port, {"radflow": "client-s3cret"}, lifetime_s=4)
    oauth = (
        "auth: {{type: oauth2, token_url: '{url}/token', client_id: radflow, "
        "client_secret_env: {env}, scope: dicom}}"
    )
    rules = write_rules(
        tmp_path / "rules.yaml",
        {
            "cloud": f"url: {gateway.url}/dicom-web\n"
            + oauth.format(url=gateway.url, env="CLOUD_SECRET"),
            "wrong-secret": f"url: {gateway.url}/dicom-web\n"
            + oauth.format(url=gateway.url, env="WRONG_SECRET"),
        },
        ["cloud", "wrong-secret"],
    )
    ingest = pipeline(rules)
    forwarder = start_forwarder(
        rules_file=str(rules),
        retry_initial_s="0.2",
        retry_max_s="0.5",
        retry_budget_s="3",
        # The wrong secret opens its destination's circuit; with the default 15 s
        # cooldown, nine instances arriving in separate batches could outlast the wait.
        breaker_cooldown_s="1",
        env={"CLOUD_SECRET": "client-s3cret", "WRONG_SECRET": "guess"},
    )

    def cloud() -> int:
        return sum(d["destination"] == "cloud" for d in completed(stack))

    send(ingest, series(tmp_path, 3))
    wait_for("the first wave", lambda: cloud() == 3, timeout_s=60)
    assert gateway.issued == 1
    time.sleep(3)  # past half the token's 4 s life: the next request needs a new one
    send(ingest, series(tmp_path, 3))
    wait_for("the second wave", lambda: cloud() == 6, timeout_s=60)
    assert gateway.issued == 2
    assert gateway.refused_tokens == 0, "a request left with an expired token"
    gateway.revoke_all()  # e.g. the identity provider restarted
    send(ingest, series(tmp_path, 3))
    wait_for("the third wave", lambda: cloud() == 9, timeout_s=60)
    assert gateway.refused_tokens >= 1 and gateway.issued == 3
    assert orthanc.count() == 9
    wait_for("the wrong secret's dead letters", lambda: len(failed(stack)) == 9, timeout_s=60)
    (message,) = {f["message"] for f in failed(stack)}
    assert "token endpoint answered 401" in message
    assert {f["destination"] for f in failed(stack)} == {"wrong-secret"}
    log = forwarder.log()
    assert "client-s3cret" not in log and "guess" not in log
    gateway.close()


def test_destinations_added_and_removed_in_the_rule_file_start_and_stop_without_a_restart(
    stack: Stack,
    start_ingest,
    start_transcode,
    start_router,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    first, second = OrthancView(start_orthanc_server()), OrthancView(start_orthanc_server())
    rules = tmp_path / "rules.yaml"

    def swap(destinations: dict[str, str], route: list[str]) -> None:
        """Replace the file whole, as a ConfigMap update does."""
        write_rules(tmp_path / "next.yaml", destinations, route).replace(rules)

    swap({"first": f"url: {first.dicomweb}"}, ["first"])
    ingest = start_ingest()
    start_transcode()
    router = start_router(rules_file=str(rules), reload_interval_s="0.5")
    forwarder = start_forwarder(rules_file=str(rules), reload_interval_s="0.5")

    def applied(generation: int) -> bool:
        return (
            metric(router.url, "radflow_router_rules_generation") == generation
            and metric(forwarder.url, "radflow_forwarder_rules_generation") == generation
        )

    send(ingest, series(tmp_path, 3))
    wait_for("3 delivered to the first", lambda: first.count() == 3, timeout_s=60)

    both = {"first": f"url: {first.dicomweb}", "second": f"url: {second.dicomweb}"}
    swap(both, ["first", "second"])
    wait_for(
        "the second destination applied",
        lambda: applied(2) and metric(forwarder.url, "radflow_forwarder_destinations") == 2,
        timeout_s=30,
    )
    send(ingest, series(tmp_path, 3))
    wait_for("3 more to each", lambda: first.count() == 6 and second.count() == 3, timeout_s=60)

    (tmp_path / "broken.yaml").write_text("version: 1\ndestinations: {second: {url: ftp://x}}\n")
    (tmp_path / "broken.yaml").replace(rules)
    wait_for(
        "the broken change rejected",
        lambda: metric(forwarder.url, "radflow_forwarder_rules_valid") == 0,
        timeout_s=30,
    )
    assert "rule file change rejected" in forwarder.log()

    swap(both, ["second"])  # 'first' stays defined but unrouted: it keeps its consumers
    wait_for("routing to the second only", lambda: applied(3), timeout_s=30)
    assert metric(forwarder.url, "radflow_forwarder_circuit_state", destination="first") == 0
    swap({"second": f"url: {second.dicomweb}"}, ["second"])
    wait_for(
        "the first destination removed",
        lambda: applied(4) and metric(forwarder.url, "radflow_forwarder_destinations") == 1,
        timeout_s=30,
    )
    # Gone with it: a circuit left behind (open, had it been down) would keep alerting.
    assert metric(forwarder.url, "radflow_forwarder_circuit_state", destination="first") is None
    send(ingest, series(tmp_path, 3))
    wait_for("3 more to the second", lambda: second.count() == 6, timeout_s=60)
    assert first.count() == 6
    assert failed(stack) == []
    assert "destination removed" in forwarder.log() and "destination added" in forwarder.log()
