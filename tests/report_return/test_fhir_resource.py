"""The DiagnosticReport's pure parts: statuses, identifier systems, search escaping, the
redaction of a server's words, and the SMART client assertion."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from radflow_core.errors import ConfigurationError
from radflow_core.events import ReportStatus
from radflow_core.oauth2 import ClientCredentials, JwtAssertion
from radflow_devstack.fhir_server import FhirServer
from radflow_devstack.pki import Authority
from radflow_devstack.processes import free_port
from report_return.fhir_client import FhirClient, FhirUnavailable
from report_return.fhir_report import (
    BuiltReport,
    authority_system,
    build_diagnostic_report,
    redactor,
)
from report_return.report import document_from
from report_return.sites import FhirEndpoint, load_sites_text
from support.reports import document

SITES = load_sites_text(
    """
sites:
  fhir:
    output: fhir
    fhir: {base_url: "https://ehr.example/fhir"}
  amending:
    output: fhir
    fhir: {base_url: "https://ehr.example/fhir", correction_status: amended}
"""
)


def built(status: ReportStatus = ReportStatus.FINAL, site: str = "fhir", **doc: object) -> dict:
    report = build_diagnostic_report(
        document_from(document(**doc)), status, SITES[site], report_id="R|1", report_version=1
    )
    return json.loads(report.body)


@pytest.mark.parametrize(
    ("status", "site", "expected"),
    [
        (ReportStatus.PRELIMINARY, "fhir", "preliminary"),
        (ReportStatus.FINAL, "fhir", "final"),
        (ReportStatus.CORRECTED, "fhir", "corrected"),
        (ReportStatus.CORRECTED, "amending", "amended"),
    ],
)
def test_each_report_status_has_its_diagnostic_report_status(
    status: ReportStatus, site: str, expected: str
) -> None:
    assert built(status, site)["status"] == expected


@pytest.mark.parametrize(
    ("authority", "system"),
    [
        ("1.2.840.99999.1", "urn:oid:1.2.840.99999.1"),
        ("https://hospital.example/mrn", "https://hospital.example/mrn"),
        ("NORTH", None),
        (None, None),
    ],
)
def test_an_assigning_authority_becomes_a_system_only_when_it_is_an_oid_or_a_uri(
    authority: str | None, system: str | None
) -> None:
    assert authority_system(authority) == system


def test_a_local_authority_is_kept_as_the_identifiers_assigner() -> None:
    subject = built()["subject"]["identifier"]
    assert "system" not in subject and subject["assigner"] == {"display": "NORTH"}
    assert subject["type"]["coding"][0]["code"] == "MR"


def test_a_report_without_visit_or_impression_leaves_encounter_and_conclusion_out() -> None:
    resource = built(impression=None)
    assert "encounter" not in resource and "conclusion" not in resource


def test_a_structured_report_is_identified_by_its_sop_instance_uid() -> None:
    report = build_diagnostic_report(
        document_from(document()),
        ReportStatus.FINAL,
        SITES["fhir"],
        report_id="1.2.3.4",
        report_version=None,
        structured=True,
    )
    assert (report.identifier_system, report.identifier_value) == (
        "urn:dicom:uid",
        "urn:oid:1.2.3.4",
    )
    assert "meta" not in json.loads(report.body)


def test_search_values_escape_the_token_separators() -> None:
    report = BuiltReport(b"{}", "final", "urn:x", "a|b,c$d\\e")
    assert report.search == "identifier=urn:x|a\\|b\\,c\\$d\\\\e"


def test_the_redactor_replaces_every_patient_value_whatever_its_case() -> None:
    redact = redactor(document_from(document(visit_number="V-31")))
    text = "sentinel PHINAME MRN-4711 19700101 01.01.1970 ACC-1001 V-31 No acute findings. ok"
    assert redact(text) == " ".join(["[redacted]"] * 8 + ["ok"])


def _pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def test_the_smart_client_assertion_has_the_claims_the_spec_asks_for() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assertion = JwtAssertion(_pem(key), "RS384", key_id="k1", jwks_url="https://me/jwks")
    token = assertion.sign("client-1", "https://auth/token")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS384" and header["kid"] == "k1" and header["jku"] == "https://me/jwks"
    claims = jwt.decode(
        token, key.public_key(), algorithms=["RS384"], audience="https://auth/token"
    )
    assert claims["iss"] == claims["sub"] == "client-1"
    assert 0 < claims["exp"] - claims["iat"] <= 300 and len(claims["jti"]) >= 16
    assert assertion.sign("client-1", "https://auth/token") != token, "a fresh jti each time"


def test_an_assertion_key_that_cannot_sign_its_algorithm_is_refused_at_start() -> None:
    ec_key = _pem(ec.generate_private_key(ec.SECP384R1()))
    with pytest.raises(ConfigurationError, match="cannot sign RS384"):
        JwtAssertion(ec_key, "RS384")
    with pytest.raises(ConfigurationError, match="RS384, ES384"):
        JwtAssertion(ec_key, "RS256")


def test_client_credentials_post_the_assertion_instead_of_a_secret() -> None:
    forms: list[str] = []

    def token_server(request: httpx.Request) -> httpx.Response:
        forms.append(request.content.decode())
        assert "authorization" not in request.headers
        return httpx.Response(200, json={"access_token": "t", "expires_in": 600})

    async def scenario() -> str:
        async with httpx.AsyncClient(transport=httpx.MockTransport(token_server)) as client:
            assertion = JwtAssertion(_pem(ec.generate_private_key(ec.SECP384R1())), "ES384")
            auth = ClientCredentials(
                "https://auth/token", "c1", None, "system/x", client, assertion=assertion
            )
            first = await auth.token()
            assert await auth.token() == first
            return first

    assert asyncio.run(scenario()) == "t"
    (form,) = forms
    assert "client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type" in form
    assert "grant_type=client_credentials" in form and "client_secret" not in form


def test_a_fhir_server_that_is_not_there_is_a_retriable_failure() -> None:
    endpoint = load_sites_text(
        f"sites:\n  a: {{output: fhir, fhir: {{base_url: 'http://127.0.0.1:{free_port()}/r4', "
        "timeout_s: 2}}\n"
    )["a"].fhir
    assert endpoint is not None

    async def scenario() -> None:
        client = FhirClient(endpoint)
        try:
            await client.send(
                BuiltReport(b"{}", "final", "urn:x", "1"),
                update=False,
                request_id="X",
                redact=lambda t: t,
            )
        finally:
            await client.aclose()
            await client.aclose()

    with pytest.raises(FhirUnavailable, match="not reached") as info:
        asyncio.run(scenario())
    assert info.value.retriable and info.value.http_status is None


def test_a_token_is_reused_until_halfway_through_a_short_lifetime_then_renewed() -> None:
    issued: list[str] = []

    def token_server(request: httpx.Request) -> httpx.Response:
        issued.append(f"t{len(issued)}")
        return httpx.Response(200, json={"access_token": issued[-1], "expires_in": 0.4})

    async def scenario() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(token_server)) as client:
            auth = ClientCredentials("https://auth/token", "c1", "secret", None, client)
            seen = [await auth.token(), await auth.token()]
            await asyncio.sleep(0.3)
            seen.append(await auth.token())
            return seen

    assert asyncio.run(scenario()) == ["t0", "t0", "t1"]


def test_a_fhir_server_over_tls_is_verified_against_the_sites_ca(tmp_path: Path) -> None:
    authority = Authority(tmp_path / "ca")
    issued = authority.issue("ehr", server=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(issued.cert), str(issued.key))
    secret = tmp_path / "secret"
    secret.write_text("s3cret")

    def endpoint(server: FhirServer, ca: bool) -> FhirEndpoint:
        site = load_sites_text(
            json.dumps(
                {
                    "sites": {
                        "a": {
                            "output": "fhir",
                            "fhir": {
                                "base_url": server.base_url,
                                "auth": {
                                    "type": "oauth2",
                                    "token_url": server.token_url,
                                    "client_id": "c1",
                                    "client_secret_file": str(secret),
                                },
                                **({"tls": {"ca_file": str(authority.ca_file)}} if ca else {}),
                                "timeout_s": 5,
                            },
                        }
                    }
                }
            )
        )["a"]
        assert site.fhir is not None
        return site.fhir

    async def send(target: FhirEndpoint) -> int:
        client = FhirClient(target)
        report = build_diagnostic_report(
            document_from(document()),
            ReportStatus.FINAL,
            SITES["fhir"],
            report_id="TLS-1",
            report_version=1,
        )
        try:
            answer = await client.send(report, update=False, request_id="X", redact=str)
            return answer.http_status
        finally:
            await client.aclose()

    with FhirServer(clients={"c1": "s3cret"}, tls=context) as server:
        assert server.base_url.startswith("https://")
        assert asyncio.run(send(endpoint(server, ca=True))) == 201
        # Not trusted by the system's store: the token endpoint (same server) fails first.
        with pytest.raises(FhirUnavailable, match="token endpoint: ConnectError"):
            asyncio.run(send(endpoint(server, ca=False)))
        assert server.tokens_issued == 1 and len(server.reports()) == 1


def test_a_missing_secret_or_key_stops_the_start_with_its_name_not_its_value(
    tmp_path: Path,
) -> None:
    sites = load_sites_text(
        f"""
sites:
  a:
    output: fhir
    fhir:
      base_url: https://ehr.example/fhir
      auth: {{type: oauth2, token_url: "https://ehr.example/token", client_id: c,
              client_secret_env: RADFLOW_TEST_UNSET_SECRET}}
  b:
    output: fhir
    fhir:
      base_url: https://ehr.example/fhir
      auth: {{type: smart-backend, token_url: "https://ehr.example/token", client_id: c,
              private_key_file: "{tmp_path / "absent.pem"}"}}
"""
    )

    async def build(name: str) -> None:
        endpoint = sites[name].fhir
        assert endpoint is not None
        await FhirClient(endpoint, environ={}).aclose()

    with pytest.raises(ConfigurationError, match="RADFLOW_TEST_UNSET_SECRET is not set"):
        asyncio.run(build("a"))
    with pytest.raises(ConfigurationError, match=r"absent\.pem cannot be read"):
        asyncio.run(build("b"))
