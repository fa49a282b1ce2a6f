"""DICOM TLS on ingest's C-STORE SCP and the per-sender association limit, against
DCMTK's storescu and echoscu (built with OpenSSL) and pynetdicom."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from pynetdicom import AE

from radflow_devstack.kit.dcmtk import nodelay_env, storescu
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.pki import Authority
from support.dicom import make_instance
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline


def _echoscu(
    port: int, tls: list[str], calling_ae: str = "STORESCU"
) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["echoscu", *tls, "-aet", calling_ae, "-aec", "RADFLOW", "127.0.0.1", str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        env=nodelay_env(),
        check=False,
    )


def _metric(ingest: IngestProcess, line: str) -> bool:
    return line in httpx.get(f"{ingest.url}/metrics").text


def test_dicom_tls_admits_only_trusted_certificates_with_their_mapped_ae_titles(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ca = Authority(tmp_path / "ca")
    server = ca.issue("ingest", server=True, hosts=("127.0.0.1",))
    client = ca.issue("STORESCU", server=False, file_stem="client")
    stranger = Authority(tmp_path / "other", "other CA").issue("STORESCU", server=False)
    ingest: IngestProcess = start_ingest(
        tls_cert_file=str(server.cert),
        tls_key_file=str(server.key),
        tls_client_ca_file=str(ca.ca_file),
        dimse_tls_peers="STORESCU=STORESCU|CT1",
        dimse_plain="false",  # production: TLS only
    )
    port = ingest.dimse_tls_port
    trusted = ["+tls", str(client.key), str(client.cert), "+cf", str(ca.ca_file)]

    sent = make_instance(tmp_path / "ct.dcm")
    result = storescu(port, sent, extra=trusted)
    assert result.returncode == 0, result.stderr
    (event,) = stack.events()
    assert event["data"]["sender"]["identity"] == "cert:STORESCU"
    assert event["data"]["sender"]["calling_ae"] == "STORESCU"
    assert _echoscu(port, trusted, calling_ae="CT1").returncode == 0

    # The certificate is not mapped to this calling AE title.
    wrong_ae = _echoscu(port, trusted, calling_ae="MR9")
    assert wrong_ae.returncode != 0
    assert "Calling AE Title Not Recognized" in wrong_ae.stderr
    # No client certificate, or one from a CA ingest does not trust: no handshake.
    anonymous = _echoscu(port, ["+tla", "+cf", str(ca.ca_file)])
    untrusted = ["+tls", str(stranger.key), str(stranger.cert), "+cf", str(ca.ca_file)]
    assert anonymous.returncode != 0
    assert _echoscu(port, untrusted).returncode != 0
    # Plain DIMSE to the TLS port is no DICOM at all to it, and the plain port is closed.
    assert _echoscu(port, []).returncode != 0
    assert "Connection refused" in _echoscu(ingest.dimse_port, []).stderr

    wait_for(
        "the refusals counted",
        lambda: (
            _metric(
                ingest,
                'radflow_ingest_associations_rejected_total{reason="certificate_not_allowed"} 1.0',
            )
            and _metric(ingest, "radflow_ingest_tls_handshake_failures_total 3.0")
        ),
    )
    assert len(stack.events()) == 1


def test_a_sender_over_its_association_limit_is_rejected_as_transient_while_others_connect(
    start_ingest,
) -> None:
    ingest: IngestProcess = start_ingest(max_associations_per_sender="2")
    busy, other = AE(ae_title="BUSY"), AE(ae_title="OTHER")
    for ae in (busy, other):
        ae.add_requested_context("1.2.840.10008.1.1")
    held = [busy.associate("127.0.0.1", ingest.dimse_port, ae_title="RADFLOW") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        over = busy.associate("127.0.0.1", ingest.dimse_port, ae_title="RADFLOW")
        assert over.is_rejected
        assert over.acceptor.primitive is not None
        assert over.acceptor.primitive.result == 0x02  # rejected-transient: retry later
        assert over.acceptor.primitive.diagnostic == 0x02  # local limit exceeded
        another = other.associate("127.0.0.1", ingest.dimse_port, ae_title="RADFLOW")
        assert another.is_established
        another.release()
    finally:
        for assoc in held:
            assoc.release()
    assert _metric(ingest, 'radflow_ingest_associations_rejected_total{reason="sender_limit"} 1.0')
    wait_for(
        "the sender's associations closed",
        lambda: _metric(ingest, "radflow_ingest_associations_active 0.0"),
    )
    again = busy.associate("127.0.0.1", ingest.dimse_port, ae_title="RADFLOW")
    assert again.is_established
    again.release()
