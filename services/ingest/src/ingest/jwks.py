"""The issuer's signing keys (a JSON Web Key Set), fetched over HTTP and cached.

Keys are looked up by the token's ``kid``. A known key set is used for
``jwks_cache_s``; a ``kid`` it does not hold fetches it again at once (the issuer has
rotated its key), but at most once per ``jwks_min_refresh_s``, so tokens with made-up
key ids cannot turn ingest into a flood against the issuer. While the issuer is
unreachable the last good key set stays in use; with none at all, tokens cannot be
checked and the sender is asked to retry (503), not told its token is wrong.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

import aiohttp
import jwt

from radflow_core.tls import client_context

log = logging.getLogger(__name__)

KEY_TYPES = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
"""JWK 'kty' each algorithm family signs with: a token's alg must match its key's
type, so an RSA key can never be used as an HMAC secret or the other way round."""
CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}


class KeysUnavailable(Exception):
    """The key set could not be fetched and none is cached (HTTP 503)."""


class UnknownKey(Exception):
    """No key in the issuer's set matches the token's key id and algorithm."""


class Jwks:
    """The cached key set of one issuer; one per process, shared by every request."""

    def __init__(
        self,
        url: str,
        *,
        cache_s: float,
        min_refresh_s: float,
        timeout_s: float,
        ca_file: Any = None,
    ) -> None:
        self._url = url
        self._cache_s = cache_s
        self._min_refresh_s = min_refresh_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._ssl: ssl.SSLContext | None = (
            client_context(ca_file=ca_file) if url.startswith("https://") else None
        )
        self._keys: list[jwt.PyJWK] = []
        self._fetched_at: float | None = None
        self._tried_at = float("-inf")
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key that signed a token with header ``kid`` and ``alg``.

        Raises:
            UnknownKey: no such key, even after a refresh.
            KeysUnavailable: no key set could be fetched.
        """
        if self._fetched_at is None or time.monotonic() - self._fetched_at > self._cache_s:
            await self._refresh()
        found = self._find(kid, alg)
        if found is None and time.monotonic() - self._tried_at >= self._min_refresh_s:
            await self._refresh()
            found = self._find(kid, alg)
        if found is None:
            if self._fetched_at is None:
                raise KeysUnavailable("the issuer's key set could not be fetched")
            raise UnknownKey(f"no key {kid!r} for {alg} in the issuer's key set")
        return found

    def _find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        candidates = [k for k in self._keys if _fits(k, alg)]
        if kid is None:
            return candidates[0] if len(candidates) == 1 else None
        return next((k for k in candidates if k.key_id == kid), None)

    async def _refresh(self) -> None:
        """Fetch the key set again, at most once per ``min_refresh_s`` (also while the
        issuer is down), one request at a time: callers that waited on the lock use
        what the first fetched."""
        started = time.monotonic()
        async with self._lock:
            if self._tried_at >= started or started - self._tried_at < self._min_refresh_s:
                return
            self._tried_at = time.monotonic()
            try:
                data = await self._fetch()
                keys = jwt.PyJWKSet.from_dict(data).keys
            except (
                aiohttp.ClientError,
                TimeoutError,
                ValueError,
                TypeError,
                jwt.PyJWKSetError,
            ) as exc:
                log.warning(
                    "the issuer's key set could not be fetched; the cached one stays in use",
                    extra={"error_type": type(exc).__name__, "count": len(self._keys)},
                )
                return
            self._keys = [k for k in keys if k.public_key_use in (None, "sig")]
            self._fetched_at = time.monotonic()
            log.info("issuer key set fetched", extra={"count": len(self._keys), "url": self._url})

    async def _fetch(self) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._session.get(self._url, ssl=self._ssl or True) as response:
            response.raise_for_status()
            data = await response.json(content_type=None)
        if not isinstance(data, dict):
            raise TypeError("the key set is not a JSON object")
        return data

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _fits(key: jwt.PyJWK, alg: str) -> bool:
    """Whether ``key`` may verify a signature made with ``alg``: its type (and curve)
    must be the algorithm's, and a key that names its own algorithm must name this."""
    data = key._jwk_data
    if KEY_TYPES.get(alg[:2]) != data.get("kty"):
        return False
    if alg in CURVES and data.get("crv") != CURVES[alg]:
        return False
    return data.get("alg") in (None, alg)
