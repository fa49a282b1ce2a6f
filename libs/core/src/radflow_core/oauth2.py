"""OAuth2 client credentials (RFC 6749 §4.4) for httpx, shared by every service that
calls an HTTP peer guarded by a token: the forwarder's DICOMweb destinations and
report-return's FHIR servers.

The client authenticates either with a secret (HTTP Basic, RFC 6749 §2.3.1) or, as
SMART Backend Services ask, with a signed JWT assertion (``private_key_jwt``,
RFC 7523: RS384 or ES384, a fresh ``jti`` and a 5-minute ``exp`` per request). The
token is fetched on first use, cached, refreshed a minute before it expires (halfway,
for tokens shorter-lived than two minutes), and fetched anew once if the peer answers
401 (it may have been revoked). Secrets and keys are never logged.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, Generator
from dataclasses import dataclass

import httpx
import jwt

from radflow_core.errors import ConfigurationError, PipelineError

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_ALGORITHMS = ("RS384", "ES384")
"""What SMART Backend Services require a client to support (one of them)."""
ASSERTION_LIFETIME_S = 300
"""SMART: the assertion's ``exp`` is no more than five minutes ahead."""


class TokenUnavailable(PipelineError):
    """The OAuth2 token endpoint could not be reached or refused (retriable: the
    endpoint may come back; a refusal of the credentials is logged with its status)."""

    reason = "token_unavailable"
    retriable = True


class BearerAuth(httpx.Auth):
    """A fixed bearer token."""

    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        request.headers["Authorization"] = self._header
        yield request


@dataclass(frozen=True)
class JwtAssertion:
    """Signs the client assertion of SMART Backend Services (``private_key_jwt``)."""

    private_key_pem: str
    algorithm: str = "RS384"
    key_id: str | None = None
    """The ``kid`` of the key in the JWKS the authorization server knows for us."""
    jwks_url: str | None = None
    """Put in the header as ``jku`` when the server fetches our JWKS from a URL."""

    def __post_init__(self) -> None:
        if self.algorithm not in ASSERTION_ALGORITHMS:
            raise ConfigurationError(
                f"client assertion algorithm must be one of {', '.join(ASSERTION_ALGORITHMS)}"
            )
        try:
            jwt.encode({}, self.private_key_pem, algorithm=self.algorithm)
        except (ValueError, TypeError, jwt.PyJWTError) as exc:
            raise ConfigurationError(
                f"the private key cannot sign {self.algorithm} ({type(exc).__name__})"
            ) from None

    def sign(self, client_id: str, token_url: str) -> str:
        now = int(time.time())
        headers: dict[str, str] = {"typ": "JWT"}
        if self.key_id:
            headers["kid"] = self.key_id
        if self.jwks_url:
            headers["jku"] = self.jwks_url
        claims = {
            "iss": client_id,
            "sub": client_id,
            "aud": token_url,
            "exp": now + ASSERTION_LIFETIME_S,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.private_key_pem, algorithm=self.algorithm, headers=headers)


class ClientCredentials(httpx.Auth):
    """OAuth2 client credentials grant with a cached token; the client proves itself
    with ``client_secret`` or, when ``assertion`` is given, a signed JWT."""

    requires_response_body = False

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str | None,
        scope: str | None,
        client: httpx.AsyncClient,
        *,
        assertion: JwtAssertion | None = None,
    ) -> None:
        if (client_secret is None) == (assertion is None):
            raise ConfigurationError("client credentials need a secret or an assertion key")
        self._token_url = token_url
        self._client_id = client_id
        self._form = {"grant_type": "client_credentials"}
        if scope:
            self._form["scope"] = scope
        self._secret = client_secret
        self._assertion = assertion
        self._client = client
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self.fetched = 0
        """How many tokens were fetched (for tests and metrics)."""

    async def _request(self) -> httpx.Response:
        if self._assertion is not None:
            form = {
                **self._form,
                "client_assertion_type": ASSERTION_TYPE,
                "client_assertion": self._assertion.sign(self._client_id, self._token_url),
            }
            return await self._client.post(self._token_url, data=form)
        assert self._secret is not None
        return await self._client.post(
            self._token_url, data=self._form, auth=(self._client_id, self._secret)
        )

    async def token(self, *, force: bool = False) -> str:
        """The cached token, or a new one when it is due (or ``force``).

        Raises:
            TokenUnavailable: the endpoint is unreachable, refused, or answered nonsense.
        """
        async with self._lock:
            if not force and self._token and time.monotonic() < self._refresh_at:
                return self._token
            try:
                response = await self._request()
            except httpx.HTTPError as exc:
                raise TokenUnavailable(f"token endpoint: {type(exc).__name__}") from exc
            if response.status_code != 200:
                raise TokenUnavailable(f"token endpoint answered {response.status_code}")
            try:
                body = response.json()
                token = str(body["access_token"])
                lifetime = float(body.get("expires_in", 300))
            except (ValueError, KeyError, TypeError):
                raise TokenUnavailable("token endpoint answer has no access_token") from None
            # A minute early, or halfway for short-lived tokens, so a request never
            # leaves with a token that expires on the way.
            self._token = token
            self._refresh_at = time.monotonic() + lifetime - min(60.0, lifetime / 2)
            self.fetched += 1
            return token

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        request.headers["Authorization"] = f"Bearer {await self.token()}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {await self.token(force=True)}"
            yield request
