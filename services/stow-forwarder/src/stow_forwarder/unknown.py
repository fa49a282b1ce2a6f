"""Forward requests for a destination the rule file does not define, made visible.

Each destination reads the forward-request topics in its own consumer group and keeps
only its own requests, so a request for a destination that is not (or no longer) in
the rule file would be read by nobody. One more consumer group per lane,
``<group_prefix>.unknown-destinations.<lane>``, reads every request and, for each whose
destination the rules in force do not define (of any kind: report-return's count as
defined), publishes ``dicom.instance.held`` with the reason
``unknown_destination: <name>`` and counts it in
``radflow_forwarder_unknown_destination_total{destination}``.

Nothing is dropped: the request stays in its topic, and a destination added later
under that name starts its consumer groups at the earliest offset, so it still receives
every request the topic retains. A request younger than ``grace_s`` is checked only once
it is that old, so a destination the router already routes to but whose rule-file change
the forwarder has not read yet is not reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime

from aiokafka import ConsumerRecord
from prometheus_client import Counter

from radflow_core.consumer import EventConsumer
from radflow_core.events import LANES, Envelope, ForwardRequested, InstanceHeld
from radflow_core.kafka import EventProducer
from radflow_core.retry import HandedBack, current_turn
from radflow_core.settings import KafkaSettings
from radflow_core.topics import Topic
from radflow_rules.rules import RuleSet
from stow_forwarder.metrics import UNKNOWN_DESTINATION
from stow_forwarder.settings import ForwarderSettings

log = logging.getLogger(__name__)

GROUP = "unknown-destinations"
REASON = "unknown_destination"


class UnknownDestinations:
    """The batch handler of the unknown-destination consumers (one per lane)."""

    def __init__(
        self,
        rules: Callable[[], RuleSet],
        producer: EventProducer,
        counter: Counter,
        grace_s: float,
    ) -> None:
        """``rules`` returns the rules in force when called; ``counter`` is labelled by
        destination."""
        self._rules = rules
        self._producer = producer
        self._counter = counter
        self._grace_s = grace_s

    def _unknown(self, requests: list[ForwardRequested]) -> list[ForwardRequested]:
        defined = self._rules().destinations
        return [r for r in requests if r.destination not in defined]

    async def handle_batch(
        self, items: list[tuple[Envelope[ForwardRequested], ConsumerRecord[bytes, bytes]]]
    ) -> None:
        unknown = self._unknown([envelope.data for envelope, _ in items])
        if not unknown:
            return
        youngest = max(r.routed_at for r in unknown)
        wait = self._grace_s - (datetime.now(UTC) - youngest).total_seconds()
        if wait > 0:
            if await current_turn().wait_for_hand_back(wait):
                raise HandedBack("handed back during the grace period")
            unknown = self._unknown(unknown)
        digest = self._rules().digest
        for request in unknown:
            await self._hold(request, digest)

    async def _hold(self, request: ForwardRequested, rules_digest: str) -> None:
        held = InstanceHeld(
            **request.identity(),
            reason=f"{REASON}: {request.destination}",
            canonical=request.blob,
            canonical_transfer_syntax_uid=request.transfer_syntax_uid,
            rules_digest=rules_digest,
            held_at=datetime.now(UTC),
        )
        await self._producer.publish(held, request.key)
        self._counter.labels(request.destination).inc()
        log.warning(
            "forward request for a destination the rule file does not define; held",
            extra={
                "destination": request.destination,
                "sop_instance_uid": request.sop_instance_uid,
                "lane": request.lane.value,
                "rules_digest": rules_digest,
                "reason": REASON,
            },
        )


def unknown_destination_consumers(
    rules: Callable[[], RuleSet],
    producer: EventProducer,
    kafka: KafkaSettings,
    settings: ForwarderSettings,
    service: str,
) -> list[EventConsumer[ForwardRequested]]:
    """One consumer per lane, in the group ``<group_prefix>.unknown-destinations.<lane>``,
    reporting what ``rules`` (called for the rules in force) does not define."""
    handler = UnknownDestinations(
        rules, producer, UNKNOWN_DESTINATION, settings.unknown_destination_grace_s
    )
    return [
        EventConsumer(
            kafka,
            service=service,
            group_id=f"{settings.group_prefix}.{GROUP}.{lane.value}",
            topics=[kafka.topic(lane.topic(Topic.FORWARD_REQUESTED))],
            model=ForwardRequested,
            batch_handler=handler.handle_batch,
            producer=producer,
            dead_letter_topic=kafka.topic(Topic.INSTANCE_FAILED),
        )
        for lane in LANES
    ]
