"""Who sent it: an authenticated STOW-RS sender's identity reaches the event, over the
plain door with a bearer token and over the HTTPS door with a client certificate;
ops (/metrics, /readyz) answers on its own port only."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from radflow_core.tls import client_context
from radflow_devstack.issuer import Issuer, IssuerServer, ingest_env
from radflow_devstack.pki import Authority
from radflow_devstack.processes import free_port
from support.dicom import make_instance
from support.metrics import metric
from support.stack import IngestProcess, Stack
from support.stow import multipart, stow

pytestmark = pytest.mark.pipeline


def test_the_sender_identity_reaches_the_event_and_ops_has_its_own_port(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    issuer = IssuerServer(Issuer("https://idp.example.org/realms/radiology")).start()
    ca = Authority(tmp_path / "tls")
    server = ca.issue("ingest", server=True, hosts=("127.0.0.1",), file_stem="server")
    client = ca.issue("CT-SCANNER-2", server=False, file_stem="client")
    https_port = free_port()
    try:
        ingest: IngestProcess = start_ingest(
            env=ingest_env(issuer.issuer.url, issuer.jwks_url),
            https_port=str(https_port),
            tls_cert_file=str(server.cert),
            tls_key_file=str(server.key),
            tls_client_ca_file=str(ca.ca_file),
        )
        token = issuer.issuer.token(subject="pacs-gateway")
        bearer = stow(
            ingest.stow_url,
            [make_instance(tmp_path / "a.dcm").read_bytes()],
            authorization=f"Bearer {token}",
        )
        body, ctype = multipart([make_instance(tmp_path / "b.dcm").read_bytes()])
        mtls = httpx.post(
            f"https://127.0.0.1:{https_port}/dicomweb/studies",
            content=body,
            headers={"Content-Type": ctype},
            verify=client_context(ca_file=ca.ca_file, cert_file=client.cert, key_file=client.key),
            timeout=30,
        )
        refused = stow(ingest.stow_url, [b"never read"], authorization="Bearer expired.or.forged")
    finally:
        issuer.close()
    assert bearer.status_code == 200, bearer.text
    assert mtls.status_code == 200, mtls.text
    assert refused.status_code == 401
    identities = sorted(e["data"]["sender"]["identity"] for e in stack.events())
    assert identities == [
        "cert:CT-SCANNER-2",
        "jwt:https://idp.example.org/realms/radiology#pacs-gateway",
    ]
    assert metric(ingest.url, "radflow_ingest_auth_failures_total", reason="malformed") == 1
    stow_base = ingest.stow_url.removesuffix("/dicomweb/studies")
    assert httpx.get(f"{stow_base}/metrics").status_code == 404
    assert httpx.get(f"{ingest.url}/readyz").status_code == 200
