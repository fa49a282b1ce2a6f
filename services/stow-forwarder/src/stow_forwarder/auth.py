"""Authentication to a destination, built from the rule file's references.

OAuth2 client credentials: the token is fetched on first use, cached, refreshed a
minute before it expires (halfway, for tokens shorter-lived than two minutes), and
fetched anew once if the destination answers 401 (it may have been revoked). Secrets
are resolved at start-up and never logged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Mapping

import httpx

from radflow_core.errors import ConfigurationError, PipelineError
from radflow_rules.destinations import Auth, AuthKind


class TokenUnavailable(PipelineError):
    """The OAuth2 token endpoint could not be reached or refused (retriable: the
    endpoint may come back; a refusal of the credentials is logged with its status)."""

    reason = "token_unavailable"
    retriable = True


class BearerAuth(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._header = f"Bearer {token}"

    def auth_flow(self, request: httpx.Request):  # type: ignore[no-untyped-def]
        request.headers["Authorization"] = self._header
        yield request


class ClientCredentials(httpx.Auth):
    """OAuth2 client credentials grant (RFC 6749 §4.4) with a cached token."""

    requires_response_body = False

    def __init__(
        self,
        token_url: str,
        client_id: str,
        client_secret: str,
        scope: str | None,
        client: httpx.AsyncClient,
    ) -> None:
        self._token_url = token_url
        self._form = {"grant_type": "client_credentials"}
        if scope:
            self._form["scope"] = scope
        self._credentials = (client_id, client_secret)
        self._client = client
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()
        self.fetched = 0
        """How many tokens were fetched (for tests and metrics)."""

    async def _fetch(self, force: bool) -> str:
        async with self._lock:
            if not force and self._token and time.monotonic() < self._refresh_at:
                return self._token
            try:
                response = await self._client.post(
                    self._token_url, data=self._form, auth=self._credentials
                )
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
        request.headers["Authorization"] = f"Bearer {await self._fetch(force=False)}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {await self._fetch(force=True)}"
            yield request


def build_auth(
    auth: Auth | None, token_client: httpx.AsyncClient, environ: Mapping[str, str] | None = None
) -> httpx.Auth | None:
    """The httpx auth for a destination.

    Raises:
        ConfigurationError: a referenced secret is missing.
    """
    if auth is None:
        return None
    if auth.kind is AuthKind.BASIC:
        assert auth.username is not None and auth.password is not None
        return httpx.BasicAuth(auth.username, auth.password.resolve(environ))
    if auth.kind is AuthKind.BEARER:
        assert auth.token is not None
        return BearerAuth(auth.token.resolve(environ))
    if auth.kind is AuthKind.OAUTH2:
        assert auth.token_url and auth.client_id and auth.client_secret
        return ClientCredentials(
            auth.token_url,
            auth.client_id,
            auth.client_secret.resolve(environ),
            auth.scope,
            token_client,
        )
    raise ConfigurationError(f"unsupported auth type {auth.kind}")
