"""Reporting forward requests for destinations the rule file does not define (the
handler alone: rules and producer stand-ins, no broker)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from pydicom.uid import generate_uid

from radflow_core.events import (
    BlobRef,
    EventModel,
    ForwardRequested,
    InstanceHeld,
    Lane,
    Protocol,
    Sender,
    wrap,
)
from radflow_rules.loader import load_text
from radflow_rules.rules import RuleSet
from stow_forwarder.unknown import UnknownDestinations


def _rules(*destinations: str) -> RuleSet:
    lines = ["version: 1", "destinations:"]
    lines += [f"  {name}: {{url: 'http://127.0.0.1:9/{name}'}}" for name in destinations]
    lines += ["rules:", f"  - {{name: all, route: [{destinations[0]}]}}", "default: {hold: x}"]
    return load_text("\n".join(lines) + "\n")


def _request(destination: str, age_s: float) -> ForwardRequested:
    now = datetime.now(UTC)
    return ForwardRequested(
        sop_instance_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        sender=Sender(protocol=Protocol.DIMSE),
        received_at=now,
        destination=destination,
        lane=Lane.ROUTINE,
        blob=BlobRef(bucket="b", key="k", size=1, sha256="a" * 64),
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        requested_transfer_syntax_uid="1.2.840.10008.1.2.1",
        original_sha256="a" * 64,
        rules=("all",),
        rules_digest="x",
        idempotency_key="b" * 64,
        routed_at=now - timedelta(seconds=age_s),
    )


class Producer:
    def __init__(self) -> None:
        self.published: list[EventModel] = []

    async def publish(self, event: EventModel, key: bytes | None) -> None:
        self.published.append(event)


def _handler(rules: list[RuleSet], grace_s: float) -> tuple[UnknownDestinations, Producer]:
    producer = Producer()
    counter = Counter("unknown", "test", ["destination"], registry=CollectorRegistry())
    handler = UnknownDestinations(
        lambda: rules[-1],
        producer,  # type: ignore[arg-type]
        counter,
        grace_s,
    )
    return handler, producer


def _items(requests: list[ForwardRequested]) -> list[tuple[Any, Any]]:
    return [(wrap(r, "router"), None) for r in requests]


def test_only_requests_for_undefined_destinations_are_held_with_the_name() -> None:
    handler, producer = _handler([_rules("pacs", "archive")], grace_s=60)
    requests = [_request("pacs", 300), _request("gone", 300), _request("archive", 300)]
    asyncio.run(handler.handle_batch(_items(requests)))
    (held,) = producer.published
    assert isinstance(held, InstanceHeld)
    assert held.reason == "unknown_destination: gone"
    assert held.sop_instance_uid == requests[1].sop_instance_uid
    assert held.canonical == requests[1].blob


def test_a_destination_defined_during_the_grace_period_is_not_reported() -> None:
    """The router may route to a destination added to the rule file before the
    forwarder has read the change: a young request is checked once it is old enough."""
    rules = [_rules("pacs")]
    handler, producer = _handler(rules, grace_s=0.5)

    async def run() -> None:
        handling = asyncio.create_task(handler.handle_batch(_items([_request("new", 0)])))
        await asyncio.sleep(0.1)
        assert not handling.done(), "a young request was decided at once"
        rules.append(_rules("pacs", "new"))
        await handling

    asyncio.run(run())
    assert producer.published == []
