"""An OAuth2 authorization server (client credentials grant, RFC 6749 §4.4) guarding a
real DICOMweb server: the cloud destination that wants a bearer token.

Token issuing and checking are oauthlib's (a third-party implementation of the RFC),
not ours; this module only keeps the tokens and relays authorised requests to the
upstream server (Orthanc). Tokens can be made short-lived and revoked, so a test can
watch the forwarder refresh and recover.
"""

from __future__ import annotations

import http.client
import threading
import time
from base64 import b64decode
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from oauthlib.oauth2 import BackendApplicationServer, RequestValidator

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host"}


@dataclass
class _Client:
    client_id: str


class _Validator(RequestValidator):  # type: ignore[misc]
    def __init__(self, clients: dict[str, str], lifetime_s: int) -> None:
        self.clients = clients
        self.lifetime_s = lifetime_s
        self.tokens: dict[str, float] = {}
        self.lock = threading.Lock()

    def authenticate_client(self, request: Any, *args: Any, **kwargs: Any) -> bool:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        client_id, _, secret = b64decode(header[6:]).decode().partition(":")
        if self.clients.get(client_id) != secret:
            return False
        request.client = _Client(client_id)
        request.client_id = client_id
        return True

    def validate_grant_type(self, client_id: str, grant_type: str, *args: Any) -> bool:
        return grant_type == "client_credentials"

    def validate_scopes(self, client_id: str, scopes: list[str], *args: Any) -> bool:
        return set(scopes) <= {"dicom"}

    def get_default_scopes(self, client_id: str, request: Any, *args: Any) -> list[str]:
        return ["dicom"]

    def save_bearer_token(self, token: dict[str, Any], request: Any, *args: Any) -> None:
        with self.lock:
            self.tokens[token["access_token"]] = time.monotonic() + self.lifetime_s

    def validate_bearer_token(self, token: str, scopes: list[str], request: Any) -> bool:
        with self.lock:
            expires = self.tokens.get(token)
        return expires is not None and time.monotonic() < expires


class OAuthGateway:
    """``/token`` issues tokens; every other path goes to ``upstream_port`` if the
    request carries a valid bearer token, and is answered 401 otherwise."""

    def __init__(self, upstream_port: int, clients: dict[str, str], lifetime_s: int) -> None:
        self.validator = _Validator(clients, lifetime_s)
        self.server = BackendApplicationServer(self.validator, token_expires_in=lifetime_s)
        self.upstream_port = upstream_port
        self.issued = 0
        self.refused_tokens = 0
        self.refused_clients = 0
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/token":
                    gateway._token(self, body)
                else:
                    gateway._relay(self, body)

            def do_GET(self) -> None:
                gateway._relay(self, b"")

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self.port = self._http.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._http.serve_forever, daemon=True).start()

    def revoke_all(self) -> None:
        with self.validator.lock:
            self.validator.tokens.clear()

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()

    def _token(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        headers, text, status = self.server.create_token_response(
            f"{self.url}/token", "POST", body.decode(), dict(handler.headers)
        )
        if status == 200:
            self.issued += 1
        else:
            self.refused_clients += 1
        self._answer(handler, status, headers, text.encode())

    def _relay(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        valid, _ = self.server.verify_request(
            f"{self.url}{handler.path}", handler.command, None, dict(handler.headers), ["dicom"]
        )
        if not valid:
            self.refused_tokens += 1
            self._answer(handler, 401, {"WWW-Authenticate": 'Bearer error="invalid_token"'}, b"")
            return
        upstream = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
        headers = {
            k: v
            for k, v in handler.headers.items()
            if k.lower() not in _HOP_BY_HOP and k.lower() != "authorization"
        }
        upstream.request(handler.command, handler.path, body=body, headers=headers)
        response = upstream.getresponse()
        content = response.read()
        kept = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_BY_HOP}
        kept.pop("Content-Length", None)
        upstream.close()
        self._answer(handler, response.status, kept, content)

    @staticmethod
    def _answer(
        handler: BaseHTTPRequestHandler, status: int, headers: dict[str, str], body: bytes
    ) -> None:
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
