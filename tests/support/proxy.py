"""A TCP proxy that a test can cut and restore: a real network outage on loopback.

Put in front of the broker or the S3 server, it lets a test take a dependency away
while a sender is sending, without killing the server (so what was stored before the
outage can still be checked afterwards). In front of an HTTP server it can also play
an overloaded one: answer every request with a status (503 with Retry-After), or
take requests and never answer (a hung server, for the client's timeouts). Given a
server ``ssl.SSLContext`` it terminates TLS, as the reverse proxy in front of a PACS
does: a real handshake by OpenSSL, client certificates checked if the context asks.

Sockets are only ever closed by the two pump threads of their connection, after both
have finished; ``cut()`` shuts them down, which wakes the pumps. Closing a socket
under a thread blocked in recv() would neither wake it nor reset the peer, and its
file descriptor could be reused by the next connection.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


class _Connection:
    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.sockets = (client, upstream)
        self._pumps_left = 2
        self._lock = threading.Lock()

    def shutdown(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                sock.shutdown(socket.SHUT_RDWR)

    def pump_done(self) -> None:
        with self._lock:
            self._pumps_left -= 1
            last = self._pumps_left == 0
        if last:
            for sock in self.sockets:
                sock.close()


class FaultProxy:
    def __init__(
        self, target_port: int, listen_port: int = 0, tls: ssl.SSLContext | None = None
    ) -> None:
        self._target = ("127.0.0.1", target_port)
        self._tls = tls
        self.handshake_failures: list[str] = []
        """Why each TLS handshake that failed failed (OpenSSL's reason)."""
        self._listener = socket.create_server(("127.0.0.1", listen_port))
        self._listener.settimeout(0.2)
        self.port: int = self._listener.getsockname()[1]
        self._open = True
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._conns: set[_Connection] = set()
        self._http_answer: bytes | None = None
        self._stall = False
        self.answered = 0
        """Requests answered by the proxy itself (``answer_http``)."""
        self.stalled = 0
        """Connections held without an answer (``stall``)."""
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def cut(self) -> None:
        """Reset every open connection and refuse new ones until restore()."""
        with self._lock:
            self._open = False
            conns, self._conns = self._conns, set()
        for conn in conns:
            conn.shutdown()

    def restore(self) -> None:
        """Pass connections through to the target again."""
        with self._lock:
            self._open = True
            self._http_answer = None
            self._stall = False

    def answer_http(self, status: int, reason: str, retry_after_s: int | None = None) -> None:
        """From now on, answer each HTTP request on a new connection with ``status``
        (after reading it whole, so the client sees the answer, not a reset)."""
        headers = [f"HTTP/1.1 {status} {reason}", "Content-Length: 0", "Connection: close"]
        if retry_after_s is not None:
            headers.append(f"Retry-After: {retry_after_s}")
        with self._lock:
            self._http_answer = ("\r\n".join(headers) + "\r\n\r\n").encode("ascii")

    def stall(self) -> None:
        """From now on, take new connections' requests and never answer them."""
        with self._lock:
            self._stall = True

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._thread.join(timeout=2)
        self._listener.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # _bridge registers the connection under the lock and checks again, so a
            # cut() racing with this accept resets it too.
            with self._lock:
                if not self._open or self._closed.is_set():
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                    client.close()
                    continue
                if self._http_answer is not None or self._stall:
                    self.answered += self._http_answer is not None
                    self.stalled += self._stall
                    threading.Thread(
                        target=self._answer, args=(client, self._http_answer), daemon=True
                    ).start()
                    continue
            if self._tls is None:
                self._bridge(client)
            else:
                threading.Thread(target=self._handshake, args=(client,), daemon=True).start()

    def _handshake(self, client: socket.socket) -> None:
        assert self._tls is not None
        client.settimeout(10)
        try:
            secure = self._tls.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.handshake_failures.append(getattr(exc, "reason", None) or type(exc).__name__)
            client.close()
            return
        self._bridge(secure)

    def _bridge(self, client: socket.socket) -> None:
        """Connect ``client`` to the target and pump both ways until either side ends."""
        with self._lock:
            if not self._open or self._closed.is_set():
                client.close()
                return
            try:
                upstream = socket.create_connection(self._target, timeout=2)
            except OSError:
                client.close()
                return
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(None)
            conn = _Connection(client, upstream)
            self._conns.add(conn)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(conn, src, dst), daemon=True).start()

    def _answer(self, client: socket.socket, answer: bytes | None) -> None:
        """Read one request (head and Content-Length body); answer it, or hold it."""
        client.settimeout(30)
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                if not (chunk := client.recv(65536)):
                    return
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(body) < length:
                if not (chunk := client.recv(min(65536, length - len(body)))):
                    return
                body += chunk
            if answer is None:
                self._closed.wait(30)
                return
            client.sendall(answer)
        except OSError:
            pass
        finally:
            client.close()

    @staticmethod
    def _pump(conn: _Connection, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            conn.shutdown()
            conn.pump_done()
