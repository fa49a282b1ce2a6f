"""Authentication to a destination, built from the rule file's references.

OAuth2 client credentials are radflow_core.oauth2's (shared with report-return's FHIR
servers): the token is cached, refreshed before it expires, and fetched anew once on a
401. Secrets are resolved at start-up and never logged.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx

from radflow_core.errors import ConfigurationError
from radflow_core.oauth2 import BearerAuth, ClientCredentials, TokenUnavailable
from radflow_rules.destinations import Auth, AuthKind


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


__all__ = ["BearerAuth", "ClientCredentials", "TokenUnavailable", "build_auth"]
