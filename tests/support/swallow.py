"""A DICOMweb destination that lies: an HTTP proxy in front of a real one (Orthanc)
that passes everything through except the instances it is told to swallow. Those it
takes out of the STOW-RS request and claims, in the answer, to have stored (a
ReferencedSOPSequence item, 200): the PACS that said "stored" and lost the study.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import uuid

import aiohttp
import pydicom
from aiohttp import web

from radflow_devstack.stow_counter import stow_parts


def _identity(part: bytes) -> tuple[str, str]:
    ds = pydicom.dcmread(
        io.BytesIO(part), stop_before_pixels=True, specific_tags=["SOPInstanceUID", "SOPClassUID"]
    )
    return str(ds.SOPInstanceUID), str(ds.SOPClassUID)


def _body(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = f"swallow-{uuid.uuid4().hex}"
    chunks = [
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
        for part in parts
    ]
    body = b"".join(chunks) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


class SwallowingProxy:
    """Forwards to ``target`` (e.g. ``http://127.0.0.1:8042``) on 127.0.0.1:``port``;
    instances whose SOP Instance UID is in :attr:`swallow` never reach it."""

    def __init__(self, target: str, swallow: set[str] | None = None) -> None:
        self.target = target.rstrip("/")
        self.swallow: set[str] = set(swallow or ())
        self.swallowed: list[str] = []
        """What was taken out of STOW-RS requests and claimed stored, in order."""
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> SwallowingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)
        return self

    def close(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{path:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        body = await request.read()
        headers = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("host", "content-length", "transfer-encoding")
        }
        kept_classes: list[tuple[str, str]] = []
        if request.method == "POST" and request.content_type == "multipart/related":
            parts = stow_parts(request.headers["Content-Type"], body)
            kept: list[bytes] = []
            for part in parts:
                uid, sop_class = _identity(part)
                if uid in self.swallow:
                    self.swallowed.append(uid)
                    kept_classes.append((uid, sop_class))
                else:
                    kept.append(part)
            if kept_classes:
                if not kept:
                    return web.json_response(
                        _claimed({}, kept_classes), content_type="application/dicom+json"
                    )
                body, headers["Content-Type"] = _body(kept)
        async with self._session.request(
            request.method, f"{self.target}{request.rel_url}", headers=headers, data=body or None
        ) as upstream:
            answer = await upstream.read()
            if kept_classes and upstream.status == 200:
                answer = json.dumps(_claimed(json.loads(answer), kept_classes)).encode()
            return web.Response(
                status=upstream.status,
                body=answer,
                content_type=upstream.content_type,
            )


def _claimed(response: dict[str, object], swallowed: list[tuple[str, str]]) -> dict[str, object]:
    """``response`` with a ReferencedSOPSequence item claiming each swallowed instance."""
    sequence = response.setdefault("00081199", {"vr": "SQ", "Value": []})
    assert isinstance(sequence, dict)
    values = sequence.setdefault("Value", [])
    for uid, sop_class in swallowed:
        values.append(
            {
                "00081150": {"vr": "UI", "Value": [sop_class]},
                "00081155": {"vr": "UI", "Value": [uid]},
            }
        )
    return response
