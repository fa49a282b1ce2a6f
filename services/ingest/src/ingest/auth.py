"""Who is sending: STOW-RS authentication, checked before a byte of the body is read.

A request proves an identity in one of three ways (docs/security.md):

- ``Authorization: Bearer <JWT>`` from the configured OAuth2/OIDC issuer, verified
  against its JWKS: signature (public-key algorithms only, the key's type matching
  the token's ``alg``), ``iss``, ``aud``, ``exp``/``nbf`` with a small leeway, and the
  required scope. Identity ``jwt:<issuer>#<sub>``.
- ``Authorization: ApiKey <key>``, compared in constant time with configured SHA-256
  hashes. Identity ``apikey:<name>``.
- a client certificate on the HTTPS door, verified by the TLS handshake against the
  client CA. Identity ``cert:<CN>``.

Credentials in the header win over a certificate: a wrong token is refused even on a
verified TLS connection. Failures answer 401 (403 for a missing scope or an identity
outside the allow-list) with an RFC 6750 ``WWW-Authenticate`` challenge, are counted
by reason, logged without the credential, and handed to the authentication-failure
hook (the audit trail).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import jwt
from aiohttp import web

from ingest import metrics
from ingest.jwks import Jwks, KeysUnavailable, UnknownKey
from ingest.settings import AuthMode, IngestAuthSettings, parse_api_key
from radflow_core.tls import peer_common_name

log = logging.getLogger(__name__)

REALM = "radflow"


class AuthError(Exception):
    """A request that may not proceed. ``reason`` is the metric label (never PHI, never
    a credential); the message is the error_description sent back."""

    status: ClassVar[int] = 401
    error: ClassVar[str | None] = "invalid_token"

    def __init__(self, reason: str, description: str) -> None:
        super().__init__(description)
        self.reason = reason


class MissingCredentials(AuthError):
    """No credential at all: the challenge carries no error code (RFC 6750 §3.1)."""

    error = None


class InvalidCredentials(AuthError):
    """A token or key that is malformed, expired, not ours or not trusted."""


class InsufficientScope(AuthError):
    """A valid token without the required scope."""

    status = 403
    error = "insufficient_scope"


class NotAllowed(AuthError):
    """An authenticated identity outside STOW-RS's allow-list."""

    status = 403
    error = None


class IssuerUnavailable(AuthError):
    """The issuer's keys cannot be fetched: the sender should retry (503)."""

    status = 503
    error = None


@dataclass(frozen=True)
class AuthFailure:
    """What the authentication-failure hook receives: no credential, no PHI."""

    reason: str
    status: int
    peer_address: str | None
    protocol: str = "stow-rs"


AuthFailureHook = Callable[[AuthFailure], None]
"""Called once per refused request (must not raise); the audit trail's
'authentication failure' event is emitted from here."""


class Authenticator:
    """Checks each STOW-RS request's credentials; one per process."""

    def __init__(
        self,
        settings: IngestAuthSettings,
        *,
        client_certificates: bool = False,
        on_failure: AuthFailureHook | None = None,
    ) -> None:
        self._settings = settings
        self._client_ca = client_certificates
        self._on_failure = on_failure
        self._api_keys = load_api_keys(settings)
        self._jwks = (
            Jwks(
                settings.jwt_jwks_url,
                cache_s=settings.jwks_cache_s,
                min_refresh_s=settings.jwks_min_refresh_s,
                timeout_s=settings.jwks_timeout_s,
                ca_file=settings.jwks_ca_file,
            )
            if settings.jwt_issuer
            else None
        )

    @property
    def enabled(self) -> bool:
        return self._settings.mode is AuthMode.REQUIRED

    @property
    def configured(self) -> bool:
        """Whether any method can succeed (an issuer, API keys, or certificates)."""
        return bool(self._jwks or self._api_keys or self._client_ca)

    def describe(self) -> str:
        """The methods configured, for the start-up log (no secrets)."""
        settings = self._settings
        return (
            f"mode {settings.mode.value}; bearer tokens from {settings.jwt_issuer or 'no issuer'}"
            f"; {len(self._api_keys)} API keys; client certificates "
            f"{'accepted on HTTPS' if self._client_ca else 'not asked for'}; "
            + (
                f"{len(settings.allowed_identities)} allowed identity patterns"
                if settings.allowed_identities
                else "any authenticated identity allowed"
            )
        )

    async def identify(self, request: web.Request) -> str | None:
        """The identity proven by ``request`` (None when authentication is off).

        Raises:
            AuthError: the request may not proceed; the caller answers with
                :func:`refusal`.
        """
        if not self.enabled:
            return None
        try:
            identity = await self._identity(request)
            patterns = self._settings.allowed_identities
            if patterns and not any(fnmatch.fnmatchcase(identity, p) for p in patterns):
                raise NotAllowed("not_allowed", "this identity may not store instances")
        except AuthError as exc:
            self._failed(exc, request)
            raise
        return identity

    async def _identity(self, request: web.Request) -> str:
        header = request.headers.get("Authorization", "")
        scheme, _, credential = header.strip().partition(" ")
        credential = credential.strip()
        if header:
            if scheme.lower() == "bearer" and credential:
                return await self._bearer(credential)
            if scheme.lower() == "apikey" and credential:
                return self._api_key(credential)
            raise InvalidCredentials("unsupported_scheme", "expected Bearer or ApiKey credentials")
        common_name = _client_certificate_cn(request)
        if common_name is not None:
            return f"cert:{common_name}"
        raise MissingCredentials("missing", "authentication required")

    async def _bearer(self, token: str) -> str:
        settings = self._settings
        if self._jwks is None:
            raise InvalidCredentials("bearer_not_configured", "bearer tokens are not accepted")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidCredentials("malformed", "the token is not a JWT") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in settings.jwt_algorithms:
            raise InvalidCredentials("algorithm", "the token's signing algorithm is not accepted")
        kid = header.get("kid")
        try:
            key = await self._jwks.key(kid if isinstance(kid, str) else None, alg)
        except UnknownKey:
            raise InvalidCredentials("unknown_key", "the token's signing key is unknown") from None
        except KeysUnavailable:
            raise IssuerUnavailable(
                "issuer_unavailable", "the issuer's keys cannot be fetched"
            ) from None
        try:
            claims = jwt.decode(
                token,
                key=key.key,
                algorithms=[alg],
                audience=settings.jwt_audience,
                issuer=settings.jwt_issuer,
                leeway=settings.jwt_leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidCredentials("expired", "the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidCredentials("not_yet_valid", "the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise InvalidCredentials("audience", "the token is for another audience") from None
        except jwt.InvalidIssuerError:
            raise InvalidCredentials("issuer", "the token is from another issuer") from None
        except jwt.InvalidSignatureError:
            raise InvalidCredentials("signature", "the token's signature is invalid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidCredentials("claims", f"the token has no {exc.claim!r} claim") from None
        except jwt.PyJWTError:
            raise InvalidCredentials("malformed", "the token is invalid") from None
        scope = settings.jwt_required_scope
        if scope and scope not in _scopes(claims):
            raise InsufficientScope("scope", f"the token lacks the scope {scope!r}")
        return f"jwt:{settings.jwt_issuer}#{claims['sub']}"

    def _api_key(self, key: str) -> str:
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for name, expected in self._api_keys:  # every entry compared: constant time
            if hmac.compare_digest(digest, expected) and found is None:
                found = name
        if found is None:
            raise InvalidCredentials("api_key", "the API key is not valid")
        return f"apikey:{found}"

    def _failed(self, exc: AuthError, request: web.Request) -> None:
        metrics.AUTH_FAILURES.labels(exc.reason).inc()
        log.warning(
            "STOW-RS request refused: %s",
            exc,
            extra={
                "http_status": exc.status,
                "reason": exc.reason,
                "protocol": "stow-rs",
                "peer_address": request.remote,
            },
        )
        if self._on_failure is not None:
            failure = AuthFailure(exc.reason, exc.status, request.remote)
            try:
                self._on_failure(failure)
            except Exception:
                log.exception("the authentication-failure hook failed")

    def refusal(self, exc: AuthError) -> web.Response:
        return refusal(exc, api_keys=bool(self._api_keys))

    async def close(self) -> None:
        if self._jwks is not None:
            await self._jwks.close()


def refusal(exc: AuthError, *, api_keys: bool) -> web.Response:
    """The answer to a refused request: its status with an RFC 6750 challenge (and an
    ApiKey one where keys are configured). The connection is closed so that an unread
    body is not taken in."""
    params = [f'realm="{REALM}"']
    if exc.error is not None:
        params.append(f'error="{exc.error}"')
        params.append(f'error_description="{_quoted(str(exc))}"')
    response = web.json_response({"error": str(exc)}, status=exc.status)
    if exc.status in (401, 403):
        response.headers.add("WWW-Authenticate", "Bearer " + ", ".join(params))
        if api_keys and exc.status == 401:
            response.headers.add("WWW-Authenticate", f'ApiKey realm="{REALM}"')
    if exc.status == 503:
        response.headers["Retry-After"] = "30"
    response.force_close()
    return response


def load_api_keys(settings: IngestAuthSettings) -> list[tuple[str, bytes]]:
    """The configured API key hashes: the setting's and the file's (read once at
    start; a rotated file takes effect on restart)."""
    entries = list(settings.api_keys)
    if settings.api_keys_file is not None:
        for line in Path(settings.api_keys_file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                entries.append(line)
    return [parse_api_key(entry) for entry in entries]


def _scopes(claims: dict[str, Any]) -> set[str]:
    """The token's scopes: 'scope' (space-separated, RFC 8693) or 'scp' (a list or a
    string, as some issuers send)."""
    found: set[str] = set()
    for claim in ("scope", "scp"):
        value = claims.get(claim)
        if isinstance(value, str):
            found.update(value.split())
        elif isinstance(value, list):
            found.update(v for v in value if isinstance(v, str))
    return found


def _client_certificate_cn(request: web.Request) -> str | None:
    """The CN of a client certificate the TLS handshake verified (HTTPS door only)."""
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is None:
        return None
    return peer_common_name(transport.get_extra_info("peercert"))


def _quoted(text: str) -> str:
    return text.replace("\\", "").replace('"', "'")
