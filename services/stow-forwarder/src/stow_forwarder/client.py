"""One destination's STOW-RS endpoint: a pooled HTTP client with its auth and TLS,
and each answer sorted into delivered, refused, or worth another try.

What is retried (docs/architecture.md, delivery semantics): timeouts, connection errors, 408, 429
and 5xx (honouring Retry-After), a FailedSOPSequence entry whose reason is 0xA7xx (out
of resources), and an instance a 2xx answer does not mention. A FailedSOPSequence
entry whose reason is 0x0111 (duplicate SOP instance) means the destination holds the
instance already: delivered. Everything else a destination says no to is final: 400,
401/403 (after one token refresh), 404, 409 entries, 413, 415.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

from radflow_core.dicom_status import StoreStatus
from radflow_core.errors import ConfigurationError
from radflow_core.events import Lane
from radflow_core.tls import TlsFilesUnusable, client_context
from radflow_rules.rules import Destination
from stow_forwarder.answer import Answer, Outgoing
from stow_forwarder.auth import TokenUnavailable, build_auth
from stow_forwarder.metrics import REQUEST_SECONDS
from stow_forwarder.settings import ForwarderSettings
from stow_forwarder.stow import InstanceAnswer, MultipartBody, UnreadableResponse, parse_response
from stow_forwarder.verify import VerificationUnanswered

SOP_CLASS_UID = "00080016"
SOP_INSTANCE_UID = "00080018"

RETRIABLE_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})


def tls_context(destination: Destination) -> ssl.SSLContext | bool:
    """The destination's TLS context (True: the system's trust store).

    Raises:
        ConfigurationError: its CA, certificate or key cannot be used (the destination
            is left stopped rather than the forwarder crashing on every request).
    """
    tls = destination.tls
    if tls is None:
        return True
    try:
        return client_context(ca_file=tls.ca_file, cert_file=tls.cert_file, key_file=tls.key_file)
    except (TlsFilesUnusable, OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"destination {destination.name!r}: its tls files cannot be used "
            f"({type(exc).__name__}: {exc})"
        ) from exc


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


class StowClient:
    """A DICOMweb destination: STOW-RS over a pooled HTTP client."""

    def __init__(
        self,
        destination: Destination,
        settings: ForwarderSettings,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.destination = destination
        timeout = httpx.Timeout(settings.request_timeout_s, connect=settings.connect_timeout_s)
        verify = tls_context(destination)
        self._token_client = httpx.AsyncClient(timeout=timeout, verify=verify)
        self.auth = build_auth(destination.auth, self._token_client, environ)
        self._client = httpx.AsyncClient(
            timeout=timeout,
            verify=verify,
            auth=self.auth,
            limits=httpx.Limits(max_connections=8, max_keepalive_connections=8),
            headers={"Accept": "application/dicom+json", "User-Agent": "radflow-stow-forwarder"},
        )
        self.url = destination.url.rstrip("/") + "/studies"

    async def close(self) -> None:
        await self._client.aclose()
        await self._token_client.aclose()

    async def store(self, items: Sequence[Outgoing], lane: Lane) -> Answer:
        """POST one multipart request with ``items`` (STOW-RS has no priority)."""
        uids = [item.sop_instance_uid for item in items]
        body = MultipartBody.of([item.path for item in items])
        started = time.perf_counter()
        status_label = "error"
        try:
            response = await self._client.post(
                self.url,
                content=body,
                headers={
                    "Content-Type": body.content_type,
                    "Content-Length": str(body.length()),
                },
            )
            status_label = f"{response.status_code // 100}xx"
        except (httpx.TimeoutException, httpx.TransportError, ssl.SSLError) as exc:
            # httpcore lets an SSLError raised while reading the answer (the server's TLS
            # alert after the handshake, e.g. "certificate required") through unwrapped.
            return Answer(None, retry=dict.fromkeys(uids, no_answer(exc)), peer_unavailable=True)
        except TokenUnavailable as exc:
            return Answer(None, retry=dict.fromkeys(uids, str(exc)), peer_unavailable=True)
        finally:
            REQUEST_SECONDS.labels(self.destination.name, status_label).observe(
                time.perf_counter() - started
            )
        return classify(response, uids)

    async def holds(self, study_instance_uid: str, sop_instance_uids: Sequence[str]) -> set[str]:
        """Ask the destination's QIDO-RS which of these instances of the study it has
        (``GET {base}/studies/{study}/instances``, one request per study). Nothing is
        known (an empty set) when it does not answer or answers without QIDO-RS: the
        instances are then sent again, which a DICOMweb server stores once."""
        url = f"{self.url}/{study_instance_uid}/instances"
        try:
            response = await self._client.get(url, params={"includefield": "00080018"})
        except (httpx.TimeoutException, httpx.TransportError, ssl.SSLError, TokenUnavailable):
            return set()
        if response.status_code != 200:
            return set()
        try:
            found = {
                str(item["00080018"]["Value"][0])
                for item in response.json()
                if isinstance(item, dict) and "00080018" in item
            }
        except (ValueError, KeyError, IndexError, TypeError):
            return set()
        return found & set(sop_instance_uids)

    async def instances_held(
        self, study_instance_uid: str, series_instance_uid: str
    ) -> dict[str, str]:
        """SOP Instance UID → SOP Class UID of every instance the destination's QIDO-RS
        lists in the series (``GET {base}/studies/{study}/series/{series}/instances``):
        one search covers a batch's instances of the series.

        Raises:
            VerificationUnanswered: no answer, a status other than 200 or 204, or a
                body that is not a DICOM JSON list.
        """
        url = f"{self.url}/{study_instance_uid}/series/{series_instance_uid}/instances"
        try:
            response = await self._client.get(
                url, params={"includefield": f"{SOP_CLASS_UID},{SOP_INSTANCE_UID}"}
            )
        except (httpx.TimeoutException, httpx.TransportError, ssl.SSLError) as exc:
            raise VerificationUnanswered(no_answer(exc)) from exc
        except TokenUnavailable as exc:
            raise VerificationUnanswered(str(exc)) from exc
        if response.status_code == 204 or (
            response.status_code == 200 and not response.content.strip()
        ):
            return {}  # no match: the series is not there (yet)
        if response.status_code != 200:
            raise VerificationUnanswered(f"QIDO-RS answered HTTP {response.status_code}")
        try:
            return {
                str(item[SOP_INSTANCE_UID]["Value"][0]): str(item[SOP_CLASS_UID]["Value"][0])
                for item in response.json()
                if isinstance(item, dict) and SOP_INSTANCE_UID in item and SOP_CLASS_UID in item
            }
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise VerificationUnanswered("QIDO-RS answer is not a DICOM JSON list") from exc


def no_answer(exc: Exception) -> str:
    """Why a request got no answer, naming a TLS failure (an untrusted certificate, a
    missing client certificate) so the dead letter says what to fix."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return f"TLS: certificate verify failed ({cause.verify_message})"
        if isinstance(cause, ssl.SSLError):
            return (
                f"TLS handshake failed ({getattr(cause, 'reason', None) or type(cause).__name__})"
            )
        cause = cause.__cause__ or cause.__context__
    return f"no answer ({type(exc).__name__})"


def classify(response: httpx.Response, uids: Sequence[str]) -> Answer:
    status = response.status_code
    answer = Answer(status, retry_after_s=_retry_after(response.headers.get("Retry-After")))
    if status in RETRIABLE_HTTP:
        answer.retry = dict.fromkeys(uids, f"HTTP {status}")
        answer.peer_unavailable = True
        return answer
    if status not in (200, 202, 409):
        answer.refused = {uid: (None, f"HTTP {status}") for uid in uids}
        return answer
    try:
        per_instance = parse_response(response.content, response.headers.get("Content-Type"))
    except UnreadableResponse as exc:
        if status == 200:  # stored, but we cannot confirm which: send again (idempotent)
            answer.retry = dict.fromkeys(uids, f"HTTP 200 with {exc}")
        else:
            answer.refused = {uid: (None, f"HTTP {status} with {exc}") for uid in uids}
        return answer
    for uid in uids:
        result: InstanceAnswer | None = per_instance.get(uid)
        if result is None:
            answer.retry[uid] = f"HTTP {status} does not mention the instance"
        elif result.stored or result.failure_reason == StoreStatus.DUPLICATE_SOP_INSTANCE:
            answer.delivered.add(uid)
        elif result.failure_reason is not None and 0xA700 <= result.failure_reason <= 0xA7FF:
            answer.retry[uid] = f"out of resources (0x{result.failure_reason:04X})"
        else:
            reason = result.failure_reason
            shown = f"0x{reason:04X}" if reason is not None else "no reason given"
            answer.refused[uid] = (reason, f"HTTP {status}, FailureReason {shown}")
    return answer
