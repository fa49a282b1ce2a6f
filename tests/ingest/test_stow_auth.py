"""STOW-RS authentication against ingest's real aiohttp receiver on loopback: bearer
tokens minted here (RS256, ES256) and checked against a JWKS served over real HTTP,
API keys, and client certificates on a real TLS listener.

A request that passes authentication is an empty multipart body, which the receiver
answers "the request contains no parts" (400): it got past the door, and no claim
check is needed to tell.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ingest.auth import Authenticator, AuthFailure
from ingest.settings import IngestAuthSettings, IngestSettings
from ingest.stowrs import StowReceiver
from radflow_core.errors import ConfigurationError
from radflow_core.tls import client_context, server_context
from radflow_devstack.issuer import DEV_AUDIENCE, Issuer, IssuerServer, SigningKey
from radflow_devstack.pki import Authority
from support.stow import multipart

PASSED = "the request contains no parts"
API_KEY = "s3cret-site-a-key"


def _settings(**values: Any) -> IngestAuthSettings:
    environ = {IngestAuthSettings.env_name(k): str(v) for k, v in values.items()}
    return IngestAuthSettings.from_env(environ)


class Door:
    """The STOW-RS receiver on a free loopback port, with an authenticator."""

    def __init__(self, auth: IngestAuthSettings, context: ssl.SSLContext | None = None) -> None:
        self.failures: list[AuthFailure] = []
        self.authenticator = Authenticator(
            auth,
            client_certificates=context is not None and context.verify_mode != 0,
            on_failure=self.failures.append,
        )
        self.receiver = StowReceiver(IngestSettings(), None, self.authenticator)  # type: ignore[arg-type]
        self.context = context
        self.port = 0

    async def __aenter__(self) -> Door:
        app = web.Application()
        app.add_routes(self.receiver.routes())
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=self.context)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.authenticator.close()
        await self.runner.cleanup()

    @property
    def url(self) -> str:
        scheme = "https" if self.context else "http"
        return f"{scheme}://127.0.0.1:{self.port}/dicomweb/studies"

    async def post(
        self, authorization: str | None = None, verify: ssl.SSLContext | None = None
    ) -> httpx.Response:
        body, ctype = multipart([])
        headers = {"Content-Type": ctype}
        if authorization is not None:
            headers["Authorization"] = authorization
        async with httpx.AsyncClient(verify=verify or True, timeout=10) as client:
            return await client.post(self.url, content=body, headers=headers)


def passed(response: httpx.Response) -> bool:
    return response.status_code == 400 and response.json()["error"] == PASSED


def challenge(response: httpx.Response) -> str:
    return ", ".join(response.headers.get_list("WWW-Authenticate"))


@pytest.fixture
def issuer_server() -> AsyncIterator[IssuerServer]:
    server = IssuerServer(Issuer("https://idp.example.org/realms/radiology")).start()
    yield server
    server.close()


@pytest.fixture
def jwt_settings(issuer_server: IssuerServer) -> Callable[..., IngestAuthSettings]:
    def make(**more: Any) -> IngestAuthSettings:
        return _settings(
            jwt_issuer=issuer_server.issuer.url,
            jwt_jwks_url=issuer_server.jwks_url,
            **more,
        )

    return make


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_a_token_from_the_issuer_passes_with_either_algorithm(
    issuer_server: IssuerServer, jwt_settings: Callable[..., IngestAuthSettings], alg: str
) -> None:
    issuer = issuer_server.issuer
    key = issuer.rotate(alg)
    async with Door(jwt_settings()) as door:
        response = await door.post(f"Bearer {issuer.token(key=key)}")
    assert passed(response), response.text


def _unsigned(claims: dict[str, Any]) -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def _hs256_with_public_key(issuer: Issuer) -> str:
    """The classic confusion: sign with HMAC, using the published public key as the
    secret (PyJWT refuses to do it knowingly, so it is done by hand)."""
    key = issuer.keys[0]
    public_pem = key.private.public_key().public_bytes(  # type: ignore[union-attr]
        Encoding.PEM, PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
    good = jwt.decode(issuer.token(), options={"verify_signature": False})

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(good).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


BAD_TOKENS: dict[str, Callable[[Issuer], str]] = {
    "expired": lambda i: i.token(exp=int(time.time()) - 120),
    "not yet valid": lambda i: i.token(nbf=int(time.time()) + 600),
    "wrong audience": lambda i: i.token(audience="another-service"),
    "wrong issuer": lambda i: i.token(iss="https://evil.example.org"),
    "wrong key": lambda i: Issuer(
        i.url, [SigningKey(SigningKey.generate().private, i.keys[0].kid)]
    ).token(),
    "alg none": lambda i: _unsigned(jwt.decode(i.token(), options={"verify_signature": False})),
    "HS256 with the public key": _hs256_with_public_key,
    "not a JWT": lambda i: "not.a.token",
    "ES256 naming an RSA key": lambda i: Issuer(
        i.url, [SigningKey(SigningKey.generate("ES256").private, i.rotate("RS256").kid)]
    ).token(),
    "no subject": lambda i: jwt.encode(
        {"iss": i.url, "aud": DEV_AUDIENCE, "exp": int(time.time()) + 60, "scope": "dicom.stow"},
        i.keys[0].private,  # type: ignore[arg-type]
        algorithm=i.keys[0].alg,
        headers={"kid": i.keys[0].kid},
    ),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
async def test_a_bad_token_is_refused_with_401_invalid_token(
    issuer_server: IssuerServer, jwt_settings: Callable[..., IngestAuthSettings], case: str
) -> None:
    token = BAD_TOKENS[case](issuer_server.issuer)
    async with Door(jwt_settings(jwks_min_refresh_s=60)) as door:
        response = await door.post(f"Bearer {token}")
    assert response.status_code == 401, response.text
    assert [(f.status, f.peer_address) for f in door.failures] == [(401, "127.0.0.1")]
    www = challenge(response)
    assert www.startswith('Bearer realm="radflow"'), www
    assert 'error="invalid_token"' in www and "error_description=" in www, www
    assert token not in response.text


async def test_a_token_without_the_scope_is_refused_with_403_insufficient_scope(
    issuer_server: IssuerServer, jwt_settings: Callable[..., IngestAuthSettings]
) -> None:
    async with Door(jwt_settings()) as door:
        response = await door.post(f"Bearer {issuer_server.issuer.token(scope='dicom.read')}")
        with_it = await door.post(
            f"Bearer {issuer_server.issuer.token(scope='dicom.read dicom.stow')}"
        )
    assert response.status_code == 403
    assert 'error="insufficient_scope"' in challenge(response)
    assert passed(with_it)


async def test_no_credentials_get_a_bare_challenge(
    jwt_settings: Callable[..., IngestAuthSettings],
) -> None:
    async with Door(jwt_settings()) as door:
        response = await door.post()
    assert response.status_code == 401
    assert challenge(response) == 'Bearer realm="radflow"'


async def test_an_unknown_key_id_fetches_the_key_set_again_at_most_once_per_interval(
    issuer_server: IssuerServer, jwt_settings: Callable[..., IngestAuthSettings]
) -> None:
    issuer = issuer_server.issuer
    async with Door(jwt_settings(jwks_min_refresh_s=0.5)) as door:
        assert passed(await door.post(f"Bearer {issuer.token()}"))
        assert issuer_server.jwks_fetches == 1
        rotated = issuer.rotate()
        await asyncio.sleep(0.6)
        assert passed(await door.post(f"Bearer {issuer.token(key=rotated)}"))
        assert issuer_server.jwks_fetches == 2
        stranger = SigningKey.generate()
        for _ in range(3):
            response = await door.post(f"Bearer {issuer.token(key=stranger)}")
            assert response.status_code == 401
        assert issuer_server.jwks_fetches == 2, "made-up key ids must not hammer the issuer"


async def test_an_unreachable_issuer_asks_the_sender_to_retry(
    issuer_server: IssuerServer,
) -> None:
    settings = _settings(
        jwt_issuer=issuer_server.issuer.url,
        jwt_jwks_url=issuer_server.jwks_url.replace(str(issuer_server.port), "1"),
        jwks_timeout_s=2,
    )
    async with Door(settings) as door:
        response = await door.post(f"Bearer {issuer_server.issuer.token()}")
    assert response.status_code == 503
    assert response.headers["Retry-After"]


async def test_an_api_key_passes_and_a_wrong_one_is_refused() -> None:
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    settings = _settings(api_keys=f"site-a:{digest}", allowed_identities="apikey:site-a")
    async with Door(settings) as door:
        good = await door.post(f"ApiKey {API_KEY}")
        bad = await door.post(f"ApiKey {API_KEY}x")
        basic = await door.post("Basic dXNlcjpwYXNz")
    assert passed(good)
    assert bad.status_code == 401 and basic.status_code == 401
    assert 'ApiKey realm="radflow"' in challenge(bad)
    assert 'error="invalid_token"' in challenge(bad)


async def test_an_identity_outside_the_allow_list_is_refused_with_403() -> None:
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    settings = _settings(api_keys=f"site-b:{digest}", allowed_identities="apikey:site-a")
    async with Door(settings) as door:
        response = await door.post(f"ApiKey {API_KEY}")
    assert response.status_code == 403


async def test_authentication_mode_none_lets_anyone_in() -> None:
    async with Door(_settings(mode="none")) as door:
        assert passed(await door.post())


async def test_a_client_certificate_on_https_is_an_identity_and_a_token_still_works(
    tmp_path: Path, issuer_server: IssuerServer, jwt_settings: Callable[..., IngestAuthSettings]
) -> None:
    ca = Authority(tmp_path / "ca")
    server = ca.issue("ingest", server=True, file_stem="server")
    client = ca.issue("MODALITY-7", server=False, file_stem="client")
    other = ca.issue("SOMEONE-ELSE", server=False, file_stem="other")
    context = server_context(
        server.cert, server.key, client_ca_file=ca.ca_file, require_client_cert=False
    )
    settings = jwt_settings(allowed_identities="cert:MODALITY-7,jwt:*")
    async with Door(settings, context) as door:
        with_cert = await door.post(
            verify=client_context(ca_file=ca.ca_file, cert_file=client.cert, key_file=client.key)
        )
        other_cert = await door.post(
            verify=client_context(ca_file=ca.ca_file, cert_file=other.cert, key_file=other.key)
        )
        token_only = await door.post(
            f"Bearer {issuer_server.issuer.token()}", verify=client_context(ca_file=ca.ca_file)
        )
        nothing = await door.post(verify=client_context(ca_file=ca.ca_file))
    assert passed(with_cert), with_cert.text
    assert other_cert.status_code == 403, "cert:SOMEONE-ELSE is not on the allow-list"
    assert passed(token_only)
    assert nothing.status_code == 401


async def test_a_certificate_from_an_untrusted_authority_is_refused_in_the_handshake(
    tmp_path: Path,
) -> None:
    ca, rogue = Authority(tmp_path / "ca"), Authority(tmp_path / "rogue", "rogue CA")
    server = ca.issue("ingest", server=True, file_stem="server")
    forged = rogue.issue("MODALITY-7", server=False, file_stem="forged")
    context = server_context(
        server.cert, server.key, client_ca_file=ca.ca_file, require_client_cert=False
    )
    async with Door(_settings(), context) as door:
        with pytest.raises(httpx.HTTPError):
            await door.post(
                verify=client_context(
                    ca_file=ca.ca_file, cert_file=forged.cert, key_file=forged.key
                )
            )


@pytest.mark.parametrize("algorithms", ["HS256", "none", "RS256,HS512"])
def test_symmetric_or_no_signature_algorithms_are_refused_at_start(algorithms: str) -> None:
    with pytest.raises(ConfigurationError, match="JWT_ALGORITHMS"):
        _settings(jwt_algorithms=algorithms)


def test_a_key_set_over_plain_http_is_refused_unless_on_loopback() -> None:
    with pytest.raises(ConfigurationError, match="JWKS_URL"):
        _settings(jwt_issuer="https://idp", jwt_jwks_url="http://idp.example.org/jwks")
    assert _settings(jwt_issuer="http://127.0.0.1:1", jwt_jwks_url="http://127.0.0.1:1/j")
    with pytest.raises(ConfigurationError, match="JWKS_URL"):
        _settings(jwt_issuer="https://idp")


def test_api_keys_are_configured_as_hashes_only() -> None:
    with pytest.raises(ConfigurationError, match="API_KEYS"):
        _settings(api_keys=f"site-a:{API_KEY}")


async def test_a_refused_sender_is_not_invited_to_send_its_body() -> None:
    """``Expect: 100-continue``: the answer to bad credentials comes instead of the
    invitation, so a large body is never uploaded (and never read)."""
    _, ctype = multipart([])
    async with Door(_settings()) as door:
        reader, writer = await asyncio.open_connection("127.0.0.1", door.port)
        writer.write(
            (
                "POST /dicomweb/studies HTTP/1.1\r\nHost: x\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: 1000000000\r\n"
                "Authorization: ApiKey wrong\r\nExpect: 100-continue\r\n\r\n"
            ).encode()
        )
        status = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        await writer.wait_closed()
    assert status.startswith(b"HTTP/1.1 401"), status
