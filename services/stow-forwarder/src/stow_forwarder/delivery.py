"""Delivering forward requests to one destination: batches per study, verified
bytes, conversion when the destination needs another syntax, retries within a
budget, and one outcome event per instance.

Order of effects for each instance: send → destination acknowledges → delivery
marker in the bucket → ``dicom.forward.completed`` → offset committed. A replayed
request finds the marker and is not sent again; a crash before the marker sends the
instance once more, which a DICOMweb server stores once (same SOP Instance UID).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import ConsumerRecord

from radflow_core.blobstore import BlobStore
from radflow_core.codecs import Target
from radflow_core.errors import BlobIntegrityError, BlobNotFound, PipelineError
from radflow_core.events import (
    Envelope,
    ForwardCompleted,
    ForwardFailed,
    ForwardRequested,
)
from radflow_core.kafka import EventProducer, backoff_delay
from radflow_core.streaming_codecs import normalize_file
from router.rules import Destination
from stow_forwarder.answer import Answer, DestinationClient, Outgoing
from stow_forwarder.flow import CircuitBreaker, StatFirst
from stow_forwarder.metrics import (
    BATCH_SIZE,
    DELIVERED,
    FAILED,
    IN_FLIGHT,
    LATENCY,
    RETRIED,
    SKIPPED,
)
from stow_forwarder.settings import ForwarderSettings

log = logging.getLogger(__name__)

DELIVERED_MARKER = "delivered"


class Abandoned(PipelineError):
    """Shutting down mid-batch: nothing of it is committed; it is read again."""

    reason = "abandoned"
    retriable = True


@dataclass
class Prepared:
    request: ForwardRequested
    path: Path
    transfer_syntax_uid: str
    size: int

    def outgoing(self) -> Outgoing:
        return Outgoing(
            self.request.sop_instance_uid,
            self.request.sop_class_uid,
            self.transfer_syntax_uid,
            self.path,
        )


@dataclass
class Outcome:
    request: ForwardRequested
    attempts: int


def marker_key(destination: str, idempotency_key: str) -> str:
    scope = hashlib.sha256(destination.encode("utf-8")).hexdigest()[:16]
    return f"{DELIVERED_MARKER}/{scope}/{idempotency_key}"


def chunks(
    requests: Sequence[ForwardRequested], max_count: int, max_bytes: int
) -> Iterator[list[ForwardRequested]]:
    """Consecutive requests of one study, at most ``max_count`` and about ``max_bytes``
    per chunk, never two with the same SOP Instance UID (the response could not tell
    them apart)."""
    chunk: list[ForwardRequested] = []
    size = 0
    for request in requests:
        full = chunk and (
            len(chunk) >= max_count
            or size + request.blob.size > max_bytes
            or request.study_instance_uid != chunk[0].study_instance_uid
            or any(r.sop_instance_uid == request.sop_instance_uid for r in chunk)
        )
        if full:
            yield chunk
            chunk, size = [], 0
        chunk.append(request)
        size += request.blob.size
    if chunk:
        yield chunk


class Deliverer:
    """Everything sent to one destination goes through one of these."""

    def __init__(
        self,
        destination: Destination,
        client: DestinationClient,
        blobs: BlobStore,
        producer: EventProducer,
        settings: ForwarderSettings,
        stopping: asyncio.Event,
    ) -> None:
        self.destination = destination
        self.name = destination.name
        self._client = client
        self._blobs = blobs
        self._producer = producer
        self._settings = settings
        self._stopping = stopping
        self.breaker = CircuitBreaker(
            destination.name, settings.breaker_failures, settings.breaker_cooldown_s
        )
        self._gate = StatFirst()

    async def handle_batch(
        self, items: list[tuple[Envelope[ForwardRequested], ConsumerRecord[bytes, bytes]]]
    ) -> None:
        """A partition's fetch: deliver the requests for this destination, in order."""
        mine = [envelope.data for envelope, _ in items if envelope.data.destination == self.name]
        for chunk in chunks(mine, self.destination.max_batch, self._settings.max_batch_bytes):
            await self.deliver(chunk)

    async def deliver(self, chunk: list[ForwardRequested]) -> None:
        todo = []
        for request in chunk:
            if await self._blobs.exists(marker_key(self.name, request.idempotency_key)):
                SKIPPED.labels(self.name).inc()
                await self._completed(request, request.transfer_syntax_uid, 0, 1, replay=True)
            else:
                todo.append(request)
        if not todo:
            return
        with tempfile.TemporaryDirectory(prefix="radflow-forward-") as spool:
            prepared = []
            for request in todo:
                ready = await self._prepare(request, Path(spool))
                if ready is not None:
                    prepared.append(ready)
            if prepared:
                await self._send(prepared)

    async def _prepare(self, request: ForwardRequested, spool: Path) -> Prepared | None:
        """The bytes to send, verified, in the requested syntax; None if dead-lettered."""
        path = spool / f"{request.idempotency_key}.dcm"
        try:
            with path.open("wb") as file:
                await self._blobs.download(request.blob, file)
        except (BlobIntegrityError, BlobNotFound) as exc:
            await self._failed(request, exc.reason, str(exc), 0, retriable=False)
            return None
        wanted = request.requested_transfer_syntax_uid
        if wanted == request.transfer_syntax_uid:
            return Prepared(request, path, wanted, request.blob.size)
        if wanted not in {t.value for t in Target}:
            await self._failed(
                request,
                "cannot_convert",
                f"the destination accepts only {wanted}, which is not a lossless target",
                0,
                retriable=False,
            )
            return None
        converted = spool / f"{request.idempotency_key}.{wanted}.dcm"
        try:
            await asyncio.to_thread(normalize_file, path, converted, Target(wanted))
        except PipelineError as exc:
            await self._failed(request, "cannot_convert", exc.reason, 0, retriable=False)
            return None
        return Prepared(request, converted, wanted, converted.stat().st_size)

    async def _send(self, prepared: list[Prepared]) -> None:
        lane = prepared[0].request.lane
        pending = {p.request.sop_instance_uid: p for p in prepared}
        first = time.monotonic()
        attempt = 0
        while pending:
            if self._stopping.is_set():
                raise Abandoned("stopping before the batch was delivered")
            attempt += 1
            BATCH_SIZE.labels(self.name).observe(len(pending))
            IN_FLIGHT.labels(self.name).inc(len(pending))
            try:
                async with self._gate.turn(lane), self.breaker.attempt(self._stopping):
                    answer = await self._client.store(
                        [p.outgoing() for p in pending.values()], lane
                    )
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    raise Abandoned("stopping while the destination's circuit is open") from None
                raise
            finally:
                IN_FLIGHT.labels(self.name).dec(len(pending))
            if answer.peer_unavailable:
                self.breaker.failed()
            else:
                self.breaker.succeeded()
            await self._settle(pending, answer, attempt)
            if not pending:
                return
            cause = next(iter(answer.retry.values()))
            if time.monotonic() - first >= self._settings.retry_budget_s:
                for p in list(pending.values()):
                    await self._failed(
                        p.request,
                        "retries_exhausted",
                        f"retry budget of {self._settings.retry_budget_s:g}s used up; last: "
                        f"{cause}",
                        attempt,
                        retriable=True,
                        http_status=answer.http_status,
                    )
                return
            RETRIED.labels(self.name, cause.split(" (")[0][:40]).inc()
            log.warning(
                "destination not reached; will retry",
                extra={
                    "destination": self.name,
                    "reason": cause,
                    "attempt": attempt,
                    "count": len(pending),
                    "http_status": answer.http_status,
                },
            )
            await self._backoff(attempt, answer.retry_after_s)

    async def _settle(self, pending: dict[str, Prepared], answer: Answer, attempt: int) -> None:
        for uid in answer.delivered:
            p = pending.pop(uid)
            await self._blobs.put_bytes(
                marker_key(self.name, p.request.idempotency_key),
                b"",
                kind=DELIVERED_MARKER,
                check_existing=False,
            )
            await self._completed(p.request, p.transfer_syntax_uid, p.size, attempt)
        for uid, (reason, message) in answer.refused.items():
            p = pending.pop(uid)
            await self._failed(
                p.request,
                "rejected",
                message,
                attempt,
                retriable=False,
                http_status=answer.http_status,
                dicom_status=reason,
            )

    async def _backoff(self, attempt: int, retry_after_s: float | None) -> None:
        delay = backoff_delay(attempt, self._settings.retry_initial_s, self._settings.retry_max_s)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, self._settings.retry_budget_s))
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        except TimeoutError:
            return
        raise Abandoned("stopping during a retry backoff")

    async def _completed(
        self,
        request: ForwardRequested,
        transfer_syntax_uid: str,
        size: int,
        attempts: int,
        replay: bool = False,
    ) -> None:
        now = datetime.now(UTC)
        latency = max(0.0, (now - request.received_at).total_seconds())
        event = ForwardCompleted(
            **request.identity(),
            destination=self.name,
            lane=request.lane,
            idempotency_key=request.idempotency_key,
            original_sha256=request.original_sha256,
            attempts=attempts,
            transfer_syntax_uid=transfer_syntax_uid,
            size=size,
            delivered_at=now,
            latency_s=latency,
            already_delivered=replay,
        )
        await self._producer.publish(event, request.key)
        if not replay:
            DELIVERED.labels(self.name, request.lane.value).inc()
            LATENCY.labels(self.name, request.lane.value).observe(latency)
        log.info(
            "delivered" if not replay else "already delivered; not sent again",
            extra={
                "sop_instance_uid": request.sop_instance_uid,
                "destination": self.name,
                "lane": request.lane.value,
                "attempt": attempts,
                "duration_ms": round(latency * 1000),
            },
        )

    async def _failed(
        self,
        request: ForwardRequested,
        reason: str,
        message: str,
        attempts: int,
        *,
        retriable: bool,
        http_status: int | None = None,
        dicom_status: int | None = None,
    ) -> None:
        event = ForwardFailed(
            **request.identity(),
            destination=self.name,
            lane=request.lane,
            idempotency_key=request.idempotency_key,
            original_sha256=request.original_sha256,
            attempts=max(1, attempts),
            reason=reason,
            http_status=http_status,
            dicom_status=dicom_status,
            message=message,
            retriable=retriable,
            failed_at=datetime.now(UTC),
        )
        await self._producer.publish(event, request.key)
        FAILED.labels(self.name, reason).inc()
        log.warning(
            "delivery failed",
            extra={
                "sop_instance_uid": request.sop_instance_uid,
                "destination": self.name,
                "reason": reason,
                "http_status": http_status,
                "status": dicom_status,
            },
        )
