"""One normalized instance in, its forward requests (or a hold) out.

Each (instance, destination) gets one request whose idempotency key is derived from
the SOP Instance UID, the original's sha256 and the destination name, so the same
instance reaching the router twice asks for the same delivery, which the forwarder
recognises. Requests wait in :mod:`router.pending` when a rule waits for the study to
be complete, and are published at once otherwise.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from datetime import UTC, datetime

from aiokafka import ConsumerRecord

from radflow_core.blobstore import BlobStore
from radflow_core.events import (
    BlobRef,
    Deidentification,
    Envelope,
    ForwardRequested,
    InstanceHeld,
    InstanceNormalized,
    Lane,
)
from radflow_core.kafka import EventProducer
from radflow_core.order_table import OrderTable
from radflow_core.settings import KafkaSettings
from radflow_core.topics import Topic
from radflow_rules.live import LiveRules
from radflow_rules.rules import Destination, Route, RuleSet, evaluate
from router.attributes import event_view, needs_header, parse_header
from router.metrics import HELD, ORDER_MATCHES, REQUESTS, RULE_MATCHES
from router.pending import PendingStudies

log = logging.getLogger(__name__)


def idempotency_key(
    sop_instance_uid: str,
    original_sha256: str,
    destination: str,
    deidentify: Deidentification | None = None,
) -> str:
    """The key of one delivery. A de-identified delivery's key also holds the profile
    and its options: the destination then receives other bytes under other UIDs, so a
    route that starts (or stops, or changes how it starts) de-identifying delivers
    again instead of skipping what was delivered otherwise."""
    text = f"{sop_instance_uid}\n{original_sha256}\n{destination}"
    if deidentify is not None:
        options = ",".join(o.value for o in deidentify.options)
        text += f"\ndeidentify:{deidentify.profile}:{options}"
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def variant_for(event: InstanceNormalized, destination: Destination) -> tuple[BlobRef, str, str]:
    """(blob, its syntax, syntax to deliver) for one destination.

    The canonical variant when the destination takes it (or takes anything); else the
    original when the destination takes the original's syntax (never converting what
    needs no conversion); else the canonical variant, to be converted by the
    forwarder to the destination's first choice.
    """
    accepted = destination.transfer_syntaxes
    canonical = event.canonical_transfer_syntax_uid
    if not accepted or canonical in accepted:
        return event.canonical, canonical, canonical
    if event.original_transfer_syntax_uid in accepted:
        original = event.original_transfer_syntax_uid
        return event.original, original, original
    return event.canonical, canonical, accepted[0]


def forward_request(
    event: InstanceNormalized, rules: RuleSet, route: Route, now: datetime
) -> ForwardRequested:
    blob, syntax, requested = variant_for(event, rules.destinations[route.destination])
    deidentify = route.deidentify.event() if route.deidentify is not None else None
    return ForwardRequested(
        **event.identity(),
        destination=route.destination,
        lane=route.lane,
        blob=blob,
        transfer_syntax_uid=syntax,
        requested_transfer_syntax_uid=requested,
        original_sha256=event.original.sha256,
        rules=route.rules,
        rules_digest=rules.digest,
        idempotency_key=idempotency_key(
            event.sop_instance_uid, event.original.sha256, route.destination, deidentify
        ),
        routed_at=now,
        deidentify=deidentify,
    )


class Router:
    def __init__(
        self,
        rules: LiveRules,
        blobs: BlobStore,
        producer: EventProducer,
        kafka: KafkaSettings,
        pending: PendingStudies,
        header_limit_bytes: int,
        orders: OrderTable | None = None,
        lane: Lane = Lane.ROUTINE,
    ) -> None:
        """``orders``: the open orders an event's ``order_ref`` is matched with (none:
        rules see no order). ``lane``: the lane this router's input is."""
        self._orders = orders
        self._lane = lane
        self._rules = rules
        self._blobs = blobs
        self._producer = producer
        self._kafka = kafka
        self._pending = pending
        self._header_limit = header_limit_bytes

    async def emit(self, request: ForwardRequested) -> None:
        """Publish one request on its lane's topic (acks=all)."""
        topic = self._kafka.topic(request.lane.topic(Topic.FORWARD_REQUESTED))
        await self._producer.publish(request, request.key, topic=topic)
        REQUESTS.labels(
            request.destination, request.lane.value, "yes" if request.waited_for else "no"
        ).inc()

    async def handle(
        self, envelope: Envelope[InstanceNormalized], record: ConsumerRecord[bytes, bytes]
    ) -> None:
        event = envelope.data
        rules = self._rules.current  # one snapshot for the whole decision
        header = None
        if needs_header(rules, event):
            header = await self._blobs.read_partially(
                event.canonical, parse_header, self._header_limit
            )
        order = None
        if self._orders is not None and event.order_ref is not None:
            order = self._orders.find(event.order_ref)
            if order is not None:
                ORDER_MATCHES.labels(self._lane.value).inc()
        now = datetime.now(UTC)
        decision = evaluate(rules, event_view(rules, event, header, order), now)
        if decision.hold is not None:
            await self._hold(event, rules, decision.hold, now)
        else:
            waiting: list[tuple[ForwardRequested, Route]] = []
            immediate: list[ForwardRequested] = []
            for route in decision.routes:
                request = forward_request(event, rules, route, now)
                if route.wait is not None:
                    waiting.append((request, route))
                else:
                    immediate.append(request)
            for request, route in waiting:
                assert route.wait is not None
                await self._pending.add(record.partition, request, route.wait, now, record.offset)
            await asyncio.gather(*(self.emit(r) for r in immediate))
        for name, result in decision.trace:
            if result.matched:
                RULE_MATCHES.labels(name).inc()
        log.info(
            "routed",
            extra={
                "sop_instance_uid": event.sop_instance_uid,
                "study_instance_uid": event.study_instance_uid,
                "destinations": [r.destination for r in decision.routes],
                "rules": sorted({n for r in decision.routes for n in r.rules}),
                "lane": ",".join(sorted({r.lane.value for r in decision.routes})),
                "pending": sum(1 for r in decision.routes if r.wait is not None),
                "reason": decision.hold,
                "rules_digest": rules.digest,
                "order_site": order.site if order is not None else None,
            },
        )

    async def _hold(
        self, event: InstanceNormalized, rules: RuleSet, reason: str, now: datetime
    ) -> None:
        held = InstanceHeld(
            **event.identity(),
            reason=reason,
            canonical=event.canonical,
            canonical_transfer_syntax_uid=event.canonical_transfer_syntax_uid,
            rules_digest=rules.digest,
            held_at=now,
        )
        await self._producer.publish(held, event.key)
        HELD.inc()
