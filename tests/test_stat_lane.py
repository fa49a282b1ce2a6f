"""The STAT lane starts at the front door: ingest applies the rule file's ``stat:``
policy, and transcode and router read the STAT topics ahead of a routine backlog."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from radflow_core.topics import Topic
from radflow_devstack.kit.dcmtk import storescu
from radflow_devstack.kit.waiting import wait_for
from support.dicom import make_instance, pynetdicom_store
from support.metrics import metric
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

RULES = """version: 1
destinations:
  pacs: {url: "http://127.0.0.1:9/dicom-web"}
stat:
  calling_aes: [ER_CT1]
rules:
  - name: everything
    route: [pacs]
default: {hold: unrouted}
"""


def uids(stack: Stack, topic: Topic) -> list[str]:
    return [e["data"]["sop_instance_uid"] for e in stack.events(topic)]


def instance(tmp_path: Path, study: str | None = None, **extra: str) -> tuple[str, Path]:
    uid = generate_uid()
    path = make_instance(
        tmp_path / f"{uid}.dcm",
        sop_instance_uid=uid,
        study_instance_uid=study or generate_uid(),
        extra=extra or None,
    )
    return uid, path


def store_from(ingest: IngestProcess, path: Path, calling_ae: str) -> None:
    done = storescu(ingest.dimse_port, path, calling_ae=calling_ae)
    assert done.returncode == 0, done.stderr


def test_ingest_announces_stat_instances_on_the_stat_topic_by_the_rule_file_s_policy(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    ingest = start_ingest(rules_file=str(rules))
    by_ae, path = instance(tmp_path)
    store_from(ingest, path, "ER_CT1")
    by_priority, path = instance(tmp_path)
    assert pynetdicom_store(ingest.dimse_port, path, priority="high").status == 0
    by_tag, path = instance(tmp_path, RequestedProcedurePriority="STAT")
    store_from(ingest, path, "CT2")
    routine = []
    for _ in range(2):
        uid, path = instance(tmp_path, RequestedProcedurePriority="ROUTINE")
        store_from(ingest, path, "CT2")
        routine.append(uid)
    # The same STAT bytes again: recognised as a duplicate, announced once.
    store_from(ingest, tmp_path / f"{by_ae}.dcm", "ER_CT1")

    assert sorted(uids(stack, Topic.INSTANCE_RECEIVED_STAT)) == sorted([by_ae, by_priority, by_tag])
    assert sorted(uids(stack, Topic.INSTANCE_RECEIVED)) == sorted(routine)
    assert metric(ingest.url, "radflow_ingest_lane_total", lane="stat") == 3
    assert metric(ingest.url, "radflow_ingest_lane_total", lane="routine") == 2


def test_ingest_keeps_receiving_without_a_valid_rule_file_and_takes_up_a_fixed_one(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES.replace("route: [pacs]", "route: [nowhere]"))
    ingest = start_ingest(rules_file=str(rules), reload_interval_s="0.2")
    assert metric(ingest.url, "radflow_ingest_rules_valid") == 0
    before, path = instance(tmp_path)
    store_from(ingest, path, "ER_CT1")
    assert uids(stack, Topic.INSTANCE_RECEIVED) == [before], "routine lane until it is fixed"
    assert "nowhere" in ingest.proc.log_tail(), "the problem is logged"

    rules.write_text(RULES)
    wait_for(
        "the fixed file applied", lambda: metric(ingest.url, "radflow_ingest_rules_valid") == 1
    )
    after, path = instance(tmp_path)
    store_from(ingest, path, "ER_CT1")
    assert uids(stack, Topic.INSTANCE_RECEIVED_STAT) == [after]


def test_a_stat_instance_passes_a_routine_backlog_in_transcode_and_router(
    stack: Stack, start_ingest, start_transcode, start_router, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    ingest = start_ingest(rules_file=str(rules))
    # The backlog waits in dicom.instance.received before transcode runs, spread over
    # studies so that every partition has its share, as a busy site's would.
    backlog: list[Path] = []
    for _ in range(10):
        study = generate_uid()
        backlog += [instance(tmp_path, study)[1] for _ in range(15)]
    for start in range(0, len(backlog), 75):
        done = storescu(ingest.dimse_port, *backlog[start : start + 75], calling_ae="CT2")
        assert done.returncode == 0, done.stderr
    stat_uid, stat_path = instance(tmp_path)
    store_from(ingest, stat_path, "ER_CT1")
    assert len(stack.events(Topic.INSTANCE_RECEIVED)) == len(backlog)

    later = {"wait_ready": False, "wait_port": False}
    for service in (start_transcode(**later), start_router(rules_file=str(rules), **later)):
        service.wait_ready()
    wait_for(
        "the backlog and the STAT instance routed",
        lambda: stack.routed(routine=len(backlog), stat=1),
        timeout_s=180,
    )
    assert uids(stack, Topic.INSTANCE_NORMALIZED_STAT) == [stat_uid]
    (stat,) = [e["data"] for e in stack.events(Topic.FORWARD_REQUESTED_STAT)]
    assert stat["sop_instance_uid"] == stat_uid
    routed_at = datetime.fromisoformat(stat["routed_at"])
    ahead = [
        e
        for e in stack.events(Topic.FORWARD_REQUESTED)
        if datetime.fromisoformat(e["data"]["routed_at"]) < routed_at
    ]
    # Without its own lane it waits for its partition's backlog: a third of it or more.
    assert len(ahead) < len(backlog) // 5, f"{len(ahead)} routine instances routed first"


def test_each_lane_keeps_its_waiting_studies_in_its_own_changelog_across_a_restart(
    stack: Stack, start_ingest, start_transcode, start_router, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        RULES.replace(
            "route: [pacs]",
            "route: [pacs]\n    wait_for_study_complete: {quiet_seconds: 10, level: study}",
        )
    )
    later = {"wait_ready": False, "wait_port": False}
    ingest = start_ingest(rules_file=str(rules), **later)
    started = [ingest, start_transcode(**later)]
    router = start_router(rules_file=str(rules), release_interval_s="0.2", **later)
    for service in (*started, router):
        service.wait_ready()
    study = generate_uid()
    stat = [instance(tmp_path, study) for _ in range(3)]
    routine = [instance(tmp_path, study) for _ in range(2)]
    for _, path in stat:
        store_from(ingest, path, "ER_CT1")
    for _, path in routine:
        store_from(ingest, path, "CT2")

    def pending(r: IngestProcess, lane: str) -> float | None:
        return metric(r.url, "radflow_router_pending_instances", lane=lane)

    wait_for(
        "3 STAT and 2 routine pending",
        lambda: pending(router, "stat") == 3 and pending(router, "routine") == 2,
        timeout_s=60,
    )
    assert router.proc.stop() == 0
    restarted = start_router(rules_file=str(rules), release_interval_s="0.2")
    wait_for(
        "both lanes restored",
        lambda: pending(restarted, "stat") == 3 and pending(restarted, "routine") == 2,
        timeout_s=60,
    )
    wait_for("both groups released", lambda: stack.routed(routine=2, stat=3), timeout_s=60)
    assert sorted(uids(stack, Topic.FORWARD_REQUESTED_STAT)) == sorted(u for u, _ in stat)
    assert sorted(uids(stack, Topic.FORWARD_REQUESTED)) == sorted(u for u, _ in routine)
    assert {e["data"]["waited_for"] for e in stack.events(Topic.FORWARD_REQUESTED_STAT)} == {
        "study"
    }
