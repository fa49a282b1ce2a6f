"""The STOW-RS receiver (PS3.18 §10.5): ``POST /dicomweb/studies[/{study}]``.

The body is read part by part; each part is spooled (memory up to a threshold, then
TMPDIR) and handed to the claim check, so request size is bounded by disk, not RAM.
Up to ``stow_concurrency`` parts are claim-checked at once while the next one is
spooled; the answer is sent when every part's claim check has settled.
The sender is authenticated first (:mod:`ingest.auth`), before the body is read:
401/403 with a ``WWW-Authenticate`` challenge otherwise.
The answer is the standard Store Instances Response Module as DICOM JSON:

- 200: every instance stored (ReferencedSOPSequence).
- 202: some stored, some failed (FailedSOPSequence with a Failure Reason each).
- 400: nothing stored, the body or every instance was malformed.
- 409: nothing stored, for reasons that are not syntax (SOP class, study mismatch…).
- 413: the body exceeds the configured size (every byte received counted) or holds
  more parts than the configured number; nothing more of it is read.
- 415: not multipart/related; type="application/dicom".
- 503 + Retry-After: nothing stored because the blob store or broker is unavailable.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import BodyPartReader, HttpVersion11, MultipartReader, StreamReader, web
from aiohttp.hdrs import EXPECT
from aiohttp.helpers import parse_mimetype

from ingest import metrics
from ingest.auth import Authenticator, AuthError
from ingest.claimcheck import ClaimCheck, Expected, NotStored, Origin
from ingest.settings import IngestSettings
from radflow_core.dicom_status import StoreStatus
from radflow_core.events import Protocol, Sender
from radflow_core.uids import is_valid_uid

log = logging.getLogger(__name__)

DICOM_JSON = "application/dicom+json"
_CHUNK = 1024 * 1024
_SYNTAX_FAILURES = frozenset(
    {
        StoreStatus.CANNOT_UNDERSTAND,
        StoreStatus.MISSING_ATTRIBUTE,
        StoreStatus.INVALID_UID,
    }
)


IDENTITY: web.RequestKey[str | None] = web.RequestKey("sender_identity")
"""Request key of the identity the sender proved (None with authentication off)."""


class BodyTooLarge(Exception):
    """The request body passed a configured limit (size or number of parts); the
    message is the answer's text."""


class _CountedBody:
    """The request body as aiohttp's multipart parser reads it, with every byte
    received counted against ``max_request_bytes``: part headers, preamble, and parts
    that are read only to be skipped, not just the DICOM parts that are kept.

    Counts what arrived from the network (``StreamReader.total_bytes``), so a limit
    is noticed at the first read after it is passed, however the parser reads.
    """

    def __init__(self, content: StreamReader, limit: int) -> None:
        self._content = content
        self._limit = limit

    def _check(self) -> None:
        if self._content.total_bytes > self._limit:
            raise BodyTooLarge("request body exceeds the configured limit")

    async def read(self, n: int = -1) -> bytes:
        data = await self._content.read(n)
        self._check()
        return data

    async def readline(self, *, max_line_length: int | None = None) -> bytes:
        data = await self._content.readline(max_line_length=max_line_length)
        self._check()
        return data

    def at_eof(self) -> bool:
        return self._content.at_eof()

    def unread_data(self, data: bytes) -> None:
        self._content.unread_data(data)


@dataclass(frozen=True)
class PartResult:
    status: StoreStatus
    sop_class_uid: str | None
    sop_instance_uid: str | None


def _uid_element(uid: str | None) -> dict[str, Any]:
    return {"vr": "UI", "Value": [uid]} if uid else {"vr": "UI"}


def _sop_item(result: PartResult) -> dict[str, Any]:
    """One SOP sequence item; failed ones carry their Failure Reason (0008,1197)."""
    item = {
        "00081150": _uid_element(result.sop_class_uid),
        "00081155": _uid_element(result.sop_instance_uid),
    }
    if result.status is not StoreStatus.SUCCESS:
        item["00081197"] = {"vr": "US", "Value": [int(result.status)]}
    return item


def response_body(results: list[PartResult]) -> dict[str, Any]:
    """The Store Instances Response Module (PS3.18 Table 10.5.3-1) in DICOM JSON:
    FailedSOPSequence (0008,1198) and ReferencedSOPSequence (0008,1199)."""
    body: dict[str, Any] = {}
    for tag, ok in (("00081198", False), ("00081199", True)):
        items = [_sop_item(r) for r in results if (r.status is StoreStatus.SUCCESS) is ok]
        if items:
            body[tag] = {"vr": "SQ", "Value": items}
    return body


def http_status(results: list[PartResult]) -> int:
    statuses = {r.status for r in results}
    if statuses == {StoreStatus.SUCCESS}:
        return 200
    if StoreStatus.SUCCESS in statuses:
        return 202
    if all(s.retriable for s in statuses):
        return 503
    if statuses <= _SYNTAX_FAILURES:
        return 400
    return 409


def _error(status: int, message: str, retry_after: int | None = None) -> web.Response:
    metrics.STOW_REQUESTS.labels(str(status)).inc()
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return web.json_response({"error": message}, status=status, headers=headers)


def _accepts_dicom_json(accept: str) -> bool:
    if not accept:
        return True
    types = {item.split(";")[0].strip().lower() for item in accept.split(",")}
    return bool(types & {DICOM_JSON, "application/json", "application/*", "*/*"})


class StowReceiver:
    def __init__(
        self, settings: IngestSettings, claim_check: ClaimCheck, authenticator: Authenticator
    ) -> None:
        self._settings = settings
        self._claim_check = claim_check
        self._auth = authenticator

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(path, self.handle, expect_handler=self._expect)
            for path in ("/dicomweb/studies", "/dicomweb/studies/{study}")
        ]

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue`` (curl sends it for large bodies): authenticate
        before inviting the body, so a refused sender never uploads it."""
        refused = await self._authenticate(request)
        if refused is not None:
            return refused
        if request.version != HttpVersion11 or request.headers[EXPECT].lower() != "100-continue":
            raise web.HTTPExpectationFailed(text="only Expect: 100-continue is understood")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    async def _authenticate(self, request: web.Request) -> web.Response | None:
        """The refusal for a request that may not proceed; None once its identity is
        in ``request[IDENTITY]``."""
        if IDENTITY in request:
            return None
        try:
            request[IDENTITY] = await self._auth.identify(request)
        except AuthError as exc:
            metrics.STOW_REQUESTS.labels(str(exc.status)).inc()
            return self._auth.refusal(exc)
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        refused = await self._authenticate(request)
        if refused is not None:
            return refused
        identity: str | None = request[IDENTITY]
        study = request.match_info.get("study")
        if study is not None and not is_valid_uid(study):
            return _error(400, "the study in the URL is not a valid UID")
        mime = parse_mimetype(request.headers.get("Content-Type", ""))
        if (mime.type, mime.subtype) != ("multipart", "related"):
            return _error(415, 'expected Content-Type multipart/related; type="application/dicom"')
        part_type = mime.parameters.get("type", "application/dicom").lower()
        if part_type != "application/dicom":
            return _error(415, f"only type=application/dicom is accepted, not {part_type!r}")
        if not _accepts_dicom_json(request.headers.get("Accept", "")):
            return _error(406, "responses are application/dicom+json")
        if (request.content_length or 0) > self._settings.max_request_bytes:
            return _error(413, "request body exceeds the configured limit")
        if "boundary" not in mime.parameters:
            return _error(400, "multipart/related without a boundary")

        origin = Origin(
            sender=Sender(
                protocol=Protocol.STOW_RS,
                peer_address=request.remote,
                client=request.headers.get("User-Agent", "")[:128] or None,
                identity=identity,
            ),
            expected=Expected(study_instance_uid=study),
        )
        results: list[PartResult] = []
        try:
            results = await self._read_parts(request, origin)
        except BodyTooLarge as exc:
            return _error(413, str(exc))
        except ValueError:
            # aiohttp's multipart parser signals malformed framing with ValueError.
            if not results:
                return _error(400, "malformed multipart body")
            results.append(PartResult(StoreStatus.CANNOT_UNDERSTAND, None, None))
        if not results:
            return _error(400, "the request contains no parts")

        status = http_status(results)
        metrics.STOW_REQUESTS.labels(str(status)).inc()
        headers = {"Retry-After": str(self._settings.retry_after_s)} if status == 503 else None
        log.info(
            "STOW-RS request handled",
            extra={
                "http_status": status,
                "parts": len(results),
                "stored": sum(r.status is StoreStatus.SUCCESS for r in results),
                "protocol": "stow-rs",
                "peer_address": request.remote,
            },
        )
        return web.json_response(
            response_body(results), status=status, content_type=DICOM_JSON, headers=headers
        )

    async def _read_parts(self, request: web.Request, origin: Origin) -> list[PartResult]:
        """Spool the parts one after the other, claim-check up to ``stow_concurrency``
        of them at once, and return their results in part order.

        Returns (or raises) only once every started claim check has settled.

        Raises:
            BodyTooLarge: the body passed ``max_request_bytes`` or ``max_parts``.
            ValueError: malformed multipart framing.
        """
        body = _CountedBody(request.content, self._settings.max_request_bytes)
        reader = MultipartReader(request.headers, cast(StreamReader, body))
        slots = asyncio.Semaphore(self._settings.stow_concurrency)
        results: list[PartResult | asyncio.Task[PartResult]] = []
        try:
            while (part := await reader.next()) is not None:
                if len(results) >= self._settings.max_parts:
                    raise BodyTooLarge("request holds more parts than the configured limit")
                if not isinstance(part, BodyPartReader):
                    results.append(PartResult(StoreStatus.CANNOT_UNDERSTAND, None, None))
                    continue
                ctype = part.headers.get("Content-Type", "application/dicom").split(";")[0]
                if ctype.strip().lower() != "application/dicom":
                    # Read to its end (counted by ``body``), never kept.
                    while await part.read_chunk(_CHUNK):
                        pass
                    results.append(PartResult(StoreStatus.CANNOT_UNDERSTAND, None, None))
                    continue
                await slots.acquire()
                try:
                    spooled = await self._spool(part)
                except BaseException:
                    slots.release()
                    raise
                if isinstance(spooled, PartResult):
                    slots.release()
                    results.append(spooled)
                else:
                    results.append(asyncio.create_task(self._store_part(spooled, origin, slots)))
        finally:
            started = [r for r in results if isinstance(r, asyncio.Task)]
            if started:
                await asyncio.wait(started)
        return [r if isinstance(r, PartResult) else r.result() for r in results]

    async def _spool(
        self, part: BodyPartReader
    ) -> tempfile.SpooledTemporaryFile[bytes] | PartResult:
        """Read one part into a spool file; a part over the instance limit is read to
        its end (the body goes on, counted against the request limit) but the spool
        stops growing at the limit and is dropped."""
        limit = self._settings.max_instance_bytes
        size = 0
        # Closed here on failure, else by _store_part once its claim check settled.
        spool = tempfile.SpooledTemporaryFile(max_size=self._settings.spool_memory_bytes)  # noqa: SIM115
        try:
            while chunk := await part.read_chunk(_CHUNK):
                size += len(chunk)
                if size <= limit:
                    spool.write(chunk)
                elif spool.tell():
                    spool.seek(0)
                    spool.truncate(0)
        except BaseException:
            spool.close()
            raise
        if size > limit:
            spool.close()
            return PartResult(StoreStatus.INSTANCE_TOO_LARGE, None, None)
        return spool

    async def _store_part(
        self,
        spool: tempfile.SpooledTemporaryFile[bytes],
        origin: Origin,
        slots: asyncio.Semaphore,
    ) -> PartResult:
        """Claim-check one spooled part (never raises); then free its spool and slot."""
        try:
            stored = await self._claim_check.store(spool, origin)  # type: ignore[arg-type]
        except NotStored as exc:
            header = exc.header
            return PartResult(
                exc.status,
                header.sop_class_uid if header else None,
                header.sop_instance_uid if header else None,
            )
        except Exception:
            # A bug must cost this part, not the request or the service.
            log.exception("unexpected error storing a STOW-RS part")
            return PartResult(StoreStatus.PROCESSING_FAILURE, None, None)
        finally:
            spool.close()
            slots.release()
        header = stored.header
        return PartResult(StoreStatus.SUCCESS, header.sop_class_uid, header.sop_instance_uid)
