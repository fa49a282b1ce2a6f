"""Order intake: an HL7 message → its steps on ``worklist.items`` → the acknowledgement.

The claim check, as ingest does it for images: each step's order document is stored in
the blob store, then the step is published with acks=all (or its tombstone), and only
then is the message answered AA. If the blob store or the broker fails, the answer is
AE (error 207, "send again"): nothing half-done is acknowledged, and a resend writes the
same keys again. Messages are handled one at a time, so two messages about one order
are applied in the order they were acknowledged.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime

from pydantic import SecretStr

from radflow_core.blobstore import BlobStore
from radflow_core.errors import PipelineError
from radflow_core.events import OrderProcedure, WorklistItem
from radflow_core.kafka import EventProducer
from radflow_core.order_document import OrderDocument
from worklist import metrics
from worklist.ack import build_ack
from worklist.er7 import Delimiters
from worklist.orders import AckCode, Action, Change, Header, Refused, read_header, read_message
from worklist.sites import Sites
from worklist.view import MergedView

log = logging.getLogger(__name__)

DOCUMENT_KIND = "order"


def document_key(site: str, sha256: str) -> str:
    """Content-addressed: ``orders/<site>/<sha256>.json`` (no identifier in the key)."""
    return f"orders/{site}/{sha256}.json"


class Intake:
    def __init__(
        self,
        sites: Sites,
        reference_key: SecretStr,
        producer: EventProducer,
        blobs: BlobStore,
        view: MergedView,
        topic: str,
    ) -> None:
        self._sites = sites
        self._key = reference_key
        self._producer = producer
        self._blobs = blobs
        self._view = view
        self._topic = topic
        self._lock = asyncio.Lock()

    async def handle(self, data: bytes) -> bytes:
        """The acknowledgement of one message; never raises."""
        async with self._lock:
            return await self._handle(data)

    async def _handle(self, data: bytes) -> bytes:
        now = datetime.now(UTC)
        try:
            header = read_header(data)
        except Refused as exc:
            return self._answer(Header(Delimiters()), "other", AckCode.AR, exc)
        message_type = (
            f"{header.message_code}^{header.trigger}"
            if header.message_code in ("ORM", "OMI")
            else "other"
        )
        try:
            intake = read_message(data, self._sites, self._key, now)
        except Refused as exc:
            return self._answer(header, message_type, exc.ack, exc)
        except Exception as exc:  # a message shape nobody foresaw: refuse, do not crash
            log.exception("order message not readable")
            refused = Refused(AckCode.AR, 100, f"message not readable ({type(exc).__name__})")
            return self._answer(header, message_type, AckCode.AR, refused)
        try:
            for change in intake.changes:
                await self._apply(intake.site.name, change, now)
            await self._drop_replaced(intake.site.name, intake.changes)
        except PipelineError as exc:
            log.warning(
                "order not announced; answered AE",
                extra={"site": intake.site.name, "reason": exc.reason},
            )
            refused = Refused(
                AckCode.AE,
                207,
                "worklist temporarily unavailable (blob store or broker); send again",
            )
            return self._answer(intake.header, message_type, AckCode.AE, refused)
        log.info(
            "order accepted",
            extra={
                "site": intake.site.name,
                "message_type": message_type,
                "order_control": ",".join(sorted({c.order_control for c in intake.changes})),
                "control_id": intake.header.control_id,
                "count": len(intake.changes),
            },
        )
        return self._answer(intake.header, message_type, AckCode.AA, None)

    def _answer(
        self, header: Header, message_type: str, code: AckCode, refused: Refused | None
    ) -> bytes:
        site = self._sites.sender(header.sending_facility, header.sending_application)
        metrics.ORDERS.labels(site.name if site else "unknown", message_type, code.value).inc()
        if refused is not None:
            log.warning(
                "order refused",
                extra={
                    "ack_code": code.value,
                    "hl7_error": refused.hl7_error,
                    "hl7_location": refused.location or "",
                    "reason": refused.text,
                    "message_type": message_type,
                    "control_id": header.control_id,
                    "site": site.name if site else "unknown",
                },
            )
        return build_ack(header, code, refused)

    async def _apply(self, site: str, change: Change, now: datetime) -> None:
        """Raises BlobStoreUnavailable, BlobStoreMisconfigured, BrokerUnavailable."""
        if change.action is Action.UPSERT:
            assert change.document is not None and change.step_id is not None
            await self._upsert(site, change.order_ref, change.step_id, change.document, now)
            return
        if change.step_id is not None:
            keys = [f"{site}/{change.order_ref}/{change.step_id}".encode()]
        else:
            keys = [entry.item.key for entry in self._view.of_order(site, change.order_ref)]
        for key in keys:
            await self._producer.send(self._topic, key, None)
            self._view.remove(key)
            metrics.CHANGES.labels("remove").inc()

    async def _drop_replaced(self, site: str, changes: list[Change]) -> None:
        """An XO (change order) gives the order's steps anew: its steps that the
        message no longer names are removed (tombstones), not left on the worklist."""
        kept: dict[str, set[str]] = {}
        for change in changes:
            if change.order_control == "XO" and change.action is Action.UPSERT:
                kept.setdefault(change.order_ref, set()).add(change.step_id or "")
        for ref, steps in kept.items():
            for entry in self._view.of_order(site, ref):
                if entry.item.step_id not in steps:
                    await self._producer.send(self._topic, entry.item.key, None)
                    self._view.remove(entry.item.key)
                    metrics.CHANGES.labels("remove").inc()

    async def _upsert(
        self, site: str, ref: str, step_id: str, document: OrderDocument, now: datetime
    ) -> None:
        data = document.model_dump_json().encode()
        stored = await self._blobs.put_bytes(
            document_key(site, _sha256(data)), data, DOCUMENT_KIND, check_existing=False
        )
        step = document.step
        item = WorklistItem(
            site=site,
            order_ref=ref,
            step_id=step_id,
            priority=document.priority,
            modality=step.modality,
            scheduled_station_ae=step.station_ae,
            procedure=_procedure(document),
            document=stored.ref,
            updated_at=now,
        )
        await self._producer.publish(item, item.key, topic=self._topic)
        self._view.put(item, document)
        metrics.CHANGES.labels("upsert").inc()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _procedure(document: OrderDocument) -> OrderProcedure | None:
    concept = document.requested_procedure
    if concept is None or not concept.code:
        return None
    return OrderProcedure(
        code=concept.code[:64], scheme=concept.scheme[:64] or None, meaning=concept.meaning[:128]
    )
