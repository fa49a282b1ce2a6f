"""The claim check: blob in S3, then event on Kafka, then (and only then) success.

Both receivers (DIMSE and STOW-RS) hand every instance to :meth:`ClaimCheck.store`.
It returns only after the original bytes are stored and the ``dicom.instance.received``
event is acknowledged with acks=all; anything else raises, and the receiver answers
with a status the sender will retry (A700 / HTTP 503). The blob is written before the
event, so an event never points at a missing blob; a blob without an event (broker
down) is harmless and is announced when the sender retries.

The original stored is ingest's own file meta followed by the data set bytes exactly
as received (:mod:`radflow_core.file_meta`): the sender's file meta (or, for a
C-STORE, the one pynetdicom writes) is replaced, so the same data set has the same
bytes and sha256 whichever protocol and sender brought it.

Duplicates: every claim check announces, unless this process announced the same bytes
(the same content key) recently: a bounded set of the last :data:`RECENT_ANNOUNCED`
keys acknowledged by the broker answers that, with no round trip. A repeat it does
not remember (another process or worker, a restart, long ago) is announced again;
that is safe because every consumer is idempotent on the sha256: transcode finds its
``normalized/`` marker for the same bytes and target and publishes nothing, and a
normalized event that does get through twice carries the same idempotency key per
destination, which the forwarder's delivery markers send once. Claim checks of the
same bytes that overlap in this process (one STOW-RS request carrying an instance
twice, two associations) wait for the first one instead of announcing it twice.

Round trips: one PUT and one send before the answer, nothing else. An original up
to the S3 part size is PUT without asking first (writing the same bytes to their
content-addressed key again costs less than a HEAD; the PUT reuses the sha256
computed here as its signed payload hash, :meth:`BlobStore.put_file`); a larger
one is looked up first, so it is never uploaded twice.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import BinaryIO

from ingest import metrics
from ingest.lanes import Lanes
from radflow_core.audit import Auditor
from radflow_core.blobstore import BlobStore, HashedFile, content_key
from radflow_core.dicom_status import StoreStatus
from radflow_core.errors import PipelineError
from radflow_core.events import (
    BlobRef,
    InstanceReceived,
    Lane,
    OrderPriority,
    Priority,
    Sender,
    WorklistItem,
)
from radflow_core.file_meta import CanonicalFile, dataset_offset, encode_file_meta
from radflow_core.instance_header import (
    Accession,
    InstanceHeader,
    InvalidInstance,
    read_header_and_identifiers,
)
from radflow_core.kafka import EventProducer
from radflow_core.order_table import OrderTable
from radflow_core.structure import DEFAULT_MAX_DEPTH, check_structure

log = logging.getLogger(__name__)

ORIGINAL = "original"
RECENT_ANNOUNCED = 4096
"""Content keys of announced originals a claim check remembers (about 0.5 MB): a
sender's retry of an instance it did not hear back about, or an instance sent
twice in one study, is recognised without an event; older repeats are announced
again, which the consumers tolerate."""


@dataclass(frozen=True)
class Expected:
    """What the sender announced about the instance, to be checked against the data."""

    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None


@dataclass(frozen=True)
class Origin:
    sender: Sender
    priority: Priority = Priority.MEDIUM
    expected: Expected = field(default_factory=Expected)


class NotStored(PipelineError):
    """The instance was not stored; ``status`` says why and whether to retry.

    Raised for bad data (C0xx/A900, not retriable) and for unavailable or misconfigured
    storage or an unavailable broker (A700, retriable for the sender: it is the pipeline,
    not the instance, that has to change). ``header`` holds the instance's UIDs when they could be
    read, so STOW-RS can name the failed instance.
    """

    reason = "not_stored"

    def __init__(
        self, status: StoreStatus, detail: str, cause: str, header: InstanceHeader | None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.cause = cause
        self.header = header


@dataclass(frozen=True)
class Stored:
    """A successful claim check."""

    header: InstanceHeader
    event: InstanceReceived
    duplicate: bool
    """True when these exact bytes had already been stored and announced."""
    lane: Lane = Lane.ROUTINE
    """The lane the event was published in (routine for a duplicate: none was)."""


def check_expected(header: InstanceHeader, expected: Expected) -> None:
    """Raise InvalidInstance if the data contradicts what the sender announced."""
    if expected.sop_class_uid and header.sop_class_uid != expected.sop_class_uid:
        raise InvalidInstance(
            StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "dataset SOP Class UID differs from the request's",
        )
    if expected.sop_instance_uid and header.sop_instance_uid != expected.sop_instance_uid:
        raise InvalidInstance(
            StoreStatus.SOP_INSTANCE_MISMATCH,
            "dataset SOP Instance UID differs from the request's",
        )
    if expected.study_instance_uid and header.study_instance_uid != expected.study_instance_uid:
        raise InvalidInstance(
            StoreStatus.STUDY_MISMATCH, "instance belongs to another study than the request's"
        )


@dataclass(frozen=True)
class Inspected:
    """What :func:`inspect` found in a received file."""

    hashed: HashedFile
    header: InstanceHeader
    patient_id: str | None = field(default=None, repr=False)
    """(0010,0020), for the audit message only: never in an event or a log line."""
    accession: Accession | None = field(default=None, repr=False)
    """For the order lookup only: never in an event or a log line."""


def inspect(file: BinaryIO, max_bytes: int, max_depth: int = DEFAULT_MAX_DEPTH) -> Inspected:
    """Validate a received file's whole structure, parse its header and hash the
    original ingest stores for it (blocking; run in a worker thread).

    The structure is walked first (:mod:`radflow_core.structure`, seeking over values),
    so pydicom only ever parses a file whose lengths all hold and whose transfer syntax
    is not deflated. The original is ingest's own file meta followed by the received
    data set bytes (:mod:`radflow_core.file_meta`): the returned file is a view over
    ``file`` (or ``file`` itself, when it is such a view already), which must stay
    open until the original is uploaded.
    """
    received = file.seek(0, io.SEEK_END)
    if received > max_bytes:
        raise InvalidInstance(StoreStatus.INSTANCE_TOO_LARGE, "instance exceeds the size limit")
    check_structure(file, received, max_depth)
    header, identifiers = read_header_and_identifiers(file, received)
    meta = encode_file_meta(
        header.sop_class_uid, header.sop_instance_uid, header.transfer_syntax_uid
    )
    original: CanonicalFile
    if isinstance(file, CanonicalFile) and file.meta == meta:
        original = file  # a C-STORE's data set, already behind this very file meta
    else:
        original = CanonicalFile(meta, file, dataset_offset(file))
    if original.size > max_bytes:
        raise InvalidInstance(StoreStatus.INSTANCE_TOO_LARGE, "instance exceeds the size limit")
    return Inspected(
        HashedFile.from_file(original),  # type: ignore[arg-type]
        header,
        identifiers.patient_id,
        identifiers.accession,
    )


class ClaimCheck:
    def __init__(
        self,
        blobs: BlobStore,
        producer: EventProducer,
        max_instance_bytes: int,
        lookup_above_bytes: int,
        lanes: Lanes | None = None,
        max_sequence_depth: int = DEFAULT_MAX_DEPTH,
        audit: Auditor | None = None,
        orders: OrderTable | None = None,
    ) -> None:
        """``lookup_above_bytes``: originals larger than this (the S3 part size, above
        which an upload is a multipart one) are looked up before they are uploaded;
        smaller ones are PUT without asking. ``lanes`` picks each event's lane
        (routine for every instance without it). ``max_sequence_depth``: deeper
        nested sequences are refused by the structural validation. ``orders``: the
        open orders an instance is matched with by its accession number (none: no
        order lookup, and no order reference in the events)."""
        self._orders = orders
        self._max_sequence_depth = max_sequence_depth
        self._lanes = lanes or Lanes(None)
        self._audit = audit
        self._blobs = blobs
        self._producer = producer
        self._max_instance_bytes = max_instance_bytes
        self._lookup_above_bytes = lookup_above_bytes
        self._announcing: dict[str, asyncio.Future[bool]] = {}
        """Content key → resolved True once announced, False if that claim check
        failed; held while a claim check of those bytes runs."""
        self._announced: OrderedDict[str, None] = OrderedDict()
        """The last :data:`RECENT_ANNOUNCED` content keys announced, oldest first."""

    async def store(self, file: BinaryIO, origin: Origin) -> Stored:
        """Store and announce one received Part 10 file.

        Raises:
            NotStored: with the status to answer; when retriable, nothing was announced.
        """
        started = time.perf_counter()
        protocol = origin.sender.protocol.value
        header: InstanceHeader | None = None
        try:
            inspected = await asyncio.to_thread(
                inspect, file, self._max_instance_bytes, self._max_sequence_depth
            )
            hashed, parsed = inspected.hashed, inspected.header
            header = parsed
            check_expected(parsed, origin.expected)
            stored = await self._store_checked(hashed, parsed, origin, inspected.accession)
        except InvalidInstance as exc:
            raise self._not_stored(origin, exc.status, exc.detail, exc.reason, header) from exc
        except PipelineError as exc:
            raise self._not_stored(
                origin,
                StoreStatus.OUT_OF_RESOURCES,
                f"{exc.reason}; retry later",
                exc.reason,
                header,
            ) from exc
        elapsed = time.perf_counter() - started
        if self._audit is not None:
            self._audit.instance_received(
                origin.sender,
                study=header.study_instance_uid,
                sop_class=header.sop_class_uid,
                sop_instance=header.sop_instance_uid,
                receiver_ae=origin.sender.called_ae,
                patient_id=inspected.patient_id,
            )
        metrics.INSTANCES.labels(protocol, "duplicate" if stored.duplicate else "stored").inc()
        metrics.BYTES.labels(protocol).inc(hashed.size)
        metrics.STORE_SECONDS.labels(protocol).observe(elapsed)
        log.info(
            "instance stored",
            extra={
                "sop_instance_uid": header.sop_instance_uid,
                "study_instance_uid": header.study_instance_uid,
                "sha256": hashed.sha256,
                "size": hashed.size,
                "duplicate": stored.duplicate,
                "lane": stored.lane.value,
                "protocol": protocol,
                "calling_ae": origin.sender.calling_ae,
                "peer_address": origin.sender.peer_address,
                "duration_ms": round(elapsed * 1000, 2),
            },
        )
        return stored

    @staticmethod
    def _not_stored(
        origin: Origin,
        status: StoreStatus,
        detail: str,
        cause: str,
        header: InstanceHeader | None,
    ) -> NotStored:
        metrics.INSTANCES.labels(origin.sender.protocol.value, status.label).inc()
        log.log(
            logging.ERROR if status.retriable else logging.WARNING,
            "instance not stored",
            extra={
                "status": f"0x{status:04X}",
                "reason": detail,
                "protocol": origin.sender.protocol.value,
                "calling_ae": origin.sender.calling_ae,
                "peer_address": origin.sender.peer_address,
            },
        )
        return NotStored(status, detail, cause, header)

    def _order(self, accession: Accession | None) -> tuple[str | None, WorklistItem | None]:
        """The instance's order reference, and its open order if one is known."""
        if self._orders is None or accession is None:
            return None, None
        ref = self._orders.ref(accession.number, accession.issuer)
        return ref, self._orders.find(ref)

    async def _store_checked(
        self,
        hashed: HashedFile,
        header: InstanceHeader,
        origin: Origin,
        accession: Accession | None = None,
    ) -> Stored:
        ref, order = self._order(accession)
        key = content_key(ORIGINAL, header.study_instance_uid, hashed.sha256)
        blob = BlobRef(bucket=self._blobs.bucket, key=key, size=hashed.size, sha256=hashed.sha256)
        event = InstanceReceived(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            modality=header.modality,
            body_part_examined=header.body_part_examined,
            transfer_syntax_uid=header.transfer_syntax_uid,
            priority=origin.priority,
            sender=origin.sender,
            received_at=datetime.now(UTC),
            blob=blob,
            order_ref=ref,
        )
        while (earlier := self._announcing.get(key)) is not None:
            if await asyncio.shield(earlier):
                return Stored(header, event, duplicate=True)
        announced = asyncio.get_running_loop().create_future()
        self._announcing[key] = announced
        try:
            if order is not None and order.priority is OrderPriority.STAT:
                lane = Lane.STAT
            else:
                lane = self._lanes.lane(header, origin.sender, origin.priority.value)
            duplicate = await self._store_and_announce(hashed, key, event, lane)
        except BaseException:
            announced.set_result(False)
            raise
        else:
            announced.set_result(True)
        finally:
            del self._announcing[key]
        if duplicate:
            return Stored(header, event, duplicate=True)
        if order is not None:
            metrics.ORDER_MATCHES.labels(lane.value).inc()
        self._announced[key] = None
        if len(self._announced) > RECENT_ANNOUNCED:
            self._announced.popitem(last=False)
        return Stored(header, event, duplicate=False, lane=lane)

    async def _store_and_announce(
        self, hashed: HashedFile, key: str, event: InstanceReceived, lane: Lane
    ) -> bool:
        """Store the original and, unless this process announced it recently, publish
        ``event`` in ``lane``. Returns True for a duplicate (nothing published).

        The original is stored even then: the key is remembered, not its object, and
        a PUT of bytes already there costs what a HEAD would.
        """
        await self._blobs.put_file(
            key, hashed, ORIGINAL, check_existing=hashed.size > self._lookup_above_bytes
        )
        if key in self._announced:
            self._announced.move_to_end(key)
            return True
        await self._producer.publish(event, key=event.key, lane=lane)
        metrics.LANES.labels(lane.value).inc()
        return False
