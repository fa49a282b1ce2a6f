"""A development OAuth2/OIDC issuer: signing keys, a JWKS served over HTTP, and tokens.

``make run`` serves one on 127.0.0.1:8086 with its key kept under ``.run/auth/``
(created the first time), and ingest accepts its tokens; ``python -m radflow_devstack
token`` prints one. Tests make their own on a free port, with RS256 or ES256 keys they
can rotate. It issues whatever it is asked for: this is never a production issuer.

    python -m radflow_devstack.issuer --port 8086 --folder .run/auth
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

DEV_PORT = 8086
DEV_AUDIENCE = "radflow-ingest"
"""What ingest expects in 'aud' (RADFLOW_INGEST_AUTH_JWT_AUDIENCE's default)."""
DEV_SCOPE = "dicom.stow"
"""The scope STOW-RS needs (RADFLOW_INGEST_AUTH_JWT_REQUIRED_SCOPE's default)."""
KEY_FILE = "issuer-key.pem"
JWKS_PATH = "/jwks.json"


def dev_issuer_url(port: int = DEV_PORT) -> str:
    return f"http://127.0.0.1:{port}"


class SigningKey:
    """One private key with its key id and algorithm (RS256 or ES256)."""

    def __init__(self, private: PrivateKeyTypes, kid: str | None = None) -> None:
        self.private = private
        self.alg = "ES256" if isinstance(private, ec.EllipticCurvePrivateKey) else "RS256"
        self.kid = kid or uuid.uuid4().hex[:16]

    @classmethod
    def generate(cls, alg: str = "ES256") -> SigningKey:
        if alg == "RS256":
            return cls(rsa.generate_private_key(public_exponent=65537, key_size=2048))
        if alg == "ES256":
            return cls(ec.generate_private_key(ec.SECP256R1()))
        raise ValueError(f"only RS256 and ES256 keys, not {alg}")

    def public_jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.alg)
        jwk = json.loads(algorithm.to_jwk(self.private.public_key()))
        return {**jwk, "kid": self.kid, "alg": self.alg, "use": "sig"}

    def pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class Issuer:
    """Signs tokens as ``url``; :attr:`keys` (newest first) are what its JWKS lists."""

    def __init__(self, url: str, keys: list[SigningKey] | None = None) -> None:
        self.url = url
        self.keys = keys or [SigningKey.generate()]

    @classmethod
    def kept_in(cls, folder: Path, url: str) -> Issuer:
        """The issuer whose key is ``folder/issuer-key.pem``, created the first time."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / KEY_FILE
        if not path.exists():
            key = SigningKey.generate()
            path.touch(mode=0o600)
            path.write_bytes(key.pem())
        private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        public = private.public_key()
        assert isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        kid = jwt.utils.base64url_encode(der[-12:]).decode()  # stable across restarts
        return cls(url, [SigningKey(private, kid)])

    def rotate(self, alg: str | None = None) -> SigningKey:
        """A new signing key, published beside the old ones."""
        key = SigningKey.generate(alg or self.keys[0].alg)
        self.keys.insert(0, key)
        return key

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.keys]}

    def token(
        self,
        *,
        subject: str = "developer",
        scope: str = DEV_SCOPE,
        audience: str = DEV_AUDIENCE,
        ttl_s: float = 3600,
        key: SigningKey | None = None,
        **claims: Any,
    ) -> str:
        """A signed access token; ``claims`` override or add to the standard ones."""
        key = key or self.keys[0]
        now = int(time.time())
        payload = {
            "iss": self.url,
            "sub": subject,
            "aud": audience,
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl_s),
            "scope": scope,
            "jti": uuid.uuid4().hex,
            **claims,
        }
        return jwt.encode(payload, key.private, algorithm=key.alg, headers={"kid": key.kid})  # type: ignore[arg-type]


class IssuerServer:
    """Serves an issuer's JWKS (and a minimal OIDC discovery document) on loopback
    from a thread; counts the JWKS fetches."""

    def __init__(self, issuer: Issuer, port: int = 0) -> None:
        self.issuer = issuer
        self.jwks_fetches = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == JWKS_PATH:
                    server.jwks_fetches += 1
                    body = server.issuer.jwks()
                elif self.path == "/.well-known/openid-configuration":
                    body = {"issuer": server.issuer.url, "jwks_uri": server.jwks_url}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = int(self._http.server_address[1])
        self._thread = threading.Thread(
            target=self._http.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.port}{JWKS_PATH}"

    def start(self) -> IssuerServer:
        """Serve from a thread (tests)."""
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Serve from this thread (the make run process)."""
        self._http.serve_forever()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()


def ingest_env(issuer_url: str, jwks_url: str) -> dict[str, str]:
    """The settings that make ingest accept the tokens of the issuer at ``issuer_url``."""
    return {
        "RADFLOW_INGEST_AUTH_JWT_ISSUER": issuer_url,
        "RADFLOW_INGEST_AUTH_JWT_JWKS_URL": jwks_url,
        "RADFLOW_INGEST_AUTH_JWT_AUDIENCE": DEV_AUDIENCE,
        "RADFLOW_INGEST_AUTH_JWT_REQUIRED_SCOPE": DEV_SCOPE,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m radflow_devstack.issuer", description="serve the development JWKS"
    )
    parser.add_argument("--port", type=int, default=DEV_PORT)
    parser.add_argument("--folder", type=Path, default=Path(".run/auth"))
    args = parser.parse_args(argv)
    issuer = Issuer.kept_in(args.folder, dev_issuer_url(args.port))
    server = IssuerServer(issuer, args.port)
    print(f"issuer {issuer.url} serving {server.jwks_url}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
