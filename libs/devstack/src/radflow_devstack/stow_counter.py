"""A counting HTTP proxy in front of a DICOMweb destination, which can also play dead.

Orthanc keeps one copy per SOP Instance UID, so a duplicate delivery leaves no trace
in it. Put this proxy between the forwarder and Orthanc: it passes every request
through unchanged and, for each STOW-RS POST (``multipart/related;
type="application/dicom"``), reads the SOP Instance UID (0008,0018) of each part and
counts it — as an attempt always, and as a delivery when the destination stored it
(200; on 202 only the instances in its ReferencedSOPSequence).

``down("refuse")`` closes the listening socket and resets open connections (a host
that is gone); ``down("503")`` answers every request with 503 Service Unavailable
itself (a destination that is up but refuses work); ``up()`` restores it, on the same
port. The proxy runs its own event loop in a thread, so a synchronous test (or
benchmark) can drive it while the services run as processes.
"""

from __future__ import annotations

import asyncio
import email.message
import io
import json
import threading
import time
from collections import Counter
from collections.abc import Iterable
from typing import Literal

import aiohttp
import pydicom
from aiohttp import web
from multidict import CIMultiDict

DownMode = Literal["refuse", "503"]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
UNREADABLE = "<unreadable>"
"""The key under which a part whose SOP Instance UID could not be read is counted."""


def stow_parts(content_type: str, body: bytes) -> list[bytes]:
    """The DICOM payloads of a STOW-RS request body (empty if it is not one)."""
    header = email.message.Message()
    header["content-type"] = content_type
    if header.get_content_type() != "multipart/related":
        return []
    boundary = header.get_param("boundary")
    if not isinstance(boundary, str):
        return []
    default_type = str(header.get_param("type") or "application/dicom")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    parts = []
    for segment in (b"\r\n" + body).split(delimiter)[1:]:
        if segment.startswith(b"--"):
            break
        _, _, segment = segment.partition(b"\r\n")  # transport padding after the delimiter
        head, _, payload = segment.partition(b"\r\n\r\n")
        part_type = default_type
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-type":
                part_type = value.decode("latin-1").split(";")[0].strip().lower()
        if part_type == "application/dicom":
            parts.append(payload)
    return parts


def sop_instance_uid(part: bytes) -> str:
    try:
        dataset = pydicom.dcmread(
            io.BytesIO(part), stop_before_pixels=True, specific_tags=["SOPInstanceUID"]
        )
        return str(dataset.SOPInstanceUID)
    except Exception:  # noqa: BLE001 - any unreadable part is counted as such
        return UNREADABLE


def stored_uids(status: int, body: bytes, sent: list[str]) -> list[str]:
    """Which of ``sent`` the destination says it stored: all on 200; on 202 those in
    the response's ReferencedSOPSequence (0008,1199); none otherwise."""
    if status == 200:
        return sent
    if status != 202:
        return []
    try:
        items = json.loads(body).get("00081199", {}).get("Value", [])
        referenced = {str(item["00081155"]["Value"][0]) for item in items}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return []
    return [uid for uid in sent if uid in referenced]


class StowCounter:
    """An HTTP reverse proxy on 127.0.0.1 that forwards to ``target`` (e.g.
    ``http://127.0.0.1:8042``) and counts STOW-RS deliveries per SOP Instance UID."""

    def __init__(self, target: str, port: int = 0) -> None:
        self.target = target.rstrip("/")
        self.port = port
        self._lock = threading.Lock()
        self._attempts: Counter[str] = Counter()
        self._deliveries: Counter[str] = Counter()
        self._first_delivered_at: dict[str, float] = {}
        self._mode: DownMode | None = None
        self._retry_after_s: int | None = None
        self.posts = 0
        """STOW-RS requests received, whatever was answered."""
        self.in_flight = 0
        """STOW-RS requests received and not yet answered (the destination is storing)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StowCounter:
        self._thread.start()
        self._call(self._start())
        return self

    def close(self) -> None:
        """Stop listening and end the thread. Safe to call twice."""
        if self._thread.is_alive():
            self._call(self._close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    def __enter__(self) -> StowCounter:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def attempts(self) -> Counter[str]:
        """Instances in every STOW-RS POST that reached the proxy, by SOP Instance UID
        (including those it refused while down with 503)."""
        with self._lock:
            return Counter(self._attempts)

    def deliveries(self) -> Counter[str]:
        """Instances the destination stored, by SOP Instance UID, once per delivery."""
        with self._lock:
            return Counter(self._deliveries)

    def first_delivered_at(self) -> dict[str, float]:
        """When the destination's answer storing each instance first reached the proxy
        (``time.time()``), by SOP Instance UID: the arrival time a benchmark measures
        latency to, the same way whichever sender is behind the proxy."""
        with self._lock:
            return dict(self._first_delivered_at)

    def duplicates(self) -> dict[str, int]:
        """The instances delivered more than once, with their delivery counts."""
        return {uid: n for uid, n in self.deliveries().items() if n > 1}

    def down(self, mode: DownMode = "refuse", retry_after_s: int | None = None) -> None:
        """Take the destination away until ``up()``: ``"refuse"`` closes the port and
        resets open connections; ``"503"`` answers 503 (with Retry-After if given)."""
        if mode not in ("refuse", "503"):
            raise ValueError(f"down mode must be 'refuse' or '503', not {mode!r}")
        self._call(self._down(mode, retry_after_s))

    def up(self) -> None:
        """Forward to the destination again, on the same port."""
        self._call(self._up())

    def _call(self, coro: object) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)  # type: ignore[arg-type]

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        self.port = self._site.port

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()

    async def _down(self, mode: DownMode, retry_after_s: int | None) -> None:
        self._mode, self._retry_after_s = mode, retry_after_s
        if mode == "refuse" and self._site is not None:
            await self._site.stop()
            self._site = None
            self._reset_connections()
        elif mode == "503" and self._site is None:
            await self._listen()

    async def _up(self) -> None:
        self._mode = None
        if self._site is None:
            await self._listen()

    def _reset_connections(self) -> None:
        assert self._runner is not None and self._runner.server is not None
        for handler in self._runner.server.connections:
            if handler.transport is not None:
                handler.transport.abort()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        is_stow = request.method == "POST" and request.content_type == "multipart/related"
        sent = (
            [sop_instance_uid(p) for p in stow_parts(request.headers["Content-Type"], body)]
            if is_stow
            else []
        )
        if is_stow:
            with self._lock:
                self.posts += 1
                self.in_flight += 1
                self._attempts.update(sent)
        try:
            return await self._pass(request, body, sent, is_stow)
        finally:
            if is_stow:
                with self._lock:
                    self.in_flight -= 1

    async def _pass(
        self, request: web.Request, body: bytes, sent: list[str], is_stow: bool
    ) -> web.StreamResponse:
        if self._mode == "refuse":
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=503)
        if self._mode == "503":
            headers = (
                {} if self._retry_after_s is None else {"Retry-After": str(self._retry_after_s)}
            )
            return web.Response(status=503, reason="Service Unavailable", headers=headers)
        assert self._session is not None
        async with self._session.request(
            request.method,
            f"{self.target}{request.rel_url}",
            headers=_end_to_end(request.headers.items()),
            data=body if body else None,
            allow_redirects=False,
        ) as upstream:
            answer = await upstream.read()
            if is_stow:
                stored = stored_uids(upstream.status, answer, sent)
                answered_at = time.time()
                with self._lock:
                    self._deliveries.update(stored)
                    for uid in stored:
                        self._first_delivered_at.setdefault(uid, answered_at)
            return web.Response(
                status=upstream.status,
                reason=upstream.reason,
                headers=_end_to_end(upstream.headers.items()),
                body=answer,
            )


def _end_to_end(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    return CIMultiDict((name, value) for name, value in headers if name.lower() not in HOP_BY_HOP)
