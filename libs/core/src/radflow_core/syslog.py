"""Audit messages to an audit record repository: RFC 5424 syslog over TLS (RFC 5425).

This is the transport IHE ATNA and DICOM PS3.15 (Audit Trail Message Format Profile
with the Syslog/TLS transport) expect: octet-counted frames (``MSG-LEN SP
SYSLOG-MSG``) on one long-lived TLS 1.2+ connection, facility authpriv (10), MSGID
``IHE+RFC-3881``, the XML as the message body after a UTF-8 BOM.

The sender never blocks the work it describes: :meth:`SyslogSender.offer` puts a
message on a bounded queue or drops it (counted); one task writes the queue out,
reconnecting with a growing pause while the repository is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
from collections.abc import Callable
from datetime import UTC, datetime

from radflow_core.retry import backoff_delay

log = logging.getLogger(__name__)

FACILITY_AUTHPRIV = 10
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
MSGID = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"


def _header_field(value: str, limit: int) -> str:
    """RFC 5424 header fields are printable US-ASCII without spaces; '-' when empty."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def syslog_message(
    body: bytes,
    *,
    app_name: str,
    severity: int = SEVERITY_NOTICE,
    at: datetime | None = None,
    hostname: str | None = None,
    procid: str | None = None,
) -> bytes:
    """One RFC 5424 SYSLOG-MSG: header, no structured data, BOM + ``body`` (UTF-8)."""
    timestamp = (at or datetime.now(UTC)).isoformat(timespec="microseconds")
    header = " ".join(
        (
            f"<{FACILITY_AUTHPRIV * 8 + severity}>1",
            timestamp.replace("+00:00", "Z"),
            _header_field(hostname or socket.gethostname(), 255),
            _header_field(app_name, 48),
            _header_field(procid or str(os.getpid()), 128),
            MSGID,
            "-",
        )
    )
    return header.encode("ascii") + b" " + BOM + body


def octet_counted(message: bytes) -> bytes:
    """RFC 5425 / RFC 6587 framing: the message's length in octets, a space, the message."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogSender:
    """A bounded queue of messages and the one TLS connection that writes them out."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        *,
        queue_size: int,
        connect_timeout_s: float,
        on_drop: Callable[[str], None],
        max_pause_s: float = 30.0,
    ) -> None:
        self._host = host
        self._port = port
        self._context = context
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=queue_size)
        self._connect_timeout_s = connect_timeout_s
        self._on_drop = on_drop
        self._max_pause_s = max_pause_s
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="audit syslog")

    def offer(self, message: bytes) -> None:
        """Queue one SYSLOG-MSG (unframed); dropped and counted when the queue is full."""
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self._on_drop("syslog_queue_full")

    async def close(self, timeout_s: float) -> None:
        """Write out what is queued for up to ``timeout_s``, then drop the rest; safe
        to call twice."""
        task, self._task = self._task, None
        if task is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._queue.join()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            self._on_drop("syslog_unsent_at_stop")
        await self._disconnect()

    async def _run(self) -> None:
        failures = 0
        while True:
            message = await self._queue.get()
            try:
                while True:
                    try:
                        await self._write(octet_counted(message))
                        failures = 0
                        break
                    except (OSError, ssl.SSLError, TimeoutError) as exc:
                        await self._disconnect()
                        log.warning(
                            "audit record repository unreachable; retrying",
                            extra={
                                "host": self._host,
                                "port": self._port,
                                "error_type": type(exc).__name__,
                            },
                        )
                        failures += 1
                        await asyncio.sleep(backoff_delay(failures, 0.5, self._max_pause_s))
            finally:
                self._queue.task_done()

    async def _write(self, frame: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            async with asyncio.timeout(self._connect_timeout_s):
                _, self._writer = await asyncio.open_connection(
                    self._host, self._port, ssl=self._context
                )
        self._writer.write(frame)
        async with asyncio.timeout(self._connect_timeout_s):
            await self._writer.drain()

    async def _disconnect(self) -> None:
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
