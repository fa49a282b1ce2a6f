"""A small FHIR R4 server for DiagnosticReports, with an OAuth2 token endpoint: the EHR
that report-return's tests (and a developer) send FHIR reports to.

It is real HTTP on a loopback port (``http.server`` in a thread) and applies the
semantics report-return relies on, as the FHIR R4 RESTful API defines them:

- ``POST /fhir/DiagnosticReport`` with ``If-None-Exist: identifier=system|value``: no
  match creates (201 Created, Location with ``_history/1``); one match creates nothing
  and answers 200 OK with its Location; several answer 412 Precondition Failed.
- ``PUT /fhir/DiagnosticReport?identifier=system|value``: no match creates (201), one
  is updated (200, a new version), several answer 412.
- ``GET /fhir/DiagnosticReport?identifier=...`` (a searchset Bundle) and ``GET
  /fhir/DiagnosticReport/<id>``.
- ``POST /token``: OAuth2 client credentials, the client proved by HTTP Basic (a
  secret) or by a signed JWT assertion (SMART Backend Services, RS384/ES384, checked
  against the client's public key). Tokens expire after ``token_lifetime_s``; with
  ``clients`` set, every FHIR request needs a live bearer token (401 otherwise).

Every request is recorded (:attr:`received`), and the next answers can be scripted:
``"drop"`` commits the request and then closes the connection without answering (a
lost response), ``"503"`` refuses it with 503, ``Outcome(422, "...")`` refuses it with
an OperationOutcome. It keeps everything in memory: never a production server.
"""

from __future__ import annotations

import base64
import json
import ssl
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import jwt

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


@dataclass(frozen=True)
class Outcome:
    """Answer with this HTTP status and an OperationOutcome (nothing is stored)."""

    status: int
    text: str
    code: str = "invalid"
    expression: tuple[str, ...] = ()


Action = str | Outcome
"""``"ok"``, ``"drop"``, ``"503"`` or an :class:`Outcome`."""


@dataclass
class Received:
    """One request to the FHIR endpoint, as it arrived."""

    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any] | None
    answered: int | None = None
    """The status answered (None when the response was dropped)."""


@dataclass
class _Stored:
    id: str
    versions: list[dict[str, Any]] = field(default_factory=list)

    @property
    def current(self) -> dict[str, Any]:
        return self.versions[-1]


def _split(param: str) -> tuple[str | None, str]:
    """(system, value) of a token search parameter ``system|value`` (FHIR escapes)."""
    parts, current, escaped = [], "", False
    for char in param:
        if escaped:
            current += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "|":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    if len(parts) == 1:
        return None, parts[0]
    return parts[0], "|".join(parts[1:])


class FhirServer:
    """``base_url`` is the FHIR base; ``token_url`` the token endpoint."""

    def __init__(
        self,
        *,
        clients: dict[str, str] | None = None,
        assertion_keys: dict[str, str] | None = None,
        token_lifetime_s: float = 300,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """``clients``: client id → secret; ``assertion_keys``: client id → public key
        (PEM) of SMART clients. Without either, no token is needed. ``tls``: serve
        HTTPS with this server context."""
        self.clients = dict(clients or {})
        self.assertion_keys = dict(assertion_keys or {})
        self.token_lifetime_s = token_lifetime_s
        self.received: list[Received] = []
        self.tokens_issued = 0
        self.tokens_refused = 0
        self.unauthorized = 0
        self._tokens: dict[str, float] = {}
        self._store: dict[str, _Stored] = {}
        self._script: deque[Action] = deque()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:
                server._handle(self)

            def do_PUT(self) -> None:
                server._handle(self)

            def do_GET(self) -> None:
                server._handle(self)

        self._http = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._http.daemon_threads = True
        if tls is not None:
            self._http.socket = tls.wrap_socket(self._http.socket, server_side=True)
        self._scheme = "https" if tls is not None else "http"
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self._scheme}://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/fhir"

    @property
    def token_url(self) -> str:
        return f"{self.url}/token"

    def start(self) -> FhirServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; safe to call twice."""
        if self._thread.is_alive():
            self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> FhirServer:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def script(self, *actions: Action) -> None:
        """Answer the next requests to the FHIR endpoint so, in order; then normally."""
        with self._lock:
            self._script.extend(actions)

    def revoke_tokens(self) -> None:
        with self._lock:
            self._tokens.clear()

    def seed(self, body: dict[str, Any]) -> str:
        """Store a DiagnosticReport as if another sender had created it; its id."""
        with self._lock:
            return self._create(body).id

    def reports(self) -> list[dict[str, Any]]:
        """The current version of every stored DiagnosticReport."""
        with self._lock:
            return [s.current for s in self._store.values()]

    def versions(self, resource_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._store[resource_id].versions)

    # -- HTTP --------------------------------------------------------------------

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        parts = urlsplit(handler.path)
        if parts.path == "/token" and handler.command == "POST":
            self._token(handler, raw)
            return
        if not parts.path.startswith("/fhir/DiagnosticReport"):
            self._answer(handler, 404, self._outcome("not-found", "unknown path"))
            return
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        record = Received(
            handler.command, handler.path, {k: v for k, v in handler.headers.items()}, body
        )
        with self._lock:
            self.received.append(record)
        if (self.clients or self.assertion_keys) and not self._authorized(handler):
            with self._lock:
                self.unauthorized += 1
            record.answered = 401
            self._answer(
                handler,
                401,
                self._outcome("login", "invalid token"),
                {"WWW-Authenticate": "Bearer"},
            )
            return
        with self._lock:
            action: Action = self._script.popleft() if self._script else "ok"
        if action == "503":
            record.answered = 503
            self._answer(handler, 503, self._outcome("transient", "busy"))
            return
        if isinstance(action, Outcome):
            record.answered = action.status
            self._answer(
                handler,
                action.status,
                self._outcome(action.code, action.text, action.expression),
            )
            return
        status, body_out, headers = self._apply(
            handler.command, parts.path, parts.query, handler, body
        )
        if action == "drop":
            # Committed; the answer is lost on the way back.
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        record.answered = status
        self._answer(handler, status, body_out, headers)

    def _apply(
        self,
        method: str,
        path: str,
        query: str,
        handler: BaseHTTPRequestHandler,
        body: dict[str, Any] | None,
    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
        params = {k: v[0] for k, v in parse_qs(query).items()}
        rest = path[len("/fhir/DiagnosticReport") :].strip("/")
        with self._lock:
            if method == "GET":
                if rest:
                    stored = self._store.get(rest)
                    if stored is None:
                        return 404, self._outcome("not-found", "no such report"), {}
                    return 200, stored.current, {}
                found = self._matching(params.get("identifier"))
                return 200, self._bundle([s.current for s in found]), {}
            if body is None or body.get("resourceType") != "DiagnosticReport":
                return 400, self._outcome("structure", "not a DiagnosticReport"), {}
            if method == "POST" and not rest:
                condition = handler.headers.get("If-None-Exist")
                if condition:
                    query_params = {k: v[0] for k, v in parse_qs(condition).items()}
                    found = self._matching(query_params.get("identifier"))
                    if len(found) > 1:
                        return 412, self._outcome("duplicate", "several match"), {}
                    if found:
                        return 200, None, self._location(found[0])
                return 201, None, self._location(self._create(body))
            if method == "PUT":
                if rest:
                    found = [self._store[rest]] if rest in self._store else []
                else:
                    if "identifier" not in params:
                        return 400, self._outcome("required", "no search criteria"), {}
                    found = self._matching(params["identifier"])
                if len(found) > 1:
                    return 412, self._outcome("duplicate", "several match"), {}
                if not found:
                    return 201, None, self._location(self._create(body, rest or None))
                stored = found[0]
                stored.versions.append(self._versioned(body, stored.id, len(stored.versions) + 1))
                return 200, None, self._location(stored)
        return 405, self._outcome("not-supported", "method not supported"), {}

    def _create(self, body: dict[str, Any], resource_id: str | None = None) -> _Stored:
        stored = _Stored(resource_id or uuid.uuid4().hex[:16])
        stored.versions.append(self._versioned(body, stored.id, 1))
        self._store[stored.id] = stored
        return stored

    @staticmethod
    def _versioned(body: dict[str, Any], resource_id: str, version: int) -> dict[str, Any]:
        meta = {**(body.get("meta") or {}), "versionId": str(version)}
        return {**body, "id": resource_id, "meta": meta}

    def _matching(self, identifier: str | None) -> list[_Stored]:
        if not identifier:
            return list(self._store.values())
        system, value = _split(identifier)
        return [
            s
            for s in self._store.values()
            if any(
                i.get("value") == value and (system is None or i.get("system") == system)
                for i in s.current.get("identifier") or []
            )
        ]

    def _location(self, stored: _Stored) -> dict[str, str]:
        version = len(stored.versions)
        return {"Location": f"{self.base_url}/DiagnosticReport/{stored.id}/_history/{version}"}

    @staticmethod
    def _bundle(resources: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(resources),
            "entry": [{"resource": r} for r in resources],
        }

    @staticmethod
    def _outcome(code: str, text: str, expression: tuple[str, ...] = ()) -> dict[str, Any]:
        issue: dict[str, Any] = {"severity": "error", "code": code, "diagnostics": text}
        if expression:
            issue["expression"] = list(expression)
        return {"resourceType": "OperationOutcome", "issue": [issue]}

    @staticmethod
    def _answer(
        handler: BaseHTTPRequestHandler,
        status: int,
        body: dict[str, Any] | None,
        headers: dict[str, str] | None = None,
    ) -> None:
        data = json.dumps(body).encode() if body is not None else b""
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        if data:
            handler.send_header("Content-Type", "application/fhir+json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    # -- OAuth2 ------------------------------------------------------------------

    def _authorized(self, handler: BaseHTTPRequestHandler) -> bool:
        header = handler.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return False
        with self._lock:
            expires = self._tokens.get(header[7:])
        return expires is not None and time.monotonic() < expires

    def _token(self, handler: BaseHTTPRequestHandler, raw: bytes) -> None:
        form = {k: v[0] for k, v in parse_qs(raw.decode("utf-8", "replace")).items()}
        if form.get("grant_type") != "client_credentials" or not self._client_ok(handler, form):
            with self._lock:
                self.tokens_refused += 1
            self._answer(handler, 401, {"error": "invalid_client"})
            return
        token = uuid.uuid4().hex
        with self._lock:
            self._tokens[token] = time.monotonic() + self.token_lifetime_s
            self.tokens_issued += 1
        self._answer(
            handler,
            200,
            {
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.token_lifetime_s,
                "scope": form.get("scope", ""),
            },
        )

    def _client_ok(self, handler: BaseHTTPRequestHandler, form: dict[str, str]) -> bool:
        if form.get("client_assertion_type") == ASSERTION_TYPE:
            assertion = form.get("client_assertion", "")
            try:
                client = jwt.decode(assertion, options={"verify_signature": False})["iss"]
                key = self.assertion_keys[client]
                claims = jwt.decode(
                    assertion,
                    key,
                    algorithms=["RS384", "ES384"],
                    audience=self.token_url,
                    options={"require": ["exp", "jti", "iss", "sub"]},
                )
            except (jwt.PyJWTError, KeyError):
                return False
            return bool(claims["sub"] == client)
        header = handler.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        client_id, _, secret = base64.b64decode(header[6:]).decode().partition(":")
        return self.clients.get(client_id) == secret and bool(secret)
