"""Dead letters as an operator sees them: one shape for every dead-letter topic, with
what it takes to replay each (the original record and where it was read from).

Pure: records in, letters out, no broker. What a letter lacks (a v1
``dicom.forward.failed`` has no original, ``report.failed`` has only the source's
coordinates, a held instance names its normalized event only by UIDs) is described by
a :class:`Lookup` that :mod:`radflow_core.cli.dlq.replay` resolves against the
retained topics.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any

from radflow_core.errors import EventDecodeError
from radflow_core.events import (
    DeadLetter,
    ForwardFailed,
    InstanceHeld,
    ReportFailed,
    decode,
)
from radflow_core.history import HistoryRecord
from radflow_core.topics import STAT_LANE, Topic

LETTER_TOPICS = (
    Topic.INSTANCE_FAILED,
    Topic.FORWARD_FAILED,
    Topic.REPORT_FAILED,
    Topic.INSTANCE_HELD,
)
"""Every topic ``radflow dlq`` reads: the three dead-letter topics, and the instances
the router's default held (not failures, but what an operator releases the same way)."""

UNKNOWN_DESTINATION = "unknown_destination:"
"""Hold reason the forwarder gives a request for a destination the rule file lacks."""

SETTLING_TOPICS = (Topic.FORWARD_COMPLETED, Topic.REPORT_RETURNED)
"""Where a stage says it finally did what a letter's original asked for."""


def delivery_key(idempotency_key: str) -> str:
    """What ``dicom.forward.completed`` and a delivery's letter have in common."""
    return f"delivery:{idempotency_key}"


def report_key(site: str, report_id: str, version: int | None, channel: str = "oru") -> str:
    """What ``report.returned`` and a report's letter have in common: one report
    version (an SR's report id is its SOP Instance UID, without a version) on one
    channel (a site with output both returns each version twice: ORU and FHIR)."""
    key = f"report:{site}|{report_id}|{'' if version is None else version}"
    return key if channel == "oru" else f"{key}|{channel}"


@dataclass(frozen=True, slots=True)
class Original:
    """The record to publish again: to ``topic`` (as the broker names it), unchanged,
    with its original key."""

    topic: str
    key: str | None
    value: str


@dataclass(frozen=True, slots=True)
class Lookup:
    """How to find a letter's original on the retained topics when it does not carry
    it: the first record of ``topics`` (logical names) that matches every criterion."""

    topics: tuple[Topic, ...]
    partition: int | None = None
    offset: int | None = None
    idempotency_key: str | None = None
    sop_instance_uid: str | None = None
    variant_sha256: str | None = None
    """A normalized event's canonical or original sha256 (a held request names either)."""

    def matches(self, record: HistoryRecord, logical: Topic) -> bool:
        if logical not in self.topics:
            return False
        if self.partition is not None and record.partition != self.partition:
            return False
        if self.offset is not None and record.offset != self.offset:
            return False
        if self.offset is not None:
            return True
        data = (record.envelope() or {}).get("data")
        if not isinstance(data, dict):
            return False
        if self.idempotency_key is not None and data.get("idempotency_key") != self.idempotency_key:
            return False
        if self.sop_instance_uid is not None and data.get("sop_instance_uid") != (
            self.sop_instance_uid
        ):
            return False
        variants = [data.get("canonical"), data.get("original")]
        return self.variant_sha256 is None or any(
            isinstance(v, dict) and v.get("sha256") == self.variant_sha256 for v in variants
        )


@dataclass(frozen=True, slots=True)
class Letter:
    """One dead letter (or held instance), whichever topic and version it came from."""

    id: str
    """``<topic>:<partition>:<offset>``, the topic without the deployment's prefix: what
    ``radflow dlq show`` and ``replay`` take."""
    topic: Topic
    partition: int
    offset: int
    appended_at: datetime
    type: str
    """The event's CloudEvents type (``radflow.dead_letter`` on any topic, or the
    topic's own event)."""
    reason: str
    message: str
    service: str | None = None
    destination: str | None = None
    """The destination (forward), site (report) or None."""
    study: str | None = None
    instance: str | None = None
    """SOP Instance UID, or a report's id."""
    idempotency_key: str | None = None
    """For a delivery: the request's key, which ``dicom.forward.completed`` repeats."""
    settled_by: str | None = None
    """The key (:func:`delivery_key`, :func:`report_key`) under which a
    ``SETTLING_TOPICS`` event would say the original was done after all; None when no
    such event exists for it (a held instance, a transcode failure)."""
    original: Original | None = None
    lookup: Lookup | None = None
    not_replayable: str | None = None
    """Why this letter cannot be replayed by the CLI (then original and lookup are None)."""
    envelope: dict[str, Any] = field(default_factory=dict, compare=False)

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints for it (the envelope only in ``show``)."""
        return {
            "id": self.id,
            "topic": self.topic.value,
            "partition": self.partition,
            "offset": self.offset,
            "appended_at": self.appended_at.isoformat(),
            "type": self.type,
            "reason": self.reason,
            "message": self.message,
            "service": self.service,
            "destination": self.destination,
            "study": self.study,
            "instance": self.instance,
            "idempotency_key": self.idempotency_key,
            "replay_to": self.original.topic if self.original else None,
            "not_replayable": self.not_replayable,
        }


def letter_id(topic: Topic, partition: int, offset: int) -> str:
    return f"{topic.value}:{partition}:{offset}"


def parse_id(text: str) -> tuple[Topic, int, int]:
    """Raises ValueError with what is expected."""
    try:
        name, partition, offset = text.rsplit(":", 2)
        topic = Topic(name)
        if topic not in LETTER_TOPICS:
            raise ValueError(name)
        return topic, int(partition), int(offset)
    except ValueError:
        names = ", ".join(t.value for t in LETTER_TOPICS)
        raise ValueError(
            f"{text!r} is not a dead letter's id: <topic>:<partition>:<offset>, topic one of "
            f"{names}"
        ) from None


def letter_of(topic: Topic, record: HistoryRecord) -> Letter:
    """Read one record of a letter topic; a record that is not a readable event becomes
    a letter with reason ``unreadable`` and no replay, rather than an error."""
    base: dict[str, Any] = {
        "id": letter_id(topic, record.partition, record.offset),
        "topic": topic,
        "partition": record.partition,
        "offset": record.offset,
        "appended_at": record.appended_at,
        "envelope": record.envelope() or {},
    }
    kind = str(base["envelope"].get("type", ""))
    try:
        if kind == DeadLetter.type_name:
            return _dead_letter(base, decode(record.value, DeadLetter).data)
        if topic is Topic.FORWARD_FAILED:
            return _forward_failed(base, decode(record.value, ForwardFailed).data)
        if topic is Topic.REPORT_FAILED:
            return _report_failed(base, decode(record.value, ReportFailed).data)
        if topic is Topic.INSTANCE_HELD:
            return _held(base, decode(record.value, InstanceHeld).data)
    except EventDecodeError as exc:
        return Letter(
            **base,
            type=kind or "?",
            reason="unreadable",
            message=str(exc),
            study=record.key,
            not_replayable="not a readable event of this topic",
        )
    return Letter(
        **base,
        type=kind or "?",
        reason="unreadable",
        message=f"unexpected event type {kind!r} on {topic.value}",
        study=record.key,
        not_replayable="not a dead letter",
    )


def _dead_letter(base: dict[str, Any], letter: DeadLetter) -> Letter:
    data: dict[str, Any] = {}
    try:
        parsed = json.loads(letter.original_value)
        if isinstance(parsed, dict) and isinstance(parsed.get("data"), dict):
            data = parsed["data"]
    except ValueError:
        pass
    return Letter(
        **base,
        type=DeadLetter.type_name,
        reason=letter.reason,
        message=letter.message,
        service=letter.service,
        destination=_text(data.get("destination") or data.get("site")),
        study=letter.original_key or _text(data.get("study_instance_uid")),
        instance=_text(data.get("sop_instance_uid") or data.get("report_id")),
        idempotency_key=_text(data.get("idempotency_key")),
        settled_by=_settled_by(data),
        original=Original(letter.source_topic, letter.original_key, letter.original_value),
    )


def _forward_failed(base: dict[str, Any], failed: ForwardFailed) -> Letter:
    common: dict[str, Any] = {
        "type": ForwardFailed.type_name,
        "reason": failed.reason,
        "message": failed.message,
        "service": "stow-forwarder",
        "destination": failed.destination,
        "study": failed.study_instance_uid,
        "instance": failed.sop_instance_uid,
        "idempotency_key": failed.idempotency_key,
        "settled_by": delivery_key(failed.idempotency_key),
    }
    if failed.source_topic is not None and failed.original_value is not None:
        original = Original(failed.source_topic, failed.original_key, failed.original_value)
        return Letter(**base, **common, original=original)
    # v1: the request is found on its lane's topic by its key.
    lane_topic = failed.lane.topic(Topic.FORWARD_REQUESTED)
    lookup = Lookup((lane_topic,), idempotency_key=failed.idempotency_key)
    return Letter(**base, **common, lookup=lookup)


def _report_failed(base: dict[str, Any], failed: ReportFailed) -> Letter:
    common: dict[str, Any] = {
        "type": ReportFailed.type_name,
        "reason": failed.reason,
        "message": failed.message,
        "service": "report-return",
        "destination": failed.site,
        "study": failed.study_instance_uid,
        "instance": failed.sop_instance_uid or failed.report_id,
        "settled_by": report_key(
            failed.site, failed.report_id, failed.report_version, failed.channel.value
        ),
    }
    if failed.original_value is not None:
        original = Original(failed.source_topic, failed.original_key, failed.original_value)
        return Letter(**base, **common, original=original)
    # v2: the input is found at its coordinates.
    source = _logical(failed.source_topic)
    if source is None:
        return Letter(
            **base, **common, not_replayable=f"unknown source topic {failed.source_topic}"
        )
    lookup = Lookup((source,), partition=failed.source_partition, offset=failed.source_offset)
    return Letter(**base, **common, lookup=lookup)


def _held(base: dict[str, Any], held: InstanceHeld) -> Letter:
    common: dict[str, Any] = {
        "type": InstanceHeld.type_name,
        "reason": held.reason,
        "message": f"held by rules {held.rules_digest}",
        "service": "router",
        "study": held.study_instance_uid,
        "instance": held.sop_instance_uid,
    }
    if held.reason.startswith(UNKNOWN_DESTINATION):
        # A request for a destination the forwarder's rules lack: defined again under
        # that name, it gets its requests without a replay; a replay routes the instance
        # again with the rules in force (to wherever it should go instead).
        common["service"] = "stow-forwarder"
        common["destination"] = held.reason.removeprefix(UNKNOWN_DESTINATION).strip()
    routine = Topic.INSTANCE_NORMALIZED
    lookup = Lookup(
        (routine, STAT_LANE[routine]),
        sop_instance_uid=held.sop_instance_uid,
        variant_sha256=held.canonical.sha256,
    )
    return Letter(**base, **common, lookup=lookup)


def _logical(name: str) -> Topic | None:
    """The Topic a broker topic name is, whatever the deployment's prefix."""
    for topic in sorted(Topic, key=lambda t: -len(t.value)):
        if name == topic.value or name.endswith(f".{topic.value}"):
            return topic
    return None


def _settled_by(data: dict[str, Any]) -> str | None:
    """A generic dead letter's settling key, from the original event's fields."""
    key, site, report = data.get("idempotency_key"), data.get("site"), data.get("report_id")
    if isinstance(key, str):
        return delivery_key(key)
    if isinstance(site, str) and isinstance(report, str):
        version = data.get("report_version")
        return report_key(site, report, version if isinstance(version, int) else None)
    return None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Filters:
    """What ``--topic``, ``--reason``, ``--destination``, ``--study`` and ids select; an
    empty criterion selects everything. Reasons and destinations are shell-style
    patterns (``retries_*``), matched whole."""

    topics: tuple[Topic, ...] = ()
    reasons: tuple[str, ...] = ()
    destinations: tuple[str, ...] = ()
    studies: tuple[str, ...] = ()
    ids: tuple[str, ...] = ()

    def read_topics(self) -> tuple[Topic, ...]:
        """The letter topics worth reading for these filters."""
        wanted = set(self.topics) | {parse_id(i)[0] for i in self.ids}
        if self.topics and self.ids:
            wanted = set(self.topics) & {parse_id(i)[0] for i in self.ids}
        return tuple(t for t in LETTER_TOPICS if not wanted or t in wanted)

    def matches(self, letter: Letter) -> bool:
        if self.topics and letter.topic not in self.topics:
            return False
        if self.ids and letter.id not in self.ids:
            return False
        if self.reasons and not any(fnmatchcase(letter.reason, r) for r in self.reasons):
            return False
        if self.destinations and not (
            letter.destination is not None
            and any(fnmatchcase(letter.destination, d) for d in self.destinations)
        ):
            return False
        return not self.studies or letter.study in self.studies
