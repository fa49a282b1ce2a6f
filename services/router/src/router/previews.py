"""Lossy previews to the destinations that asked for them, ahead of the full series.

A preview (``dicom.instance.preview``) is routed as its original would be: the rules
see the original's identity, sender and routing attributes (and the original's header
when a rule needs more), so the same rules match. Each destination of a matching rule
with ``preview:`` whose selection picks the preview's frame gets one request, always in
the STAT lane and never held for study completion: previews travel ahead of the full
series, which follows its own rule (held or not) and arrives unchanged.

The request carries ``preview_of``: it is not a diagnostic instance, and the ledger
leaves it out of the study's delivery. Its idempotency key is derived from the preview's
own SOP Instance UID and bytes, which transcode derives deterministically, so a
preview made and routed again is recognised by the forwarder.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiokafka import ConsumerRecord
from pydicom.dataset import Dataset

from radflow_core.blobstore import BlobStore
from radflow_core.events import (
    Envelope,
    ForwardRequested,
    InstanceIdentity,
    InstancePreview,
    Lane,
)
from radflow_rules.live import LiveRules
from radflow_rules.rules import Route, RuleSet, evaluate
from router.attributes import event_view, needs_header, parse_header
from router.metrics import PREVIEWS
from router.routing import idempotency_key

log = logging.getLogger(__name__)

GROUP_SUFFIX = ".preview"
"""The previews' consumer group is ``<RADFLOW_ROUTER_GROUP_ID>.preview``."""


def preview_request(
    preview: InstancePreview, rules: RuleSet, route: Route, now: datetime
) -> ForwardRequested:
    """The STAT request of one preview to one destination; the preview's syntax unless
    the destination lists others (then its first, which the forwarder converts to)."""
    accepted = rules.destinations[route.destination].transfer_syntaxes
    syntax = preview.transfer_syntax_uid
    # A preview shows the patient as much as its original does: a de-identified route
    # de-identifies its previews too.
    deidentify = route.deidentify.event() if route.deidentify is not None else None
    return ForwardRequested(
        **preview.identity(),
        destination=route.destination,
        lane=Lane.STAT,
        blob=preview.blob,
        transfer_syntax_uid=syntax,
        requested_transfer_syntax_uid=syntax if not accepted or syntax in accepted else accepted[0],
        original_sha256=preview.blob.sha256,
        rules=route.rules,
        rules_digest=rules.digest,
        idempotency_key=idempotency_key(
            preview.sop_instance_uid, preview.blob.sha256, route.destination, deidentify
        ),
        routed_at=now,
        preview_of=preview.preview_of,
        deidentify=deidentify,
    )


class PreviewRouter:
    def __init__(
        self,
        rules: LiveRules,
        blobs: BlobStore,
        emit: Callable[[ForwardRequested], Awaitable[None]],
        header_limit_bytes: int,
    ) -> None:
        self._rules = rules
        self._blobs = blobs
        self._emit = emit
        self._header_limit = header_limit_bytes

    def routes(
        self, preview: InstancePreview, rules: RuleSet, header: Dataset | None = None
    ) -> list[Route]:
        """The routes of the preview's original that want this preview."""
        original = InstanceIdentity(**{**preview.identity(), **preview.preview_of.model_dump()})
        view = event_view(rules, original, header, routing=preview.routing)
        frames = set(preview.frames)
        return [
            route
            for route in evaluate(rules, view, datetime.now(UTC)).routes
            if frames & set(route.preview_frames(preview.instance_number, preview.original_frames))
        ]

    async def handle(
        self, envelope: Envelope[InstancePreview], record: ConsumerRecord[bytes, bytes]
    ) -> None:
        preview = envelope.data
        rules = self._rules.current
        header = None
        if needs_header(rules, preview):
            header = await self._blobs.read_partially(
                preview.original, parse_header, self._header_limit
            )
        now = datetime.now(UTC)
        routes = self.routes(preview, rules, header)
        requests = [preview_request(preview, rules, route, now) for route in routes]
        await asyncio.gather(*(self._emit(r) for r in requests))
        PREVIEWS.labels("routed" if requests else "unwanted").inc()
        log.info(
            "preview routed",
            extra={
                "sop_instance_uid": preview.sop_instance_uid,
                "study_instance_uid": preview.study_instance_uid,
                "destinations": [r.destination for r in requests],
                "lane": Lane.STAT.value,
                "rules_digest": rules.digest,
            },
        )
