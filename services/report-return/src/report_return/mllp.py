"""An MLLP client: one message, one acknowledgement, over TCP or TLS.

Each exchange opens its own connection (the listener of every interface engine takes
that, and hl7apy's server closes after each message), disables Nagle's algorithm, writes
one framed message and waits for one framed answer. Every socket, TLS and stream error
is mapped here to :class:`MllpError` (retriable), so nothing of asyncio or ssl leaks out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from dataclasses import dataclass

from radflow_core.errors import ConfigurationError, PipelineError
from radflow_core.mllp import END_BLOCK, frame, unframe
from report_return.sites import Site

MAX_ACK_BYTES = 1024 * 1024
"""Longest acknowledgement read; a longer answer is treated as a broken connection."""


class MllpError(PipelineError):
    """The RIS could not be reached or did not answer: worth another try."""

    retriable = True
    reason = "mllp_error"
    written = False
    """Whether the message was written before the failure (the RIS may have it)."""


class PeerUnreachable(MllpError):
    reason = "peer_unreachable"


class AckTimeout(MllpError):
    reason = "ack_timeout"
    written = True


class ConnectionLost(MllpError):
    reason = "connection_lost"

    def __init__(self, message: str, written: bool) -> None:
        super().__init__(message)
        self.written = written


@dataclass(frozen=True)
class Answer:
    data: bytes
    """What was inside the answer's MLLP frame."""
    latency_s: float
    """From the message written to the answer read."""


def tls_context(site: Site) -> ssl.SSLContext | None:
    """The site's TLS context, or None for plain TCP.

    Raises:
        ConfigurationError: a CA or certificate file cannot be used (named, at start).
    """
    if site.tls is None:
        return None
    try:
        context = ssl.create_default_context(
            cafile=str(site.tls.ca_file) if site.tls.ca_file else None
        )
        if site.tls.cert_file and site.tls.key_file:
            context.load_cert_chain(str(site.tls.cert_file), str(site.tls.key_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"site {site.name!r}: TLS files cannot be used ({type(exc).__name__}: {exc})"
        ) from None
    return context


class MllpClient:
    """Sends to one site's MLLP listener."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self._tls = tls_context(site)

    async def exchange(self, payload: bytes) -> Answer:
        """Send one message and read its answer.

        Raises:
            MllpError: connection refused or timed out, TLS failure, no answer within the
                site's ack timeout, or the connection closed before a whole answer.
        """
        site = self.site
        try:
            async with asyncio.timeout(site.connect_timeout_s):
                reader, writer = await asyncio.open_connection(
                    site.host,
                    site.port,
                    ssl=self._tls,
                    server_hostname=site.host if self._tls else None,
                    limit=MAX_ACK_BYTES,
                )
        except (OSError, TimeoutError) as exc:
            raise PeerUnreachable(
                f"cannot connect to {site}: {type(exc).__name__}"
                + (f" ({exc.strerror})" if isinstance(exc, OSError) and exc.strerror else "")
            ) from exc
        written = False
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(frame(payload))
            await writer.drain()
            written = True
            started = time.perf_counter()
            async with asyncio.timeout(site.ack_timeout_s):
                framed = await reader.readuntil(END_BLOCK)
            latency = time.perf_counter() - started
        except TimeoutError as exc:
            if not written:
                raise ConnectionLost(f"{site}: writing timed out", written) from exc
            raise AckTimeout(
                f"no acknowledgement from {site} within {site.ack_timeout_s:g}s"
            ) from exc
        except asyncio.IncompleteReadError as exc:
            raise ConnectionLost(f"{site} closed the connection before answering", written) from exc
        except asyncio.LimitOverrunError as exc:
            raise ConnectionLost(
                f"{site} answered more than {MAX_ACK_BYTES} bytes", written
            ) from exc
        except OSError as exc:
            raise ConnectionLost(
                f"connection to {site} failed: {type(exc).__name__}", written
            ) from exc
        finally:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()
        return Answer(unframe(framed), latency)
