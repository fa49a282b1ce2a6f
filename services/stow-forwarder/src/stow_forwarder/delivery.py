"""Delivering forward requests to one destination: batches per study, verified
bytes, conversion when the destination needs another syntax, retries within a
budget, and one outcome event per instance.

Order of effects for each batch: intent in the batch's marker (every request
``sending``) → send → destination acknowledges → the same marker rewritten with what
was accepted ``delivered`` → ``dicom.forward.completed`` per instance → offset
committed (:mod:`stow_forwarder.markers`: one LIST per batch to check, one PUT to
state the intent, one per answer to record it). A replayed request that a marker of
its study records as delivered is not sent again. One that is only ``sending`` was
perhaps sent by a process that crashed before the answer came or before the marker
was written: the destination is asked first (QIDO-RS), and what it already has is
recorded as delivered instead of sent a second time. (A DIMSE destination is not
asked; it gets the instance again and answers 0x0111 or stores it once.)

The per-instance bucket and broker work is what keeps a destination waiting, so it
runs concurrently (``io_concurrency`` at a time) and beside the request on the wire:
while one batch is sent, the next is checked against the markers and downloaded, and
the previous one's markers and outcome events are written. A partition's fetch is
finished, and its offset committed, only when every outcome of it is acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from aiokafka import ConsumerRecord

from radflow_codecs.codecs import Target
from radflow_codecs.streaming import normalize_file
from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore
from radflow_core.errors import BlobIntegrityError, BlobNotFound, PipelineError
from radflow_core.events import (
    BlobRef,
    Deidentification,
    Envelope,
    ForwardCompleted,
    ForwardFailed,
    ForwardRequested,
)
from radflow_core.instance_header import PATIENT_ID_LIMIT, read_patient_id
from radflow_core.kafka import EventProducer
from radflow_core.retry import Turn, current_turn
from radflow_rules.deidentification import enforced
from radflow_rules.rules import Destination
from stow_forwarder.answer import Answer, DestinationClient, Outgoing, SentAs
from stow_forwarder.deidentify import DeidentificationError, Deidentifier, NoDeidentificationKey
from stow_forwarder.flow import CircuitBreaker, StatFirst
from stow_forwarder.markers import BatchMarker, MarkerBook, State
from stow_forwarder.metrics import (
    BATCH_SIZE,
    DEIDENTIFIED,
    DEIDENTIFY_REFUSED,
    DELIVERED,
    FAILED,
    IN_FLIGHT,
    LATENCY,
    RETRIED,
    SKIPPED,
)
from stow_forwarder.pseudonyms import Pseudonyms
from stow_forwarder.settings import ForwarderSettings
from stow_forwarder.slo import count_delivery, count_failure
from stow_forwarder.verify import Delivered, Verifier

log = logging.getLogger(__name__)

_T = TypeVar("_T")
_R = TypeVar("_R")


@dataclass
class Prepared:
    request: ForwardRequested
    path: Path
    transfer_syntax_uid: str
    size: int
    sent: SentAs
    """Its UIDs at the destination (remapped when de-identified)."""
    suspect: bool = False
    """An intent marker was found: an earlier process may have sent it already."""
    marker: BatchMarker | None = None
    """The marker of the batch it is sent in."""

    def outgoing(self) -> Outgoing:
        return Outgoing(
            self.sent.sop_instance_uid,
            self.request.sop_class_uid,
            self.transfer_syntax_uid,
            self.path,
        )


@dataclass
class Staged:
    """One chunk ready to send: its instances on disk in their spool directory."""

    prepared: list[Prepared]
    spool: tempfile.TemporaryDirectory[str]

    def close(self) -> None:
        self.spool.cleanup()


@dataclass
class Fetch:
    """What one partition's fetch has under way besides the request on the wire: the
    markers and outcome events being written, and which requests a destination has
    accepted so far (a request repeated later in the fetch is not sent again)."""

    limit: int
    sources: dict[int, ConsumerRecord[bytes, bytes]] = field(default_factory=dict)
    """Each request's record (by the request object's id): what its dead letter carries,
    to be replayed as it was."""
    accepted: set[str] = field(default_factory=set)
    """Idempotency keys the destination acknowledged during this fetch."""
    settling: list[asyncio.Task[object]] = field(default_factory=list)

    def source(self, request: ForwardRequested) -> ConsumerRecord[bytes, bytes]:
        return self.sources[id(request)]

    def settle(self, work: Coroutine[Any, Any, object]) -> None:
        self.settling.append(asyncio.create_task(work))

    def check(self) -> None:
        """Raise the failure of any settlement already finished (e.g. the bucket or
        the broker went away), so no further batch goes out on a fetch that will be
        read again anyway."""
        for task in self.settling:
            failure = task.exception() if task.done() and not task.cancelled() else None
            if failure is not None:
                raise failure

    async def drain(self) -> None:
        """Wait for every settlement; raise the first failure."""
        results = await asyncio.gather(*self.settling, return_exceptions=True)
        self.settling.clear()
        for result in results:
            if isinstance(result, BaseException):
                raise result


async def bounded(items: Sequence[_T], work: Callable[[_T], Awaitable[_R]], limit: int) -> list[_R]:
    """``work`` on every item, at most ``limit`` at once, results in the items' order.

    Every item is finished before the first failure is raised, so nothing is left
    writing behind a caller that gives up."""
    gate = asyncio.Semaphore(limit)

    async def one(item: _T) -> _R:
        async with gate:
            return await work(item)

    results = await asyncio.gather(*(one(item) for item in items), return_exceptions=True)
    done: list[_R] = []
    for result in results:
        if isinstance(result, BaseException):
            raise result
        done.append(result)
    return done


def chunks(
    requests: Sequence[ForwardRequested], max_count: int, max_bytes: int
) -> Iterator[list[ForwardRequested]]:
    """Requests grouped by study, at most ``max_count`` and about ``max_bytes`` per
    chunk, never two with the same SOP Instance UID (the response could not tell them
    apart).

    Studies come in the order of their first request and each study's requests in
    their own order, so studies interleaved in a fetch (one partition carries many)
    still go ``max_count`` per request rather than one."""
    studies: dict[str, list[ForwardRequested]] = {}
    for request in requests:
        studies.setdefault(request.study_instance_uid, []).append(request)
    for study in studies.values():
        chunk: list[ForwardRequested] = []
        uids: set[str] = set()
        size = 0
        for request in study:
            full = chunk and (
                len(chunk) >= max_count
                or size + request.blob.size > max_bytes
                or request.sop_instance_uid in uids
            )
            if full:
                yield chunk
                chunk, uids, size = [], set(), 0
            chunk.append(request)
            uids.add(request.sop_instance_uid)
            size += request.blob.size
        if chunk:
            yield chunk


class Deliverer:
    """Everything sent to one destination goes through one of these (its STAT and its
    routine consumer share it, so the STAT-first gate and the breaker are one)."""

    def __init__(
        self,
        destination: Destination,
        client: DestinationClient,
        blobs: BlobStore,
        producer: EventProducer,
        settings: ForwarderSettings,
        audit: Auditor | None = None,
        pseudonyms: Pseudonyms | None = None,
    ) -> None:
        self.destination = destination
        self._audit = audit
        self._pseudonyms = pseudonyms
        self.name = destination.name
        self._client = client
        self._blobs = blobs
        self._producer = producer
        self._settings = settings
        self.breaker = CircuitBreaker(
            destination.name, settings.breaker_failures, settings.breaker_cooldown_s
        )
        self._gate = StatFirst()
        self._markers = MarkerBook(blobs, destination)
        self._verifier = Verifier(
            destination, client, producer, self._markers, settings, self._failed
        )
        for reason in ("rejected", "retries_exhausted"):
            # At 0 from the start: the dashboard's rate() draws the first failure of a
            # destination, which a counter appearing at 1 would hide.
            FAILED.labels(self.name, reason)

    async def handle_batch(
        self, items: list[tuple[Envelope[ForwardRequested], ConsumerRecord[bytes, bytes]]]
    ) -> None:
        """A partition's fetch: deliver the requests for this destination, each study's
        in order. Returns when every outcome is acknowledged; raises (nothing of the
        fetch is committed, it is read again) if any could not be."""
        mine = [(e.data, record) for e, record in items if e.data.destination == self.name]
        requests = [request for request, _ in mine]
        batches = list(chunks(requests, self.destination.max_batch, self._settings.max_batch_bytes))
        fetch = Fetch(self._settings.io_concurrency, {id(r): record for r, record in mine})
        try:
            await self._pipeline(batches, fetch)
        except BaseException:
            with contextlib.suppress(Exception):  # the first failure is the one to report
                await fetch.drain()
            raise
        await fetch.drain()

    async def _pipeline(self, batches: list[list[ForwardRequested]], fetch: Fetch) -> None:
        """Send the batches one after the other, staging the next while one is sent."""
        if not batches:
            return
        staging = asyncio.create_task(self._stage(batches[0], fetch))
        for index in range(len(batches)):
            staged = await staging
            following = index + 1 < len(batches)
            if following:
                staging = asyncio.create_task(self._stage(batches[index + 1], fetch))
            try:
                fetch.check()
                await self._send(staged.prepared, fetch)
            except BaseException:
                if following:
                    await _discard(staging)
                raise
            finally:
                await asyncio.to_thread(staged.close)

    async def _stage(self, chunk: list[ForwardRequested], fetch: Fetch) -> Staged:
        """The study's markers checked (one LIST), bytes downloaded (and converted)
        ``io_concurrency`` at a time, and the intent to send them recorded in one
        marker; requests already delivered or unsendable get their outcome here."""
        spool = tempfile.TemporaryDirectory(prefix="radflow-forward-")
        try:
            # A chunk is one study's (chunks()).
            states = await self._markers.states(chunk[0].study_instance_uid)
            ready = await bounded(
                chunk,
                lambda request: self._prepare(
                    request, states.get(request.idempotency_key), Path(spool.name), fetch
                ),
                fetch.limit,
            )
            prepared = [p for p in ready if p is not None]
            if self._verifier.enabled:
                # Recognised as delivered and not sent: perhaps an earlier process was
                # stopped before it verified them.
                now = datetime.now(UTC)
                replayed = [
                    Delivered(r, now, 1, fetch.source(r), self.sent_as(r))
                    for r in chunk
                    if states.get(r.idempotency_key) is State.DELIVERED
                ]
                if replayed:
                    fetch.settle(self._verifier.verify(replayed))
            if prepared:
                marker = self._markers.batch(
                    chunk[0].study_instance_uid, [p.request.idempotency_key for p in prepared]
                )
                await marker.write()
                for p in prepared:
                    p.marker = marker
        except BaseException:
            spool.cleanup()
            raise
        return Staged(prepared, spool)

    async def _prepare(
        self, request: ForwardRequested, state: State | None, spool: Path, fetch: Fetch
    ) -> Prepared | None:
        """The bytes to send, verified, in the requested syntax; None if already
        delivered or dead-lettered."""
        if state is State.DELIVERED:
            SKIPPED.labels(self.name).inc()
            await self._completed(request, request.transfer_syntax_uid, 0, 1, replay=True)
            return None
        prepared = await self._bytes_to_send(request, spool, fetch.source(request))
        if prepared is not None and state is State.SENDING:
            prepared.suspect = True
        return prepared

    async def _bytes_to_send(
        self, request: ForwardRequested, spool: Path, source: ConsumerRecord[bytes, bytes]
    ) -> Prepared | None:
        path = spool / f"{request.idempotency_key}.dcm"
        try:
            await self._download(request, path)
        except (BlobIntegrityError, BlobNotFound) as exc:
            await self._failed(request, source, exc.reason, str(exc), 0, retriable=False)
            return None
        wanted = request.requested_transfer_syntax_uid
        if wanted == request.transfer_syntax_uid:
            return await self._deidentified(
                Prepared(request, path, wanted, request.blob.size, self.sent_as(request)), source
            )
        if wanted not in {t.value for t in Target}:
            await self._failed(
                request,
                source,
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
            await self._failed(request, source, "cannot_convert", exc.reason, 0, retriable=False)
            return None
        prepared = Prepared(
            request, converted, wanted, converted.stat().st_size, self.sent_as(request)
        )
        return await self._deidentified(prepared, source)

    def deidentification(self, request: ForwardRequested) -> Deidentification | None:
        """What this delivery applies: the request's de-identification, at least as
        strict as the destination's ``deidentify:`` in this process's rule file."""
        return enforced(request.deidentify, self.destination.deidentify)

    def sent_as(self, request: ForwardRequested) -> SentAs:
        """The request's UIDs as the destination knows them: remapped by the route's
        de-identification (computed from the UIDs and the key alone, so a replay that
        sends nothing still asks the destination about the right ones)."""
        deid = self.deidentification(request)
        if deid is None or self._pseudonyms is None:
            return SentAs(
                request.study_instance_uid, request.series_instance_uid, request.sop_instance_uid
            )
        uid = Deidentifier(deid, self._pseudonyms).uid
        return SentAs(
            uid(request.study_instance_uid),
            uid(request.series_instance_uid),
            uid(request.sop_instance_uid),
        )

    async def _deidentified(
        self, prepared: Prepared, source: ConsumerRecord[bytes, bytes]
    ) -> Prepared | None:
        """The bytes to send de-identified as the route asks (a new file beside them),
        or as they are when it asks for nothing; None when the instance is refused
        (dead-lettered with the reason: burned-in annotation, no key, unreadable)."""
        request = prepared.request
        deid = self.deidentification(request)
        if deid is None:
            return prepared
        if deid != request.deidentify:
            log.warning(
                "the destination requires de-identification the request did not carry "
                "(routed by an older rule file?); applied",
                extra={
                    "sop_instance_uid": request.sop_instance_uid,
                    "destination": self.name,
                    "rules_digest": request.rules_digest,
                },
            )
        target = prepared.path.with_suffix(".deid.dcm")
        try:
            if self._pseudonyms is None:
                raise NoDeidentificationKey(
                    "the route de-identifies and no key is configured "
                    "(RADFLOW_DEID_KEY or RADFLOW_DEID_KEY_FILE); nothing was sent"
                )
            deidentifier = Deidentifier(deid, self._pseudonyms)
            await asyncio.to_thread(deidentifier.file, prepared.path, target)
        except DeidentificationError as exc:
            DEIDENTIFY_REFUSED.labels(self.name, deid.profile, exc.reason).inc()
            await self._failed(request, source, exc.reason, str(exc), 0, retriable=exc.retriable)
            return None
        DEIDENTIFIED.labels(self.name, deid.profile).inc()
        prepared.path = target
        prepared.size = target.stat().st_size
        return prepared

    async def _download(self, request: ForwardRequested, path: Path) -> None:
        """The blob into ``path``, verified. The file is opened and closed in a worker
        thread too: on a busy disk that takes milliseconds the event loop cannot spare."""
        file = await asyncio.to_thread(path.open, "wb")
        try:
            await self._blobs.download(request.blob, file)
        finally:
            await asyncio.to_thread(file.close)

    async def _send(self, prepared: list[Prepared], fetch: Fetch) -> None:
        repeated = [p for p in prepared if p.request.idempotency_key in fetch.accepted]
        if repeated:
            SKIPPED.labels(self.name).inc(len(repeated))
            fetch.settle(bounded(repeated, self._replayed, fetch.limit))
        pending = {
            p.sent.sop_instance_uid: p
            for p in prepared
            if p.request.idempotency_key not in fetch.accepted
        }
        if not pending:
            return
        lane = next(iter(pending.values())).request.lane
        turn = current_turn()
        first = time.monotonic()
        attempt = 0
        while pending:
            turn.check()
            attempt += 1
            if any(p.suspect for p in pending.values()):
                await self._found_at_destination(pending, fetch)
                if not pending:
                    return
            BATCH_SIZE.labels(self.name).observe(len(pending))
            IN_FLIGHT.labels(self.name).inc(len(pending))
            try:
                async with self._gate.turn(lane), self.breaker.attempt(turn.hand_back):
                    answer = await self._client.store(
                        [p.outgoing() for p in pending.values()], lane
                    )
            finally:
                IN_FLIGHT.labels(self.name).dec(len(pending))
            if answer.peer_unavailable:
                self.breaker.failed()
            else:
                self.breaker.succeeded()
            self._settle(pending, answer, attempt, fetch)
            if not pending:
                return
            cause = next(iter(answer.retry.values()))
            if time.monotonic() - first >= self._settings.retry_budget_s:
                message = (
                    f"retry budget of {self._settings.retry_budget_s:g}s used up; last: {cause}"
                )
                self._give_up(list(pending.values()), message, attempt, answer, fetch)
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
            await self._backoff(turn, attempt, answer.retry_after_s)

    async def _found_at_destination(self, pending: dict[str, Prepared], fetch: Fetch) -> None:
        """Take out of ``pending`` what the destination already holds of the instances
        an earlier, interrupted attempt may have sent; they are recorded as delivered."""
        studies: dict[str, list[str]] = {}
        for uid, p in pending.items():
            if p.suspect:
                studies.setdefault(p.sent.study_instance_uid, []).append(uid)
        found: list[Prepared] = []
        for study, uids in studies.items():
            held = await self._client.holds(study, uids)
            found += [pending.pop(uid) for uid in uids if uid in held]
        if not found:
            return
        SKIPPED.labels(self.name).inc(len(found))
        fetch.accepted.update(p.request.idempotency_key for p in found)
        log.info(
            "already at the destination after an interrupted send; not sent again",
            extra={"destination": self.name, "count": len(found)},
        )
        fetch.settle(self._record(found, 1, fetch, replay=True))

    async def _record(
        self, accepted: list[Prepared], attempt: int, fetch: Fetch, replay: bool = False
    ) -> None:
        """Acknowledged requests: their batch's marker says delivered (one PUT per
        batch), then each gets its completed event; then, with ``verify:``, the
        destination is asked whether it holds them."""
        markers = {id(p.marker): p.marker for p in accepted if p.marker is not None}
        for marker in markers.values():
            await marker.delivered(
                p.request.idempotency_key for p in accepted if p.marker is marker
            )

        async def completed(p: Prepared) -> None:
            size = 0 if replay else p.size
            await self._completed(p.request, p.transfer_syntax_uid, size, attempt, replay=replay)

        acknowledged_at = datetime.now(UTC)
        await bounded(accepted, completed, fetch.limit)
        await self._verifier.verify(
            [
                Delivered(p.request, acknowledged_at, attempt, fetch.source(p.request), p.sent)
                for p in accepted
            ]
        )

    def _settle(
        self, pending: dict[str, Prepared], answer: Answer, attempt: int, fetch: Fetch
    ) -> None:
        """Take what the destination accepted or refused out of ``pending``; their
        markers and outcome events are written beside the next request."""
        accepted = [pending.pop(uid) for uid in answer.delivered]
        fetch.accepted.update(p.request.idempotency_key for p in accepted)
        refused = [(pending.pop(uid), reason) for uid, reason in answer.refused.items()]

        async def refuse(item: tuple[Prepared, tuple[int | None, str]]) -> None:
            p, (status, message) = item
            await self._failed(
                p.request,
                fetch.source(p.request),
                "rejected",
                message,
                attempt,
                retriable=False,
                http_status=answer.http_status,
                dicom_status=status,
            )

        if accepted:
            fetch.settle(self._record(accepted, attempt, fetch))
        if refused:
            fetch.settle(bounded(refused, refuse, fetch.limit))

    def _give_up(
        self, left: list[Prepared], message: str, attempt: int, answer: Answer, fetch: Fetch
    ) -> None:
        async def exhausted(p: Prepared) -> None:
            await self._failed(
                p.request,
                fetch.source(p.request),
                "retries_exhausted",
                message,
                attempt,
                retriable=True,
                http_status=answer.http_status,
            )

        fetch.settle(bounded(left, exhausted, fetch.limit))

    async def _replayed(self, p: Prepared) -> None:
        await self._completed(p.request, p.transfer_syntax_uid, 0, 1, replay=True)

    async def _backoff(self, turn: Turn, attempt: int, retry_after_s: float | None) -> None:
        """Wait before the next attempt, shown as the group waiting on its destination.

        Raises:
            HandedBack: the turn is handed back meanwhile (stop, or revocation).
        """
        await turn.pause(
            attempt,
            "destination_unavailable",
            initial_s=self._settings.retry_initial_s,
            max_s=self._settings.retry_max_s,
            at_least_s=(
                None if retry_after_s is None else min(retry_after_s, self._settings.retry_budget_s)
            ),
        )

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
            verification=self._verifier.method,
        )
        await self._producer.publish(event, request.key)
        if not replay:
            self._audit_sent(request)
            DELIVERED.labels(self.name, request.lane.value).inc()
            LATENCY.labels(self.name, request.lane.value).observe(latency)
            count_delivery(self.destination, request.lane, latency)
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
        source: ConsumerRecord[bytes, bytes],
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
            source_topic=source.topic,
            source_partition=source.partition,
            source_offset=source.offset,
            original_key=source.key.decode("utf-8", "replace") if source.key else None,
            original_value=(source.value or b"").decode("utf-8", "replace"),
        )
        await self._producer.publish(event, request.key)
        self._audit_sent(request, failure=reason)
        FAILED.labels(self.name, reason).inc()
        count_failure(self.destination, request.lane)
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

    def _audit_sent(self, request: ForwardRequested, failure: str | None = None) -> None:
        if self._audit is None:
            return
        peer = self.destination.dimse
        self._audit.instance_sent(
            self.name,
            study=request.study_instance_uid,
            sop_class=request.sop_class_uid,
            sop_instance=request.sop_instance_uid,
            address=peer.host if peer else urlsplit(self.destination.url).hostname,
            destination_ae=peer.ae_title if peer else None,
            calling_ae=peer.calling_ae_title if peer else None,
            failure=failure,
            patient=functools.partial(self._patient_of, request.blob),
            deidentified=deid.profile if (deid := self.deidentification(request)) else None,
        )

    async def _patient_of(self, blob: BlobRef) -> str | None:
        """The Patient ID the audit message needs (events carry none): read from the
        header of the blob that was sent, one ranged GET, when the message is written."""
        return await self._blobs.read_partially(blob, read_patient_id, PATIENT_ID_LIMIT)


async def _discard(staging: asyncio.Task[Staged]) -> None:
    """Stop staging a batch that will not be sent now, and drop its spool."""
    staging.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        (await staging).close()
