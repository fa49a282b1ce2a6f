"""The MLLP listener: framed HL7 messages in, one acknowledgement out for each, in
order, on the same connection (plain TCP, or TLS when the service has a certificate).

A connection's messages are handled one after another, so a RIS that waits for each
ACK (as MLLP requires) keeps its order; several connections are served at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable

from radflow_core.mllp import END_BLOCK, frame, unframe

log = logging.getLogger(__name__)

Handler = Callable[[bytes], Awaitable[bytes]]
"""Message (inside the frame) → its acknowledgement (inside the frame); never raises."""


class MllpListener:
    def __init__(
        self,
        host: str,
        port: int,
        handle: Handler,
        *,
        tls: ssl.SSLContext | None,
        max_bytes: int,
        idle_timeout_s: float,
        too_large: Callable[[], bytes],
    ) -> None:
        self._address = (host, port)
        self._handle = handle
        self._tls = tls
        self._max_bytes = max_bytes
        self._idle_timeout_s = idle_timeout_s
        self._too_large = too_large
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("MLLP listener not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        host, port = self._address
        self._server = await asyncio.start_server(
            self._serve, host, port, ssl=self._tls, limit=self._max_bytes + 16
        )
        log.info(
            "MLLP order listener",
            extra={"host": host, "port": self.port, "tls": self._tls is not None},
        )

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting; a message being handled gets its answer (for ``grace_s``),
        idle connections are closed."""
        if self._server is None:
            return
        self._server.close()
        self._server = None
        if self._connections:
            _, late = await asyncio.wait(self._connections, timeout=grace_s)
            for task in late:
                task.cancel()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername")
        try:
            while True:
                try:
                    async with asyncio.timeout(self._idle_timeout_s):
                        framed = await reader.readuntil(END_BLOCK)
                except asyncio.LimitOverrunError:
                    writer.write(frame(self._too_large()))
                    await writer.drain()
                    log.warning("HL7 message too large; connection closed")
                    return
                except (asyncio.IncompleteReadError, TimeoutError):
                    return
                message = unframe(framed)
                if not message.strip():
                    continue
                answer = await self._handle(message)
                writer.write(frame(answer))
                await writer.drain()
        except (OSError, ssl.SSLError) as exc:
            log.info(
                "MLLP connection ended",
                extra={"peer_address": str(peer), "reason": type(exc).__name__},
            )
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()
            if task is not None:
                self._connections.discard(task)
