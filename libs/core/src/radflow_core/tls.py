"""TLS contexts for the doors we listen on and the peers we dial, in one place, so
every service negotiates the same floor: TLS 1.2 or newer, the platform's default
ciphers (no export, no RC4, no anonymous suites), no compression, no renegotiation.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


class TlsFilesUnusable(ValueError):
    """A configured certificate, key or CA file cannot be read or does not match."""


def server_context(
    cert_file: Path, key_file: Path, *, client_ca_file: Path | None, require_client_cert: bool
) -> ssl.SSLContext:
    """A listening context. With ``client_ca_file``, clients are asked for a
    certificate signed by it: required when ``require_client_cert``, optional
    otherwise (an HTTPS client may authenticate with a token instead)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
        if client_ca_file is not None:
            context.load_verify_locations(cafile=str(client_ca_file))
            context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise TlsFilesUnusable(f"{type(exc).__name__}: {exc}") from exc
    return context


def client_context(
    *, ca_file: Path | None, cert_file: Path | None = None, key_file: Path | None = None
) -> ssl.SSLContext:
    """A dialing context that verifies the peer's certificate and host name (against
    ``ca_file``, or the system's trust store), presenting a client certificate when
    one is given."""
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if cert_file is not None and key_file is not None:
            context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsFilesUnusable(f"{type(exc).__name__}: {exc}") from exc
    return context


def peer_common_name(peer_cert: Any) -> str | None:
    """The subject CN of a verified peer certificate (``SSLSocket.getpeercert()``)."""
    if not peer_cert:
        return None
    for rdn in peer_cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class DeferredHandshake:
    """A context for pynetdicom's ``ssl_context`` / ``tls_args`` that wraps sockets
    without shaking hands. pynetdicom shakes hands inside its accept loop (one silent
    peer then blocks every other) or inside ``connect`` (where it swallows the reason);
    with this, the caller completes ``SSLSocket.do_handshake()`` in an ``EVT_CONN_OPEN``
    handler, in the association's thread, and sees why it failed."""

    def __init__(self, context: ssl.SSLContext, *, timeout_s: float | None = None) -> None:
        self.context = context
        self._timeout_s = timeout_s

    def wrap_socket(
        self, sock: Any, server_side: bool, server_hostname: str | None = None
    ) -> ssl.SSLSocket:
        if self._timeout_s is not None:
            sock.settimeout(self._timeout_s)
        return self.context.wrap_socket(
            sock,
            server_side=server_side,
            server_hostname=server_hostname,
            do_handshake_on_connect=False,
        )
