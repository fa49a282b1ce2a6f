"""The router on the real broker and S3, fed by real ingest and transcode: studies
come out as the right forward requests, delayed studies are released once even across
restarts, STAT goes to its own lane, rule files reload live."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from radflow_core.kafka import EventProducer
from radflow_core.topics import Topic
from radflow_devstack.kit import rules_file
from radflow_devstack.kit.waiting import wait_for
from support.audit import audit_records
from support.bad_rules import BAD_RULE_FILES, GOOD_HEAD
from support.dicom import make_instance, pynetdicom_store
from support.metrics import metric, metric_sum
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

DESTINATIONS = {
    "pacs": "url: http://127.0.0.1:1/dicom-web",
    "ai": "url: http://127.0.0.1:2/dicom-web\ntransfer_syntaxes: [1.2.840.10008.1.2.1]",
    "nighthawk": "url: http://127.0.0.1:3/dicom-web",
}


def site_rules(path: Path, rules: str) -> Path:
    """A rule file with the three destinations above and these rules (UTC times)."""
    return rules_file.write_rules(path, DESTINATIONS, rules=rules, timezone="UTC")


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def requests(stack: Stack, topic: Topic = Topic.FORWARD_REQUESTED) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(topic)]


def restored(router: IngestProcess, changelog: str) -> bool:
    """True once ``router`` logged restoring one pending study from ``changelog``."""
    for text in router.log().splitlines():
        with contextlib.suppress(ValueError):
            line = json.loads(text)
            if (
                line.get("message") == "pending studies restored"
                and line.get("topic") == changelog
                and line.get("pending") == 1
            ):
                return True
    return False


def send_series(
    ingest: IngestProcess,
    tmp_path: Path,
    study: str,
    count: int,
    *,
    modality: str = "CT",
    calling_ae: str = "PYSCU",
    priority: str = "medium",
    extra: dict[str, Any] | None = None,
) -> list[str]:
    """Send ``count`` instances of one new series; returns their SOP Instance UIDs."""
    series = generate_uid()
    uids = []
    for _ in range(count):
        uid = generate_uid()
        path = make_instance(
            tmp_path / f"{uid}.dcm",
            sop_instance_uid=uid,
            study_instance_uid=study,
            series_instance_uid=series,
            modality=modality,
            extra=extra,
        )
        result = pynetdicom_store(ingest.dimse_port, path, calling_ae=calling_ae, priority=priority)
        assert result.status == 0, result
        uids.append(uid)
    return uids


@pytest.fixture
def pipeline(stack: Stack, start_ingest, start_transcode) -> IngestProcess:
    """Ingest and transcode running; the router is started by each test."""
    ingest: IngestProcess = start_ingest(wait_ready=False, wait_port=False)
    start_transcode(wait_ready=False, wait_port=False).wait_ready()
    return ingest.wait_ready()


def test_a_study_of_several_series_becomes_one_request_per_instance_and_destination(
    stack: Stack, pipeline: IngestProcess, start_router, tmp_path: Path
) -> None:
    rules = site_rules(
        tmp_path / "rules.yaml",
        """
rules:
  - name: ct-to-ai
    when: {modality: CT}
    route: [ai]
    continue: true
  - name: everything-to-pacs
    route: [pacs]
default:
  hold: unrouted
""",
    )
    start_router(rules_file=str(rules))
    study = generate_uid()
    ct = send_series(pipeline, tmp_path, study, 3, modality="CT")
    ct += send_series(pipeline, tmp_path, study, 2, modality="CT")
    mr = send_series(pipeline, tmp_path, study, 2, modality="MR")

    wait_for("12 forward requests", lambda: len(requests(stack)) == 12, timeout_s=90)
    normalized = {
        e["data"]["sop_instance_uid"]: e["data"] for e in stack.events(Topic.INSTANCE_NORMALIZED)
    }
    got = requests(stack)
    assert sorted((r["sop_instance_uid"], r["destination"]) for r in got) == sorted(
        [(u, "ai") for u in ct] + [(u, "pacs") for u in ct + mr]
    )
    for request in got:
        event = normalized[request["sop_instance_uid"]]
        assert request["study_instance_uid"] == study
        assert request["lane"] == "routine"
        assert request["original_sha256"] == event["original"]["sha256"]
        key = "\n".join(
            (request["sop_instance_uid"], event["original"]["sha256"], request["destination"])
        )
        assert request["idempotency_key"] == hashlib.sha256(key.encode()).hexdigest()
        if request["destination"] == "ai":  # accepts only Explicit VR LE: the original
            assert request["rules"] == ["ct-to-ai"]
            assert request["blob"] == event["original"]
            assert request["requested_transfer_syntax_uid"] == "1.2.840.10008.1.2.1"
        else:
            assert request["rules"] == ["everything-to-pacs"]
            assert request["blob"] == event["canonical"]
            assert request["transfer_syntax_uid"] == event["canonical_transfer_syntax_uid"]
        stack.assert_event_matches_blob({"data": {"blob": request["blob"]}})
    assert requests(stack, Topic.FORWARD_REQUESTED_STAT) == []
    assert requests(stack, Topic.INSTANCE_HELD) == []


WAIT_RULES = """
rules:
  - name: wait-for-study
    route: [pacs]
    wait_for_study_complete: {quiet_seconds: %d, level: study}
default:
  hold: unrouted
"""


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm", "sigkill"])
def test_a_delayed_study_is_released_once_after_its_quiet_period_across_a_restart(
    stack: Stack, pipeline: IngestProcess, start_router, tmp_path: Path, crash: bool
) -> None:
    # Usually longer than a restart, including the broker's session timeout (3 s in the
    # test stack) that keeps a killed router's partitions assigned to it, so the study is
    # held across it; under load the restart can take longer, and it must still leave once.
    quiet = 12
    rules = site_rules(tmp_path / "rules.yaml", WAIT_RULES % quiet)
    router = start_router(rules_file=str(rules), release_interval_s="0.2")
    study = generate_uid()
    sent = send_series(pipeline, tmp_path, study, 4)
    wait_for(
        "4 pending instances",
        lambda: metric(router.url, "radflow_router_pending_instances", lane="routine") == 4,
        timeout_s=60,
    )
    if crash:
        router.proc.kill()
        router.expected_exit = -9
    else:
        assert router.proc.stop() == 0
    assert requests(stack) == []

    restarted = start_router(rules_file=str(rules), release_interval_s="0.2")
    # Whether the restored study is still waiting depends on how long the restart took:
    # under load it can outlast the quiet period, and then the study leaves at the first
    # release tick after the restore, sooner than a poll of the pending gauge sees it at
    # 4. The restore itself is in the new router's log either way.
    changelog = stack.topic(Topic.ROUTER_PENDING)
    wait_for("the pending study restored", lambda: restored(restarted, changelog), timeout_s=60)
    wait_for("the study released", lambda: len(requests(stack)) == 4, timeout_s=quiet + 30)
    time.sleep(2)  # ten release ticks: a second release would show now
    released = requests(stack)
    assert sorted(r["sop_instance_uid"] for r in released) == sorted(sent)
    assert {r["waited_for"] for r in released} == {"study"}
    last_arrival = max(
        datetime.fromisoformat(e["data"]["normalized_at"])
        for e in stack.events(Topic.INSTANCE_NORMALIZED)
    )
    released_at = min(datetime.fromisoformat(r["routed_at"]) for r in released)
    assert (released_at - last_arrival).total_seconds() >= quiet
    assert metric(restarted.url, "radflow_router_pending_instances", lane="routine") == 0
    assert metric(restarted.url, "radflow_router_released_total") == 1


def test_instances_arriving_during_the_quiet_period_extend_it_and_leave_together(
    stack: Stack, pipeline: IngestProcess, start_router, tmp_path: Path
) -> None:
    rules = site_rules(tmp_path / "rules.yaml", WAIT_RULES % 4)
    router = start_router(rules_file=str(rules), release_interval_s="0.2")
    study = generate_uid()
    first = send_series(pipeline, tmp_path, study, 2)
    wait_for(
        "2 pending",
        lambda: metric(router.url, "radflow_router_pending_instances", lane="routine") == 2,
    )
    time.sleep(2)
    second = send_series(pipeline, tmp_path, study, 2)
    wait_for(
        "4 pending",
        lambda: metric(router.url, "radflow_router_pending_instances", lane="routine") == 4,
    )
    wait_for("the study released", lambda: len(requests(stack)) == 4, timeout_s=30)
    released = requests(stack)
    assert sorted(r["sop_instance_uid"] for r in released) == sorted(first + second)
    assert len({r["routed_at"] for r in released}) == 1, "released as one group"


def test_a_stat_instance_takes_the_stat_lane_past_a_routine_backlog(
    stack: Stack, pipeline: IngestProcess, start_router, tmp_path: Path
) -> None:
    rules = site_rules(
        tmp_path / "rules.yaml",
        """
stat:
  from_priority: true
  calling_aes: [ER_CT1]
rules:
  - name: all-to-pacs
    route: [pacs]
default:
  hold: unrouted
""",
    )
    router = start_router(rules_file=str(rules))
    backlog = send_series(pipeline, tmp_path, generate_uid(), 20)
    by_ae = send_series(pipeline, tmp_path, generate_uid(), 1, calling_ae="ER_CT1")
    by_priority = send_series(pipeline, tmp_path, generate_uid(), 1, priority="high")
    by_tag = send_series(
        pipeline, tmp_path, generate_uid(), 1, extra={"RequestedProcedurePriority": "STAT"}
    )
    wait_for(
        "routine backlog and 3 STAT requests",
        lambda: stack.routed(routine=20, stat=3),
        timeout_s=90,
    )
    # The STAT lane holds only the STAT instances: a forwarder that reads it first
    # delivers them before any of the routine backlog.
    stat = requests(stack, Topic.FORWARD_REQUESTED_STAT)
    assert sorted(r["sop_instance_uid"] for r in stat) == sorted(by_ae + by_priority + by_tag)
    assert {r["lane"] for r in stat} == {"stat"}
    assert sorted(r["sop_instance_uid"] for r in requests(stack)) == sorted(backlog)
    # Priorities came with the normalized events (v2): no header was read from S3.
    assert metric_sum(router.url, "radflow_blob_requests_total", operation="get_range") == 0


def test_a_v1_normalized_event_is_still_routed_from_the_header_in_the_blob(
    stack: Stack, start_router, tmp_path: Path
) -> None:
    """An event written before transcode carried the routing attributes (v1) has the
    router read the header: its Requested Procedure Priority still makes it STAT."""
    rules = site_rules(
        tmp_path / "rules.yaml",
        """
stat:
  from_priority: true
rules:
  - name: all-to-pacs
    route: [pacs]
default:
  hold: unrouted
""",
    )
    router = start_router(rules_file=str(rules))
    study = generate_uid()
    path = make_instance(
        tmp_path / "stat.dcm",
        study_instance_uid=study,
        extra={"RequestedProcedurePriority": "STAT"},
    )
    event = v1_normalized(stack, path)
    wait_for("the STAT request", lambda: stack.routed(routine=0, stat=1), timeout_s=60)
    (request,) = requests(stack, Topic.FORWARD_REQUESTED_STAT)
    assert request["sop_instance_uid"] == event["sop_instance_uid"]
    assert metric_sum(router.url, "radflow_blob_requests_total", operation="get_range") >= 1


def test_rules_on_header_attributes_and_tags_route_and_unmatched_instances_are_held(
    stack: Stack, pipeline: IngestProcess, start_router, tmp_path: Path
) -> None:
    rules = site_rules(
        tmp_path / "rules.yaml",
        """
rules:
  - name: stroke
    when:
      all:
        - study_description: {regex: "(?i)stroke"}
        - (0008,0080): {equals: "Kantonsspital"}
    route: [ai]
  - name: night-institution
    when: {InstitutionName: Nachtklinik}
    route: [nighthawk]
default:
  hold: "no rule for this institution"
""",
    )
    router = start_router(rules_file=str(rules))
    stroke = send_series(
        pipeline,
        tmp_path,
        generate_uid(),
        1,
        extra={"StudyDescription": "CT Stroke protocol", "InstitutionName": "Kantonsspital"},
    )
    night = send_series(
        pipeline, tmp_path, generate_uid(), 1, extra={"InstitutionName": "Nachtklinik"}
    )
    other = send_series(
        pipeline, tmp_path, generate_uid(), 1, extra={"InstitutionName": "Elsewhere"}
    )
    wait_for(
        "2 requests and 1 hold",
        lambda: len(requests(stack)) == 2 and len(requests(stack, Topic.INSTANCE_HELD)) == 1,
        timeout_s=90,
    )
    routed = {r["sop_instance_uid"]: (r["destination"], r["rules"]) for r in requests(stack)}
    assert routed == {stroke[0]: ("ai", ["stroke"]), night[0]: ("nighthawk", ["night-institution"])}
    (held,) = requests(stack, Topic.INSTANCE_HELD)
    assert held["sop_instance_uid"] == other[0]
    assert held["reason"] == "no rule for this institution"
    stack.assert_event_matches_blob({"data": {"blob": held["canonical"]}})
    assert metric(router.url, "radflow_router_rule_matches_total", rule="stroke") == 1
    assert metric(router.url, "radflow_router_held_total") == 1
    assert "SENTINEL" not in router.log()


def test_a_changed_rule_file_takes_effect_live_and_an_invalid_change_is_rejected(
    stack: Stack, pipeline: IngestProcess, start_router, tmp_path: Path
) -> None:
    rules = site_rules(
        tmp_path / "rules.yaml", "rules:\n  - name: a\n    route: [pacs]\ndefault: {hold: x}\n"
    )
    router = start_router(rules_file=str(rules), reload_interval_s="0.2")
    assert metric(router.url, "radflow_router_rules_generation") == 1
    first = send_series(pipeline, tmp_path, generate_uid(), 1)
    wait_for("first request", lambda: len(requests(stack)) == 1, timeout_s=60)

    site_rules(rules, "rules:\n  - name: b\n    route: [nighthawk]\ndefault: {hold: x}\n")
    wait_for("reload", lambda: metric(router.url, "radflow_router_rules_generation") == 2)
    second = send_series(pipeline, tmp_path, generate_uid(), 1)
    wait_for("second request", lambda: len(requests(stack)) == 2, timeout_s=60)

    site_rules(rules, "rules:\n  - name: c\n    route: [nowhere]\ndefault: {hold: x}\n")
    wait_for("rejection", lambda: metric(router.url, "radflow_router_rules_valid") == 0)
    third = send_series(pipeline, tmp_path, generate_uid(), 1)
    wait_for("third request", lambda: len(requests(stack)) == 3, timeout_s=60)

    routed = {r["sop_instance_uid"]: r["destination"] for r in requests(stack)}
    assert routed == {first[0]: "pacs", second[0]: "nighthawk", third[0]: "nighthawk"}
    assert router.proc.proc is not None and router.proc.proc.poll() is None
    assert metric(router.url, "radflow_router_rules_reloads_total", outcome="rejected") == 1
    assert f"rules.yaml:{line_of(rules, 'nowhere')}: unknown destination 'nowhere'" in router.log()

    site_rules(rules, "rules:\n  - name: d\n    route: [ai]\ndefault: {hold: x}\n")
    wait_for("recovery", lambda: metric(router.url, "radflow_router_rules_valid") == 1)
    assert metric(router.url, "radflow_router_rules_generation") == 3
    # The audit trail: a Software Configuration security alert per change seen.
    changes = wait_for(
        "three audited changes",
        lambda: (
            len(c := [r for r in audit_records(stack, "110113") if r["event_type"] == "110131"])
            == 3
            and c
        ),
        every_s=0.5,
        timeout_s=60,
    )
    assert sorted(c["outcome"] for c in changes) == [0, 0, 4]


def test_the_router_does_not_start_on_an_invalid_rule_file(
    stack: Stack, start_router, tmp_path: Path
) -> None:
    rules = site_rules(tmp_path / "rules.yaml", "rules:\n  - name: a\n    route: [nowhere]\n")
    router = start_router(rules_file=str(rules), wait_ready=False, wait_port=False)
    router.expected_exit = 3
    assert router.proc.proc is not None
    assert router.proc.proc.wait(timeout=60) == 3
    log = router.log()
    assert f"rules.yaml:{line_of(rules, 'nowhere')}: unknown destination 'nowhere'" in log
    assert "no 'default'" in log


def test_a_second_router_replaying_the_topic_asks_for_the_same_deliveries(
    stack: Stack, pipeline: IngestProcess, start_router, tmp_path: Path
) -> None:
    rules = site_rules(
        tmp_path / "rules.yaml", "rules:\n  - name: a\n    route: [pacs, ai]\ndefault: {hold: x}\n"
    )
    start_router(rules_file=str(rules))
    send_series(pipeline, tmp_path, generate_uid(), 3)
    wait_for("6 requests", lambda: len(requests(stack)) == 6, timeout_s=60)
    start_router(rules_file=str(rules), group_id="replay")
    wait_for("12 requests", lambda: len(requests(stack)) == 12, timeout_s=60)
    keys = [r["idempotency_key"] for r in requests(stack)]
    assert len(set(keys)) == 6 and all(keys.count(k) == 2 for k in keys)


def test_no_kind_of_bad_rule_file_stops_a_running_router(
    stack: Stack, pipeline: IngestProcess, start_router, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(GOOD_HEAD + "rules:\n  - name: good\n    route: [pacs]\ndefault: {hold: x}\n")
    router = start_router(rules_file=str(rules), reload_interval_s="0.1")
    for count, (kind, text, expected) in enumerate(BAD_RULE_FILES, 1):
        # Swapped in whole, as a ConfigMap update is: a half-written file would be a
        # different (also rejected) mistake.
        staged = tmp_path / "rules.yaml.new"
        staged.write_text(text)
        staged.replace(rules)
        wait_for(
            f"{kind} rejected",
            lambda n=count: (
                metric(router.url, "radflow_router_rules_reloads_total", outcome="rejected") == n
            ),
        )
        assert expected.replace("site.yaml", str(rules)) in router.log(), kind
    assert metric(router.url, "radflow_router_rules_valid") == 0
    assert metric(router.url, "radflow_router_rules_generation") == 1
    sent = send_series(pipeline, tmp_path, generate_uid(), 1)
    wait_for("routed by the last valid rules", lambda: len(requests(stack)) == 1, timeout_s=60)
    (request,) = requests(stack)
    assert (request["sop_instance_uid"], request["rules"]) == (sent[0], ["good"])


def v1_normalized(stack: Stack, path: Path) -> dict[str, Any]:
    """Store ``path`` and publish a ``dicom.instance.normalized`` v1 record for it, as
    transcode wrote them before v2 (no ``routing``); returns its payload."""
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    study = str(ds.StudyInstanceUID)
    key = f"canonical/{hashlib.sha256(study.encode()).hexdigest()[:24]}/{digest}.dcm"
    stack.minio().put_object(stack.s3.bucket, key, io.BytesIO(data), len(data))
    blob = {"bucket": stack.s3.bucket, "key": key, "size": len(data), "sha256": digest}
    now = datetime.now(UTC).isoformat()
    payload = {
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "sop_class_uid": str(ds.SOPClassUID),
        "study_instance_uid": study,
        "series_instance_uid": str(ds.SeriesInstanceUID),
        "modality": str(ds.get("Modality") or "") or None,
        "sender": {"protocol": "dimse", "calling_ae": "PYSCU", "called_ae": "RADFLOW"},
        "received_at": now,
        "original": blob,
        "original_transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
        "canonical": blob,
        "canonical_transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
        "decode_status": "already_canonical",
        "normalized_at": now,
    }
    envelope = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "type": "dicom.instance.normalized",
        "source": "/radflow/transcode/before-v2",
        "time": now,
        "datacontenttype": "application/json",
        "dataschema": "radflow:dicom.instance.normalized:v1",
        "data": payload,
    }

    async def send() -> None:
        producer = EventProducer(stack.kafka, "test-transcode")
        await producer.start()
        try:
            await producer.send(
                stack.topic(Topic.INSTANCE_NORMALIZED),
                study.encode(),
                json.dumps(envelope).encode(),
            )
        finally:
            await producer.stop()

    asyncio.run(send())
    return payload
