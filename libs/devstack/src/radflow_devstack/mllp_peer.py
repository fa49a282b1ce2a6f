"""A stand-in RIS: an HL7 MLLP listener (hl7apy's ``MLLPServer``) that parses and
validates every message it receives, keeps it, and answers with an ACK.

``make run`` starts it as the example site's RIS (``python -m radflow_devstack.mllp_peer
--port 2575``: answers AA to every valid message, AR to an invalid one, and logs one
line per message). The report-return tests run it in-process and script its answers:
AA, AE, AR, an invalid answer, or none at all. With a certificate (``--tls-cert``,
``--tls-key``) it listens with TLS, as a RIS reached over an untrusted network should:
make run's example site reaches it so.
"""

from __future__ import annotations

import argparse
import collections
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.exceptions import HL7apyException
from hl7apy.mllp import AbstractErrorHandler, AbstractHandler, MLLPRequestHandler, MLLPServer
from hl7apy.parser import parse_message

from radflow_core.tls import server_context

CHARSETS = {"UNICODE UTF-8": "utf-8", "8859/1": "latin-1", "": "ascii"}
"""MSH-18 → codec."""


@dataclass(frozen=True)
class Reply:
    """How the peer answers one message."""

    code: str = "AA"
    """AA, AE or AR; ``silent`` sends nothing (the sender times out); ``garbage`` sends
    something that is not HL7; ``wrong_id`` acknowledges another control ID."""
    text: str = ""
    """MSA-3 (and ERR-8 for AE/AR); written as given, so escape it."""


@dataclass(frozen=True)
class Received:
    """One message as it arrived."""

    er7: str
    """Decoded with its MSH-18 character set; segments separated by CR."""
    control_id: str
    charset: str
    """MSH-18 as received."""
    answered: str
    """The code the peer answered with."""
    valid: bool
    """Whether hl7apy's validation accepted the message."""


def _field(er7: str, segment: str, number: int) -> str:
    for line in er7.split("\r"):
        if line.startswith(segment + "|"):
            fields = line.split("|")
            index = number - 1 if segment == "MSH" else number
            return fields[index] if index < len(fields) else ""
    return ""


class _Handler(MLLPRequestHandler):  # type: ignore[misc]
    encoding = "latin-1"  # bytes as they are; re-decoded with the message's MSH-18


class _OruHandler(AbstractHandler):  # type: ignore[misc]
    def __init__(self, message: str, peer: MllpPeer) -> None:
        super().__init__(message)
        self.peer = peer

    def reply(self) -> str:
        return self.peer.answer(self.incoming_message)


class _ErrorHandler(AbstractErrorHandler):  # type: ignore[misc]
    def __init__(self, exc: Exception, message: str, peer: MllpPeer) -> None:
        super().__init__(exc, message)
        self.peer = peer

    def reply(self) -> str:
        return self.peer.answer(self.incoming_message)


class _TlsServer(MLLPServer):  # type: ignore[misc]
    """MLLP over TLS: each accepted connection shakes hands before it is handled (in
    the accept loop, bounded by the request timeout: good enough for a stand-in)."""

    context: ssl.SSLContext

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        sock.settimeout(self.timeout)
        return self.context.wrap_socket(sock, server_side=True), address


class MllpPeer:
    """The listener, on a thread; ``answers`` is the script (then ``default``)."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        timeout_s: float = 10.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        handlers: dict[str, Any] = {
            "ORU^R01^ORU_R01": (_OruHandler, self),
            "ORU^R01": (_OruHandler, self),
            "ERR": (_ErrorHandler, self),
        }
        if tls is None:
            self._server = MLLPServer(host, port, handlers, timeout_s, _Handler)
        else:
            self._server = _TlsServer(host, port, handlers, timeout_s, _Handler)
            self._server.context = tls
        self._server.daemon_threads = True
        self._server.block_on_close = False
        self.port = int(self._server.server_address[1])
        self.answers: collections.deque[Reply] = collections.deque()
        self.default = Reply()
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> MllpPeer:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and let a ``silent`` answer end; safe to call twice."""
        if not self._stopped.is_set():
            self._stopped.set()
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(5)

    def script(self, *codes: str | Reply) -> None:
        """Answer the next messages with these, in order (then ``default``)."""
        with self._lock:
            self.answers.extend(c if isinstance(c, Reply) else Reply(c) for c in codes)

    def answer(self, raw: str) -> str:
        """Parse, validate and keep one message; the ACK to send back (never raises)."""
        er7 = raw.replace("\n", "\r").strip("\r")
        charset = _field(er7, "MSH", 18)
        try:
            er7 = er7.encode("latin-1").decode(CHARSETS.get(charset, "utf-8"))
        except UnicodeError:
            return self._ack(er7, Reply("AR", "message not in its MSH-18 character set"))
        valid = True
        try:
            # Parsed tolerantly: hl7apy takes OBX-5 for an ST (199 characters) whatever
            # OBX-2 says; validate() still checks segments, required fields and types.
            message = parse_message(er7, validation_level=VALIDATION_LEVEL.TOLERANT)
            message.validate()
        except (HL7apyException, ValueError, KeyError, IndexError, AttributeError, TypeError):
            valid = False
        with self._lock:
            reply = self.answers.popleft() if self.answers else self.default
            if not valid and reply.code == "AA":
                reply = Reply("AR", "message does not validate as HL7 ORU^R01")
            self.received.append(Received(er7, _field(er7, "MSH", 10), charset, reply.code, valid))
        if reply.code == "silent":
            self._stopped.wait(60)
            return ""
        if reply.code == "garbage":
            return "\x0bthis is not an acknowledgement\x1c\r"
        return self._ack(er7, reply)

    def _ack(self, er7: str, reply: Reply) -> str:
        control_id = _field(er7, "MSH", 10)
        code = reply.code
        if code == "wrong_id":
            code, control_id = "AA", control_id[::-1]
        now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        segments = [
            f"MSH|^~\\&|{_field(er7, 'MSH', 5)}|{_field(er7, 'MSH', 6)}|"
            f"{_field(er7, 'MSH', 3)}|{_field(er7, 'MSH', 4)}|{now}||ACK^R01^ACK|"
            f"ACK{int(time.time() * 1000)}|P|{_field(er7, 'MSH', 12) or '2.5.1'}",
            f"MSA|{code}|{control_id}|{reply.text}",
        ]
        if code in ("AE", "AR"):
            segments.append(f"ERR||||E||||{reply.text}")
        return "\x0b" + "\r".join(segments) + "\r\x1c\r"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m radflow_devstack.mllp_peer",
        description="A stand-in RIS: validates HL7 ORU^R01 over MLLP and acknowledges it.",
    )
    parser.add_argument("--port", type=int, default=2575)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--tls-cert", type=Path, help="listen with TLS, with this certificate")
    parser.add_argument("--tls-key", type=Path, help="the certificate's private key")
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("--tls-cert and --tls-key go together")
    tls = None
    if args.tls_cert is not None:
        tls = server_context(
            args.tls_cert, args.tls_key, client_ca_file=None, require_client_cert=False
        )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    peer = MllpPeer(args.port, args.host, tls=tls).start()
    how = "MLLP over TLS" if tls else "MLLP"
    print(f"{how} peer listening on {args.host}:{peer.port}", flush=True)
    seen = 0
    try:
        while not stop.wait(0.2):
            for message in peer.received[seen:]:
                # Control ID, answer and size only: the message itself is PHI.
                print(
                    f"received {message.control_id} answered {message.answered} "
                    f"({'valid' if message.valid else 'invalid'}, {len(message.er7)} chars)",
                    flush=True,
                )
            seen = len(peer.received)
    finally:
        peer.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
