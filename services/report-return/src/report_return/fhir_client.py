"""The HTTP side of a FHIR site: one DiagnosticReport per request, idempotently.

A new report is a conditional create (``POST [base]/DiagnosticReport`` with
``If-None-Exist: identifier=system|value``): 201 created it, 200 found it already there
(a retry after a lost response, or a replay), 412 found several (the server's data is
ambiguous: final). A later version of the same report is a conditional update
(``PUT [base]/DiagnosticReport?identifier=system|value``): 200 updated it, 201
created it, 412 found several. Every request carries ``X-Request-Id``, the same on
each retry of one report version.

Every httpx, TLS and token error is mapped here: :class:`FhirUnavailable` (retriable:
no connection, a timeout, 408, 429, 5xx, the token endpoint down) or
:class:`FhirRejected` (final: any other 4xx, after one fresh token on 401). Nothing of
httpx leaks out.
"""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from radflow_core.errors import ConfigurationError, PipelineError
from radflow_core.events import FhirInteraction, FhirIssue
from radflow_core.oauth2 import ClientCredentials, JwtAssertion, TokenUnavailable
from report_return.fhir_report import BuiltReport
from report_return.sites import FhirAuthKind, FhirEndpoint

FHIR_JSON = "application/fhir+json"
MAX_ISSUES = 20
"""OperationOutcome issues kept in report.failed."""
_LOCATION = re.compile(
    r"/DiagnosticReport/([A-Za-z0-9\-.]{1,64})(?:/_history/([A-Za-z0-9\-.]{1,64}))?"
)
_ISSUE_CODE = re.compile(r"^[a-z-]{1,40}$")
_SEVERITIES = {"fatal", "error", "warning", "information"}


class FhirError(PipelineError):
    """The FHIR server did not take the report."""

    reason = "fhir_error"
    http_status: int | None = None
    issues: tuple[FhirIssue, ...] = ()

    def __init__(
        self,
        message: str,
        *,
        http_status: int | None = None,
        issues: tuple[FhirIssue, ...] = (),
    ) -> None:
        super().__init__(message)
        self.http_status = http_status
        self.issues = issues


class FhirUnavailable(FhirError):
    """Not reached, no answer in time, or an answer that time may change (408, 429,
    5xx): worth another try."""

    reason = "fhir_unavailable"
    retriable = True


class FhirRejected(FhirError):
    """A 4xx: the server refused this resource (or our credentials); final."""

    reason = "fhir_rejected"


class FhirAmbiguous(FhirError):
    """412: the identifier matched several DiagnosticReports; the server's data must be
    cleaned up before this report can go."""

    reason = "fhir_ambiguous"


@dataclass(frozen=True)
class FhirAnswer:
    interaction: FhirInteraction
    http_status: int
    created: bool
    resource_id: str | None
    version_id: str | None
    latency_s: float


def tls_context(endpoint: FhirEndpoint) -> ssl.SSLContext | bool:
    """The verification for the server (and the token endpoint): the site's CA bundle
    and client certificate, or the system's trust store."""
    tls = endpoint.tls
    if tls is None:
        return True
    try:
        context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
        if tls.cert_file is not None:
            context.load_cert_chain(str(tls.cert_file), str(tls.key_file) if tls.key_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"TLS files of FHIR server {endpoint.base_url} cannot be used ({type(exc).__name__})"
        ) from None
    return context


def build_token_auth(
    endpoint: FhirEndpoint, token_client: httpx.AsyncClient, environ: Mapping[str, str] | None
) -> ClientCredentials | None:
    """The OAuth2 client credentials of a site (secret or SMART client assertion).

    Raises:
        ConfigurationError: a secret or key cannot be read, or the key cannot sign.
    """
    auth = endpoint.auth
    if auth is None:
        return None
    if auth.kind is FhirAuthKind.SMART_BACKEND:
        assert auth.private_key is not None
        key = auth.private_key.resolve(environ)
        assertion = JwtAssertion(key, auth.algorithm, auth.key_id, auth.jwks_url)
        return ClientCredentials(
            auth.token_url, auth.client_id, None, auth.scope, token_client, assertion=assertion
        )
    assert auth.client_secret is not None
    return ClientCredentials(
        auth.token_url,
        auth.client_id,
        auth.client_secret.resolve(environ),
        auth.scope,
        token_client,
    )


class FhirClient:
    """Sends DiagnosticReports to one site's FHIR server (one HTTP connection pool)."""

    def __init__(self, endpoint: FhirEndpoint, environ: Mapping[str, str] | None = None) -> None:
        self.endpoint = endpoint
        verify = tls_context(endpoint)
        timeout = httpx.Timeout(endpoint.timeout_s)
        self._tokens = httpx.AsyncClient(verify=verify, timeout=timeout, trust_env=False)
        self.auth = build_token_auth(endpoint, self._tokens, environ)
        self._http = httpx.AsyncClient(
            verify=verify, timeout=timeout, auth=self.auth, trust_env=False
        )

    async def aclose(self) -> None:
        """Close the connection pools; safe to call twice."""
        await self._http.aclose()
        await self._tokens.aclose()

    async def send(
        self,
        report: BuiltReport,
        *,
        update: bool,
        request_id: str,
        redact: Callable[[str], str],
    ) -> FhirAnswer:
        """Create (conditionally) or update (by identifier) the report.

        ``redact`` cleans the server's OperationOutcome text of patient data.

        Raises:
            FhirUnavailable: retriable.
            FhirRejected, FhirAmbiguous: final.
        """
        headers = {
            "Content-Type": f"{FHIR_JSON}; charset=utf-8",
            "Accept": FHIR_JSON,
            "Prefer": "return=minimal",
            "X-Request-Id": request_id,
        }
        url = f"{self.endpoint.base_url}/DiagnosticReport"
        if update:
            interaction = FhirInteraction.UPDATE
            method, params = "PUT", report.search
        else:
            interaction = FhirInteraction.CREATE
            method, params = "POST", ""
            headers["If-None-Exist"] = report.search
        started = time.monotonic()
        try:
            response = await self._http.request(
                method, f"{url}?{params}" if params else url, content=report.body, headers=headers
            )
        except TokenUnavailable as exc:
            raise FhirUnavailable(f"no token: {exc}") from exc
        except httpx.TimeoutException as exc:
            raise FhirUnavailable(f"no answer in time ({type(exc).__name__})") from exc
        except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
            raise FhirUnavailable(f"FHIR server not reached ({type(exc).__name__})") from exc
        latency = time.monotonic() - started
        status = response.status_code
        if 200 <= status < 300:
            resource_id, version_id = _location(response)
            return FhirAnswer(interaction, status, status == 201, resource_id, version_id, latency)
        issues = outcome_issues(response, redact)
        what = f"the FHIR server answered {status} to the {interaction.value}"
        if status in (408, 429) or status >= 500:
            raise FhirUnavailable(what, http_status=status, issues=issues)
        if status == 412:
            raise FhirAmbiguous(
                f"{what}: several DiagnosticReports carry the report's identifier",
                http_status=status,
                issues=issues,
            )
        raise FhirRejected(what, http_status=status, issues=issues)


def _location(response: httpx.Response) -> tuple[str | None, str | None]:
    """(id, version id) from Location / Content-Location, or from the body's id/meta."""
    for header in ("Location", "Content-Location"):
        match = _LOCATION.search(response.headers.get(header, ""))
        if match:
            return match.group(1), match.group(2)
    try:
        body = response.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    meta = body.get("meta") if isinstance(body.get("meta"), dict) else {}
    rid, vid = body.get("id"), (meta or {}).get("versionId")
    return (
        str(rid)[:64] if isinstance(rid, str) else None,
        str(vid)[:64] if isinstance(vid, str) else None,
    )


def outcome_issues(response: httpx.Response, redact: Callable[[str], str]) -> tuple[FhirIssue, ...]:
    """The issues of an OperationOutcome answer, their text redacted; () if the body
    is not one."""
    try:
        body: Any = json.loads(response.content)
    except ValueError:
        return ()
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ()
    issues = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        details: dict[str, Any] = issue.get("details") or {}
        if not isinstance(details, dict):
            details = {}
        codings = details.get("coding") if isinstance(details.get("coding"), list) else []
        first = codings[0] if codings and isinstance(codings[0], dict) else {}
        text = details.get("text") or issue.get("diagnostics")
        severity, code = issue.get("severity"), issue.get("code")
        expression = issue.get("expression") or issue.get("location") or []
        if not isinstance(expression, list):
            expression = []
        issues.append(
            FhirIssue(
                severity=severity if severity in _SEVERITIES else None,
                code=code if isinstance(code, str) and _ISSUE_CODE.match(code) else None,
                details_code=redact(str(first["code"]))[:64] if first.get("code") else None,
                text=redact(str(text))[:500] if text else None,
                expression=tuple(redact(str(e))[:200] for e in expression[:10]),
            )
        )
        if len(issues) == MAX_ISSUES:
            break
    return tuple(issues)
