"""``radflow trace UID``: every event of one instance or one study across the topics, in
time order, with the time each hop took: the answer to "where is my study?".

It reads every topic of the pipeline from its earliest retained record, with no
consumer group (:mod:`radflow_core.history`), and keeps each record that names the
UID anywhere: an instance's events by their fields, a dead letter by the record it
carries, an audit message by the instances it lists, the router's pending changelog
by the request waiting there for its study. Topics added later (delivery verification,
study completion) are read too: they are members of :class:`~radflow_core.topics.Topic`.

Only routing metadata is printed: never a dead letter's record, nor an audit
message's XML (it carries the Patient ID).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka.errors import KafkaError

from radflow_core.audit_message import Code, Codes
from radflow_core.cli.common import output_arguments, when
from radflow_core.errors import PipelineError
from radflow_core.history import HistoryRecord, read_history
from radflow_core.settings import KafkaSettings
from radflow_core.topics import Topic

PENDING = "radflow.router.pending"
"""The type shown for a request waiting in the router's changelog for its study."""
AUDIT_EVENTS = {c.code: c.meaning for c in vars(Codes).values() if isinstance(c, Code)}
SAFE_FIELDS = (
    "rules",
    "waited_for",
    "reason",
    "http_status",
    "dicom_status",
    "attempts",
    "latency_s",
    "already_delivered",
    "decode_status",
    "status",
    "method",
    "site",
    "report_id",
    "report_version",
    "ack_code",
    "already_returned",
)
"""Payload fields shown in a row's detail, by name, whatever the event's type: coded
and pipeline-written values only (a type added later shows what it has of these)."""


@dataclass(frozen=True)
class TraceEvent:
    """One record that names the UID."""

    at: datetime
    """When the event was emitted (its envelope's time; the append time when the
    record has no envelope)."""
    topic: str
    """The topic without the deployment's prefix."""
    type: str
    service: str | None
    """Who emitted it (from the envelope's source)."""
    sop_instance_uid: str | None
    study_instance_uid: str | None
    destination: str | None
    lane: str | None
    detail: str
    partition: int
    offset: int
    appended_at: datetime
    flow: int
    """The topic's place in the pipeline's flow: orders events of the same instant."""

    def to_json(self) -> dict[str, Any]:
        return {
            "at": self.at.isoformat(),
            "topic": self.topic,
            "type": self.type,
            "service": self.service,
            "sop_instance_uid": self.sop_instance_uid,
            "study_instance_uid": self.study_instance_uid,
            "destination": self.destination,
            "lane": self.lane,
            "detail": self.detail,
            "partition": self.partition,
            "offset": self.offset,
            "appended_at": self.appended_at.isoformat(),
        }


def names(text: str, uid: str) -> bool:
    """True when ``text`` contains ``uid`` as a whole UID (not a prefix of a longer one)."""
    return re.search(rf"(?<![0-9.]){re.escape(uid)}(?![0-9.])", text) is not None


def event_of(record: HistoryRecord, uid: str, kafka: KafkaSettings) -> TraceEvent | None:
    """The trace row of ``record`` if it names ``uid``, else None."""
    if not record.value:
        return None
    text = record.value.decode("utf-8", "replace")
    if not names(text, uid):
        return None
    try:
        parsed = json.loads(text)
    except ValueError:
        return None
    if not isinstance(parsed, dict):
        return None
    topic = _unprefixed(record.topic, kafka.topic_prefix)
    if isinstance(parsed.get("data"), dict) and "type" in parsed:
        data: dict[str, Any] = parsed["data"]
        kind = str(parsed["type"])
        at = _time(parsed.get("time"), record.appended_at)
        source = str(parsed.get("source", "")).split("/")
        service = source[2] if len(source) > 2 and source[1] == "radflow" else None
    elif isinstance(parsed.get("request"), dict):  # the router's pending changelog
        data = {
            **parsed["request"],
            "waiting": f"{parsed.get('level', 'study')} complete, "
            f"{parsed.get('quiet_seconds', '?')}s quiet",
        }
        kind = PENDING
        at = _time(parsed.get("arrived_at"), record.appended_at)
        service = "router"
    else:
        return None
    about = _carried(data) if kind == "radflow.dead_letter" else data
    return TraceEvent(
        at=at,
        topic=topic,
        type=kind,
        service=service,
        sop_instance_uid=_text(about.get("sop_instance_uid")),
        study_instance_uid=_text(about.get("study_instance_uid")),
        destination=_text(about.get("destination")),
        lane=_text(about.get("lane")),
        detail=detail(kind, data),
        partition=record.partition,
        offset=record.offset,
        appended_at=record.appended_at,
        flow=_flow(topic),
    )


def _carried(dead_letter: Mapping[str, Any]) -> Mapping[str, Any]:
    """The payload of the record a dead letter carries (whose UIDs it is about)."""
    try:
        inner = json.loads(str(dead_letter.get("original_value", "")))
    except ValueError:
        return {}
    data = inner.get("data") if isinstance(inner, dict) else None
    return data if isinstance(data, dict) else {}


def detail(kind: str, data: Mapping[str, Any]) -> str:
    """What a row says beyond its destination and lane: coded fields only."""
    parts: list[str] = []
    if kind == "dicom.instance.received":
        sender = data.get("sender") or {}
        who = sender.get("identity") or sender.get("calling_ae") or sender.get("peer_address")
        parts.append(f"via {sender.get('protocol', '?')} from {who or '?'}")
        parts.append(f"priority {data.get('priority', '?')}")
    elif kind == "radflow.dead_letter":
        parts.append(
            f"{data.get('service', '?')} gave up on {data.get('source_topic', '?')}"
            f"@{data.get('source_partition', '?')}:{data.get('source_offset', '?')}"
        )
    elif kind == "radflow.audit":
        event_id = str(data.get("event_id", ""))
        parts.append(f"{AUDIT_EVENTS.get(event_id, event_id)} (outcome {data.get('outcome')})")
    elif kind == PENDING:
        parts.append(f"waiting for {data.get('waiting')}")
    for name in SAFE_FIELDS:
        value = data.get(name)
        if value is None or value is False or value == [] or (name == "attempts" and value == 1):
            continue
        if isinstance(value, list):
            value = "+".join(str(v) for v in value)
        elif isinstance(value, float):
            value = f"{value:.3f}s" if name.endswith("_s") else f"{value:g}"
        parts.append(f"{name} {value}" if value is not True else name.replace("_", " "))
    return "; ".join(parts)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _time(value: object, fallback: datetime) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return fallback
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return fallback


def _unprefixed(topic: str, prefix: str) -> str:
    return topic[len(prefix) :] if prefix and topic.startswith(prefix) else topic


def _flow(topic: str) -> int:
    order = [t.value for t in Topic]
    return order.index(topic) if topic in order else len(order)


def ordered(events: Iterable[TraceEvent]) -> list[TraceEvent]:
    return sorted(events, key=lambda e: (e.at, e.flow, e.partition, e.offset))


@dataclass(frozen=True)
class Timed:
    """A row with its timings."""

    event: TraceEvent
    since_first_s: float
    hop_s: float | None
    """Since the same instance's previous event (None for its first); for an event
    about the study as a whole (an audit message), since the row before."""


def timings(events: list[TraceEvent]) -> list[Timed]:
    """``events`` in order, each with the time since the first and its hop."""
    if not events:
        return []
    first = events[0].at
    last_of: dict[str, datetime] = {}
    previous: datetime | None = None
    timed = []
    for event in events:
        before = last_of.get(event.sop_instance_uid) if event.sop_instance_uid else previous
        hop = None if before is None else (event.at - before).total_seconds()
        timed.append(Timed(event, (event.at - first).total_seconds(), hop))
        previous = event.at
        if event.sop_instance_uid:
            last_of[event.sop_instance_uid] = event.at
    return timed


def kind_of(uid: str, events: list[TraceEvent]) -> str:
    if any(e.sop_instance_uid == uid for e in events):
        return "instance"
    if any(e.study_instance_uid == uid for e in events):
        return "study"
    return "other"


def summary(events: list[TraceEvent]) -> dict[str, dict[str, int]]:
    """Per destination, how many instances reached each stage (by the event type's
    last word: requested, completed, failed, verified …); the row ``*`` counts the
    instance-level stages without a destination (received, normalized, held …)."""
    seen: dict[str, dict[str, set[str]]] = {}
    for event in events:
        if event.sop_instance_uid is None or event.type in ("radflow.audit", PENDING):
            continue
        stage = event.type.rsplit(".", 1)[-1]
        if event.type == "radflow.dead_letter":
            stage = "dead-lettered"
        where = seen.setdefault(event.destination or "*", {})
        where.setdefault(stage, set()).add(event.sop_instance_uid)
    return {
        dest: {stage: len(uids) for stage, uids in sorted(stages.items())}
        for dest, stages in sorted(seen.items())
    }


def render(uid: str, timed: list[Timed], stages: Mapping[str, Mapping[str, int]]) -> str:
    events = [t.event for t in timed]
    kind = kind_of(uid, events)
    with_sop = kind != "instance"
    header = ["+s", "hop s", "time (UTC)", "topic", "by"]
    header += ["sop_instance_uid"] if with_sop else []
    header += ["destination", "lane", "detail"]
    rows = []
    for t in timed:
        e = t.event
        row = [
            f"{t.since_first_s:.3f}",
            "" if t.hop_s is None else f"{t.hop_s:.3f}",
            e.at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3],
            e.topic,
            e.service or "",
        ]
        row += [e.sop_instance_uid or "(study)"] if with_sop else []
        row += [e.destination or "", e.lane or "", e.detail]
        rows.append(row)
    instances = len({e.sop_instance_uid for e in events if e.sop_instance_uid})
    lines = [f"{kind} {uid}: {len(events)} events, {instances} instance(s)", ""]
    lines += _table(header, rows)
    lines += ["", "instances per destination and stage:"]
    for dest, counts in stages.items():
        shown = ", ".join(f"{stage} {n}" for stage, n in counts.items())
        lines.append(f"  {'(instance)' if dest == '*' else dest}: {shown}")
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    cells = [header, *rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


async def collect(
    kafka: KafkaSettings,
    uid: str,
    since: datetime | None,
    until: datetime | None,
    idle_s: float,
    audit: bool = False,
) -> list[TraceEvent]:
    topics = [t for t in Topic if audit or t is not Topic.AUDIT]
    found = []
    async for record in read_history(kafka, topics, since=since, until=until, idle_s=idle_s):
        event = event_of(record, uid, kafka)
        if event is not None:
            found.append(event)
    return ordered(found)


def register(subparsers: Any) -> None:
    command = subparsers.add_parser(
        "trace",
        help="every event of an instance or a study, in order, with timings",
        description="Reads every topic (no consumer group, nothing committed) and prints "
        "each event that names the UID, in time order, with the time since the first "
        "event and each hop's duration (since the same instance's previous event).",
    )
    command.add_argument("uid", help="a SOP Instance UID or a Study Instance UID")
    command.add_argument(
        "--since",
        type=when,
        default=None,
        help="from (ISO time, UTC without an offset; or 30m, 2h, 3d ago)",
    )
    command.add_argument("--until", type=when, default=None, help="to (same forms)")
    command.add_argument(
        "--audit",
        action="store_true",
        help="read the audit trail (radflow.audit) too; it carries Patient IDs, so the "
        "operator's Kafka user may not read it (the audit messages are shown without them)",
    )
    output_arguments(command, "one JSON document, for scripts", idle_s=2.0)
    command.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    try:
        kafka = KafkaSettings.from_env(os.environ)
    except PipelineError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        events = asyncio.run(
            collect(kafka, args.uid, args.since, args.until, args.idle_s, args.audit)
        )
    except (KafkaError, OSError) as exc:
        print(f"cannot read the topics: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    timed = timings(events)
    stages = summary(events)
    if args.json:
        body = {
            "uid": args.uid,
            "kind": kind_of(args.uid, events),
            "events": [
                {**t.event.to_json(), "since_first_s": t.since_first_s, "hop_s": t.hop_s}
                for t in timed
            ],
            "destinations": stages,
        }
        print(json.dumps(body, indent=2))
    elif events:
        print(render(args.uid, timed, stages))
    else:
        print(f"no retained event names {args.uid}", file=sys.stderr)
    return 0 if events else 1
