"""``radflow dlq`` without a broker: every letter topic and version read into one shape,
the filters, and what a replay decides (the same request once, what was delivered
skipped, what has no original reported)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from core.test_events import normalized, received
from radflow_core.cli.common import when
from radflow_core.cli.dlq.letters import Filters, Letter, Lookup, Original, letter_of, parse_id
from radflow_core.cli.dlq.replay import Outcome, plan
from radflow_core.events import (
    DeadLetter,
    ForwardFailed,
    ForwardRequested,
    InstanceHeld,
    Lane,
    ReportChannel,
    ReportFailed,
    ReportSource,
    encode,
    wrap,
)
from radflow_core.history import HistoryRecord
from radflow_core.topics import Topic
from radflow_devstack.processes import free_port

PREFIX = "site1."
T0 = datetime(2026, 12, 1, 8, 0, tzinfo=UTC)


def record(
    topic: Topic, offset: int, value: bytes, key: str = "1.2.3", minute: int = 0
) -> HistoryRecord:
    return HistoryRecord(
        topic=f"{PREFIX}{topic.value}",
        partition=0,
        offset=offset,
        appended_at=T0 + timedelta(minutes=minute),
        key=key,
        value=value,
    )


def request(destination: str = "pacs", sop: str = "1.2.3.4") -> ForwardRequested:
    base = received(sop_instance_uid=sop)
    return ForwardRequested(
        **base.identity(),
        destination=destination,
        lane=Lane.ROUTINE,
        blob=base.blob,
        transfer_syntax_uid=base.transfer_syntax_uid,
        requested_transfer_syntax_uid=base.transfer_syntax_uid,
        original_sha256="b" * 64,
        rules=("all",),
        rules_digest="0123456789ab",
        idempotency_key=hashlib.sha256(f"{sop}|{destination}".encode()).hexdigest(),
        routed_at=T0,
    )


def forward_failed(req: ForwardRequested, v1: bool = False, reason: str = "rejected") -> bytes:
    source: dict[str, object] = {}
    if not v1:
        source = {
            "source_topic": f"{PREFIX}dicom.forward.requested",
            "source_partition": 2,
            "source_offset": 41,
            "original_key": req.study_instance_uid,
            "original_value": encode(wrap(req, "router")).decode(),
        }
    failed = ForwardFailed(
        **req.identity(),
        destination=req.destination,
        lane=req.lane,
        idempotency_key=req.idempotency_key,
        original_sha256=req.original_sha256,
        attempts=1,
        reason=reason,
        http_status=404,
        message="404 Not Found",
        retriable=False,
        failed_at=T0,
        **source,  # type: ignore[arg-type]
    )
    if not v1:
        return encode(wrap(failed, "stow-forwarder"))
    parsed = json.loads(encode(wrap(failed, "stow-forwarder")))
    for name in source:
        del parsed["data"][name]
    parsed["dataschema"] = "radflow:dicom.forward.failed:v1"
    return json.dumps(parsed).encode()


def test_a_v2_forward_failed_carries_its_request_as_it_was_on_its_topic() -> None:
    req = request()
    letter = letter_of(Topic.FORWARD_FAILED, record(Topic.FORWARD_FAILED, 7, forward_failed(req)))
    assert letter.id == "dicom.forward.failed:0:7"
    assert (letter.reason, letter.destination, letter.instance) == ("rejected", "pacs", "1.2.3.4")
    assert letter.original is not None
    assert letter.original.topic == f"{PREFIX}dicom.forward.requested"
    assert letter.original.key == req.study_instance_uid
    assert json.loads(letter.original.value)["data"]["idempotency_key"] == req.idempotency_key


def test_a_v1_forward_failed_is_read_and_its_request_looked_up_by_key() -> None:
    req = request()
    raw = forward_failed(req, v1=True)
    letter = letter_of(Topic.FORWARD_FAILED, record(Topic.FORWARD_FAILED, 0, raw))
    assert letter.original is None and letter.reason == "rejected"
    assert letter.lookup == Lookup((Topic.FORWARD_REQUESTED,), idempotency_key=req.idempotency_key)
    wanted = record(Topic.FORWARD_REQUESTED, 9, encode(wrap(req, "router")))
    other = record(Topic.FORWARD_REQUESTED, 10, encode(wrap(request(sop="1.2.3.5"), "router")))
    assert letter.lookup.matches(wanted, Topic.FORWARD_REQUESTED)
    assert not letter.lookup.matches(other, Topic.FORWARD_REQUESTED)
    assert not letter.lookup.matches(wanted, Topic.FORWARD_REQUESTED_STAT)


def test_generic_dead_letters_report_failed_and_held_instances_are_letters_too() -> None:
    original = encode(wrap(received(), "ingest")).decode()
    dead = DeadLetter(
        reason="blob_integrity_error",
        message="sha256 mismatch",
        retriable=False,
        attempts=1,
        service="transcode",
        source_topic=f"{PREFIX}dicom.instance.received",
        source_partition=1,
        source_offset=5,
        original_key="1.2.3",
        original_value=original,
        failed_at=T0,
    )
    letter = letter_of(
        Topic.INSTANCE_FAILED, record(Topic.INSTANCE_FAILED, 3, encode(wrap(dead, "transcode")))
    )
    assert letter.original == Original(f"{PREFIX}dicom.instance.received", "1.2.3", original)
    assert (letter.service, letter.instance) == ("transcode", "1.2.3.4")

    report = ReportFailed(
        site="north",
        source=ReportSource.REPORTS_FINALIZED,
        report_id="r-1",
        report_version=1,
        study_instance_uid="1.2.3",
        attempts=3,
        reason="rejected",
        message="AR",
        retriable=False,
        source_topic=f"{PREFIX}reports.finalized",
        source_partition=4,
        source_offset=1234,
        failed_at=T0,
    )
    letter = letter_of(
        Topic.REPORT_FAILED, record(Topic.REPORT_FAILED, 0, encode(wrap(report, "rr")))
    )
    assert letter.destination == "north" and letter.original is None  # as a v2 is read
    assert letter.settled_by == "report:north|r-1|1"
    assert letter.lookup == Lookup((Topic.REPORTS_FINALIZED,), partition=4, offset=1234)
    v3 = report.model_copy(update={"original_key": "1.2.3", "original_value": "{}"})
    letter = letter_of(Topic.REPORT_FAILED, record(Topic.REPORT_FAILED, 1, encode(wrap(v3, "rr"))))
    assert letter.original == Original(f"{PREFIX}reports.finalized", "1.2.3", "{}")
    # A FHIR failure of a site that takes both is settled only by the FHIR return.
    fhir = v3.model_copy(update={"channel": ReportChannel.FHIR})
    letter = letter_of(
        Topic.REPORT_FAILED, record(Topic.REPORT_FAILED, 2, encode(wrap(fhir, "rr")))
    )
    assert letter.settled_by == "report:north|r-1|1|fhir"

    n = normalized()
    held = InstanceHeld(
        **n.identity(),
        reason="no rule for MR",
        canonical=n.canonical,
        canonical_transfer_syntax_uid=n.canonical_transfer_syntax_uid,
        rules_digest="0123456789ab",
        held_at=T0,
    )
    letter = letter_of(Topic.INSTANCE_HELD, record(Topic.INSTANCE_HELD, 0, encode(wrap(held, "r"))))
    assert letter.lookup is not None and letter.not_replayable is None
    assert letter.lookup.matches(
        record(Topic.INSTANCE_NORMALIZED_STAT, 0, encode(wrap(n, "t"))),
        Topic.INSTANCE_NORMALIZED_STAT,
    )
    # A request held for an undefined destination names the variant it would have sent:
    # the original, here; replaying it routes the instance again.
    other = n.model_copy(update={"canonical": n.canonical.model_copy(update={"sha256": "e" * 64})})
    unknown = held.model_copy(update={"reason": "unknown_destination: ai"})
    letter = letter_of(
        Topic.INSTANCE_HELD, record(Topic.INSTANCE_HELD, 1, encode(wrap(unknown, "f")))
    )
    assert letter.destination == "ai" and letter.not_replayable is None
    assert letter.lookup is not None
    assert letter.lookup.matches(
        record(Topic.INSTANCE_NORMALIZED, 0, encode(wrap(other, "t"))), Topic.INSTANCE_NORMALIZED
    )
    assert not letter.lookup.matches(
        record(
            Topic.INSTANCE_NORMALIZED,
            0,
            encode(wrap(n.model_copy(update={"sop_instance_uid": "1.2.9"}), "t")),
        ),
        Topic.INSTANCE_NORMALIZED,
    )


def test_a_record_that_is_no_event_is_listed_as_unreadable_not_fatal() -> None:
    letter = letter_of(Topic.FORWARD_FAILED, record(Topic.FORWARD_FAILED, 0, b"not json"))
    assert letter.reason == "unreadable" and letter.not_replayable is not None


def letters() -> list[Letter]:
    a = letter_of(Topic.FORWARD_FAILED, record(Topic.FORWARD_FAILED, 0, forward_failed(request())))
    b = letter_of(
        Topic.FORWARD_FAILED,
        record(
            Topic.FORWARD_FAILED,
            1,
            forward_failed(request("ai", "1.2.3.5"), reason="retries_exhausted"),
            key="9.9",
            minute=5,
        ),
    )
    c = letter_of(Topic.FORWARD_FAILED, record(Topic.FORWARD_FAILED, 2, b"{}", key="7.7", minute=9))
    return [a, b, c]


def test_filters_select_by_topic_reason_pattern_destination_study_and_id() -> None:
    a, b, c = letters()
    everything = [a, b, c]

    def chosen(**kwargs: object) -> list[str]:
        selected = Filters(**kwargs)  # type: ignore[arg-type]
        return [x.id for x in everything if selected.matches(x)]

    assert chosen() == [a.id, b.id, c.id]
    assert chosen(reasons=("retries_*",)) == [b.id]
    assert chosen(reasons=("rejected", "unreadable")) == [a.id, c.id]
    assert chosen(destinations=("pacs",)) == [a.id]
    assert chosen(destinations=("*",)) == [a.id, b.id]  # a letter without one is not "*"
    assert chosen(studies=("1.2.3",)) == [a.id, b.id]
    assert chosen(ids=(b.id,)) == [b.id]
    assert chosen(topics=(Topic.REPORT_FAILED,)) == []
    assert Filters(ids=(b.id,)).read_topics() == (Topic.FORWARD_FAILED,)
    assert len(Filters().read_topics()) == 4


def test_ids_and_times_parse_as_an_operator_types_them() -> None:
    assert parse_id("dicom.forward.failed:2:41") == (Topic.FORWARD_FAILED, 2, 41)
    for bad in ("dicom.forward.requested:0:1", "dicom.forward.failed:x:1", "nothing"):
        with pytest.raises(ValueError, match="<topic>:<partition>:<offset>"):
            parse_id(bad)
    assert when("2026-12-01T08:00") == T0
    assert when("2026-12-01T09:00+01:00") == T0
    assert abs((datetime.now(UTC) - when("2h")) - timedelta(hours=2)) < timedelta(seconds=5)
    with pytest.raises(argparse.ArgumentTypeError):
        when("yesterday")


def test_a_replay_skips_the_delivered_publishes_each_request_once_and_names_the_rest() -> None:
    a, b, c = letters()
    again = letter_of(  # the same request as a, failed again after a replay
        Topic.FORWARD_FAILED, record(Topic.FORWARD_FAILED, 3, forward_failed(request()), minute=20)
    )
    assert b.settled_by == f"delivery:{b.idempotency_key}"
    delivered = (b.appended_at + timedelta(minutes=1), "delivered (dicom.forward.completed)")
    actions = plan([a, b, c, again], {b.settled_by: delivered}, {})
    outcome = {x.letter.id: (x.outcome, x.why) for x in actions}
    assert [x.letter.id for x in actions] == [a.id, b.id, c.id, again.id]
    assert outcome[again.id][0] is Outcome.REPLAY  # the newest letter stands for the request
    assert outcome[a.id] == (Outcome.SKIP, f"the same request is replayed by {again.id}")
    assert outcome[b.id] == (Outcome.SKIP, "already delivered (dicom.forward.completed)")
    assert outcome[c.id][0] is Outcome.CANNOT

    v1 = letter_of(
        Topic.FORWARD_FAILED, record(Topic.FORWARD_FAILED, 4, forward_failed(request(), v1=True))
    )
    lost, found = plan([v1], {}, {}), plan([v1], {}, {v1.id: a.original})  # type: ignore[dict-item]
    assert lost[0].outcome is Outcome.CANNOT and "no longer retained" in lost[0].why
    assert found[0].outcome is Outcome.REPLAY and found[0].original == a.original


def test_no_broker_bad_settings_and_a_bad_id_are_told_with_an_exit_status() -> None:
    radflow = Path(sys.executable).with_name("radflow")

    def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(radflow), "dlq", *args],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    nobody = run("list", RADFLOW_KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    assert nobody.returncode == 3 and "the broker cannot be used" in nobody.stderr
    assert "Traceback" not in nobody.stderr
    bad = run("list", RADFLOW_KAFKA_FETCH_MAX_WAIT_MS="soon")
    assert bad.returncode == 3 and "RADFLOW_KAFKA_FETCH_MAX_WAIT_MS" in bad.stderr
    wrong = run("show", "dicom.forward.requested:0:1")
    assert wrong.returncode == 1 and "<topic>:<partition>:<offset>" in wrong.stderr


def test_a_delivery_before_the_letter_does_not_settle_it() -> None:
    """Verification found the destination did not hold what it acknowledged: the
    completion precedes the not_held_after_delivery letter, and the replay sends again."""
    _, b, _ = letters()
    assert b.settled_by is not None
    before = (b.appended_at - timedelta(seconds=5), "delivered (dicom.forward.completed)")
    after = (b.appended_at + timedelta(seconds=5), "delivered (dicom.forward.completed)")
    assert plan([b], {b.settled_by: before}, {})[0].outcome is Outcome.REPLAY
    assert plan([b], {b.settled_by: after}, {})[0].outcome is Outcome.SKIP
