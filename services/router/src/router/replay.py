"""``python -m router replay``: the what-if of a new rule file over what the topics
retain.

It reads, with no consumer group (:func:`radflow_core.history.read_history`), the
normalized events of a time window (both lanes; v1 and v2) and what the router did
with each: its forward requests (both lanes), its holds, and the requests still
waiting for their study in the pending changelogs. It builds each instance's rule view
as the router does (the header from the blob store when a rule reads an attribute the
event does not carry) and hands everything to :func:`router.whatif.compare`. It sends
nothing and commits nothing.

An instance is the pair (SOP Instance UID, sha256 of the original): the same UID sent
again with other bytes is another instance, as the idempotency keys have it. The new
rules are evaluated at the moment the router decided (a request's ``routed_at``, a
hold's ``held_at``, a waiting request's arrival in the changelog), so time-of-day
windows see the hour the router saw; without a decision, at the normalized event's
append time.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from datetime import datetime

from radflow_core.blobstore import BlobStore, ReadLimitExceeded
from radflow_core.errors import BlobIntegrityError, BlobNotFound, EventDecodeError
from radflow_core.events import (
    ForwardRequested,
    InstanceHeld,
    InstanceNormalized,
    Lane,
    decode,
)
from radflow_core.history import HistoryRecord, read_history
from radflow_core.settings import KafkaSettings
from radflow_core.topics import Topic
from radflow_rules.rules import RuleSet
from router.attributes import UnreadableHeader, event_view, needs_header, parse_header
from router.pending import PendingEntry
from router.whatif import Case, Outcome, RouteTaken, WhatIf, compare

UNKNOWN_DESTINATION = "unknown_destination:"
"""How the forwarder's holds begin (a request for a destination the rule file lacks):
the router had decided, so these are not its holds."""
HEADER_READS = 8
"""Header reads from the blob store in flight at once."""
HEADER_PROBLEMS = (BlobNotFound, BlobIntegrityError, UnreadableHeader, ReadLimitExceeded)
"""What leaves one instance unevaluated; an unreachable or misconfigured blob store
stops the replay instead."""

InstanceKey = tuple[str, str]
"""(SOP Instance UID, sha256 of the original)."""


@dataclass
class Seen:
    """What the topics say the router did with one instance."""

    routes: dict[str, RouteTaken] = field(default_factory=dict)
    hold: str | None = None
    decided_at: list[datetime] = field(default_factory=list)

    def outcome(self) -> Outcome | None:
        """Requests win over a hold: an instance held, then routed after a rules fix
        (its normalized event replayed), went where its requests sent it."""
        if self.routes:
            return Outcome(dict(self.routes))
        if self.hold is not None:
            return Outcome({}, self.hold)
        return None

    def request(self, request: ForwardRequested, waits: bool) -> None:
        known = self.routes.get(request.destination)
        rules = request.rules if known is None else known.rules
        self.routes[request.destination] = RouteTaken(
            request.lane,
            rules,
            waits or request.waited_for is not None,
            request.deidentify.profile if request.deidentify is not None else None,
        )


@dataclass
class History:
    """The window's normalized events and every decision the router made since its start."""

    normalized: dict[InstanceKey, tuple[InstanceNormalized, datetime]] = field(default_factory=dict)
    seen: dict[InstanceKey, Seen] = field(default_factory=dict)
    held: dict[InstanceKey, tuple[str, datetime]] = field(default_factory=dict)
    """(SOP Instance UID, sha256 of the canonical variant) → the router's hold."""
    unreadable: int = 0
    """Records that are not events of the expected type and version."""

    def add(self, kafka: KafkaSettings, record: HistoryRecord, until: datetime) -> None:
        if not record.value:
            return  # a changelog tombstone
        try:
            self._add(kafka, record, until)
        except (EventDecodeError, ValueError):
            self.unreadable += 1

    def _add(self, kafka: KafkaSettings, record: HistoryRecord, until: datetime) -> None:
        topic = record.topic
        if topic in _names(kafka, Topic.INSTANCE_NORMALIZED):
            if record.appended_at > until:
                return
            event = decode(record.value, InstanceNormalized).data
            key = (event.sop_instance_uid, event.original.sha256)
            self.normalized.setdefault(key, (event, record.appended_at))
        elif topic in _names(kafka, Topic.FORWARD_REQUESTED):
            request = decode(record.value, ForwardRequested).data
            seen = self._seen(request)
            seen.request(request, waits=False)
            if request.waited_for is None:  # a released request's routed_at is its release
                seen.decided_at.append(request.routed_at)
        elif topic in _names(kafka, Topic.ROUTER_PENDING):
            entry = PendingEntry.model_validate_json(record.value)
            seen = self._seen(entry.request)
            seen.request(entry.request, waits=True)
            seen.decided_at.append(entry.arrived_at)
        elif topic == kafka.topic(Topic.INSTANCE_HELD):
            held = decode(record.value, InstanceHeld).data
            if not held.reason.startswith(UNKNOWN_DESTINATION):
                key = (held.sop_instance_uid, held.canonical.sha256)
                self.held.setdefault(key, (held.reason, held.held_at))

    def _seen(self, request: ForwardRequested) -> Seen:
        return self.seen.setdefault((request.sop_instance_uid, request.original_sha256), Seen())

    def decisions(self) -> dict[InstanceKey, Seen]:
        """Each normalized instance's decisions, holds matched by the canonical variant."""
        found: dict[InstanceKey, Seen] = {}
        for key, (event, _) in self.normalized.items():
            requested = self.seen.get(key, Seen())
            seen = Seen(dict(requested.routes), None, list(requested.decided_at))
            hold = self.held.get((event.sop_instance_uid, event.canonical.sha256))
            if hold is not None:
                seen.hold = hold[0]
                seen.decided_at.append(hold[1])
            found[key] = seen
        return found


def _names(kafka: KafkaSettings, routine: Topic) -> tuple[str, str]:
    return (kafka.topic(routine), kafka.topic(Lane.STAT.topic(routine)))


TOPICS = (
    Topic.INSTANCE_NORMALIZED,
    Topic.INSTANCE_NORMALIZED_STAT,
    Topic.FORWARD_REQUESTED,
    Topic.FORWARD_REQUESTED_STAT,
    Topic.ROUTER_PENDING,
    Topic.ROUTER_PENDING_STAT,
    Topic.INSTANCE_HELD,
)


async def read(kafka: KafkaSettings, since: datetime, until: datetime, idle_s: float) -> History:
    """The window's normalized events, and the router's decisions from ``since`` to
    now (a decision can come after the window: a backlog, a study that waited)."""
    history = History()
    async for record in read_history(kafka, TOPICS, since=since, idle_s=idle_s):
        history.add(kafka, record, until)
    return history


async def cases(
    history: History, rules: RuleSet, blobs: BlobStore, header_limit: int
) -> list[Case]:
    """One case per normalized instance, with the header read where the new rules
    need it."""
    decisions = history.decisions()
    limit = asyncio.Semaphore(HEADER_READS)

    async def one(key: InstanceKey) -> Case:
        event, appended_at = history.normalized[key]
        seen = decisions[key]
        case = Case(
            sop_instance_uid=event.sop_instance_uid,
            study_instance_uid=event.study_instance_uid,
            modality=event.modality,
            at=min(seen.decided_at, default=appended_at),
            actual=seen.outcome(),
            instance=None,
        )
        header = None
        if needs_header(rules, event):
            try:
                async with limit:
                    header = await blobs.read_partially(event.canonical, parse_header, header_limit)
            except HEADER_PROBLEMS as exc:
                return replace(case, problem=f"header not read ({exc.reason})")
        return replace(case, instance=event_view(rules, event, header))

    return list(await asyncio.gather(*(one(key) for key in history.normalized)))


async def what_if(
    rules: RuleSet,
    kafka: KafkaSettings,
    blobs: BlobStore,
    *,
    since: datetime,
    until: datetime,
    header_limit: int,
    idle_s: float,
) -> tuple[WhatIf, History]:
    history = await read(kafka, since, until, idle_s)
    found = await cases(history, rules, blobs, header_limit)
    return compare(rules, found), history


def as_json(report: WhatIf, rules: RuleSet, since: datetime, until: datetime) -> str:
    body = {
        "rules_digest": rules.digest,
        "from": since.isoformat(),
        "to": until.isoformat(),
        **report.to_json(),
    }
    return json.dumps(body, indent=2)
