"""The ledger against real parts: forward requests delivered by the real forwarder to
Orthanc (and to a destination that never answers), the ledger as a process, its
story told by ``radflow ledger`` run as a subprocess, and a restart that keeps it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.partitioner import DefaultPartitioner
from pydicom.uid import generate_uid

from radflow_core.events import (
    ForwardCompleted,
    ForwardRequested,
    ForwardVerified,
    VerificationMethod,
    encode,
    wrap,
)
from radflow_core.kafka import EventProducer
from radflow_core.topics import Topic
from radflow_devstack.kit.rules_file import write_rules
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess, free_port
from support.dicom import make_instance
from support.forward import stored
from support.metrics import metric
from support.orthanc import OrthancView
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

LEDGER = {"quiet_s": "2", "overdue_after_s": "3", "tick_interval_s": "0.3"}


def publish(stack: Stack, events: Sequence[tuple[Topic, Any]]) -> None:
    """Publish each event on its topic with the study as key (the default partitioner,
    as the router and the forwarder do)."""

    async def run() -> None:
        producer = EventProducer(stack.kafka, "test")
        await producer.start()
        try:
            for topic, event in events:
                await producer.send(stack.topic(topic), event.key, encode(wrap(event, "test")))
        finally:
            await producer.stop()

    asyncio.run(run())


def requests(stack: Stack, tmp_path: Path, study: str, count: int, to: str) -> list[Any]:
    folder = tmp_path / f"{study[-8:]}-{to}-{generate_uid()[-6:]}"
    folder.mkdir()
    series = generate_uid()
    files = [
        make_instance(folder / f"{i}.dcm", study_instance_uid=study, series_instance_uid=series)
        for i in range(count)
    ]
    return stored(stack, files, to)


def delivered_events(stack: Stack) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(Topic.STUDY_DELIVERED)]


def radflow(*args: str) -> subprocess.CompletedProcess[str]:
    """The operator CLI, as an operator runs it."""
    return subprocess.run(
        [sys.executable, "-m", "radflow_core.cli", "ledger", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def study_json(ledger: IngestProcess, uid: str) -> dict[str, Any]:
    result = radflow("study", uid, "--url", ledger.url, "--json")
    assert result.returncode in (0, 1), result.stderr
    return dict(json.loads(result.stdout))


def destination(answer: dict[str, Any], name: str) -> dict[str, Any]:
    (row,) = [d for d in answer["destinations"] if d["destination"] == name]
    return dict(row)


def test_the_ledger_tells_what_orthanc_holds_publishes_study_delivered_and_survives_restart(
    stack: Stack,
    start_forwarder: Callable[..., IngestProcess],
    start_ledger: Callable[..., IngestProcess],
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    nowhere = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens: retried
    rules = write_rules(
        tmp_path / "rules.yaml",
        {"orthanc": f"url: {orthanc.dicomweb}", "nowhere": f"url: {nowhere}"},
        ["orthanc"],
    )
    ledger = start_ledger(**LEDGER)
    start_forwarder(rules_file=str(rules))
    study_a, study_b = generate_uid(), generate_uid()
    to_orthanc = requests(stack, tmp_path, study_a, 3, "orthanc")
    lost = requests(stack, tmp_path, study_b, 2, "nowhere")
    publish(stack, [(r.lane.topic(Topic.FORWARD_REQUESTED), r) for r in [*to_orthanc, *lost]])

    # Study A: delivered to Orthanc, then announced once.
    wait_for("dicom.study.delivered of study A", lambda: delivered_events(stack), timeout_s=120)
    (event,) = delivered_events(stack)
    assert event["study_instance_uid"] == study_a
    assert event["revision"] == 1 and event["instances"] == 3
    assert event["destinations"] == [{"destination": "orthanc", "instances": 3, "verified": False}]
    answer = study_json(ledger, study_a)
    row = destination(answer, "orthanc")
    assert (row["routed"], row["delivered"], row["pending"], row["failed"]) == (3, 3, 0, 0)
    in_orthanc = {
        uid
        for uid in orthanc.sop_instance_uids()
        if uid in {r.sop_instance_uid for r in to_orthanc}
    }
    assert {i["sop_instance_uid"] for i in row["instances"]} == in_orthanc
    assert len(in_orthanc) == 3
    assert answer["delivered"]["revision"] == 1
    human = radflow("study", study_a, "--url", ledger.url)
    assert human.returncode == 0, human.stderr
    assert "orthanc" in human.stdout and to_orthanc[0].sop_instance_uid in human.stdout

    # Study B: never arrives; overdue once routed longer ago than the threshold.
    wait_for(
        "2 overdue at nowhere",
        lambda: metric(ledger.url, "radflow_ledger_overdue_instances", destination="nowhere") == 2,
        timeout_s=60,
    )
    overdue = radflow("overdue", "--destination", "nowhere", "--url", ledger.url, "--json")
    assert overdue.returncode == 1, "overdue instances: exit 1, for scripts"
    listed = json.loads(overdue.stdout)
    assert listed["destinations"] == {"nowhere": 2}
    assert {i["sop_instance_uid"] for i in listed["instances"]} == {
        r.sop_instance_uid for r in lost
    }
    none_here = radflow("overdue", "--destination", "orthanc", "--url", ledger.url)
    assert none_here.returncode == 0 and none_here.stdout.startswith("0 instances overdue")
    assert destination(study_json(ledger, study_b), "nowhere")["pending"] == 2
    assert not any(e["study_instance_uid"] == study_b for e in delivered_events(stack))

    # A restart: the state comes back from radflow.ledger (the input was committed),
    # and study A is not announced a second time.
    ledger.proc.terminate()
    assert ledger.proc.stop() == 0
    again = start_ledger(**LEDGER)
    wait_for(
        "study A restored",
        lambda: _status(again, study_a) == 200,
        timeout_s=60,
    )
    restored = study_json(again, study_a)
    assert destination(restored, "orthanc")["delivered"] == 3
    assert restored["delivered"]["revision"] == 1
    assert destination(study_json(again, study_b), "nowhere")["pending"] == 2
    wait_for(
        "overdue gauge after restart",
        lambda: metric(again.url, "radflow_ledger_overdue_instances", destination="nowhere") == 2,
        timeout_s=30,
    )
    time.sleep(3)  # longer than the quiet period: a ledger that forgot would announce again
    assert len(delivered_events(stack)) == 1

    # More instances of study A later: announced again, revision 2, with the new count.
    more = requests(stack, tmp_path, study_a, 2, "orthanc")
    publish(stack, [(Topic.FORWARD_REQUESTED, r) for r in more])
    wait_for("revision 2", lambda: len(delivered_events(stack)) == 2, timeout_s=120)
    second = delivered_events(stack)[1]
    assert second["study_instance_uid"] == study_a
    assert second["revision"] == 2 and second["instances"] == 5
    assert destination(study_json(again, study_a), "orthanc")["delivered"] == 5


def _status(ledger: IngestProcess, uid: str) -> int:
    return httpx.get(f"{ledger.url}/ledger/studies/{uid}", timeout=5).status_code


def test_where_verification_is_on_a_study_waits_for_forward_verified(
    stack: Stack,
    start_ledger: Callable[..., IngestProcess],
    tmp_path: Path,
) -> None:
    ledger = start_ledger(**LEDGER)  # no setting: the completion says a check follows
    study = generate_uid()
    (request,) = requests(stack, tmp_path, study, 1, "pacs")
    assert isinstance(request, ForwardRequested)
    now = datetime.now(UTC)
    delivery = {
        **request.identity(),
        "destination": "pacs",
        "lane": request.lane,
        "idempotency_key": request.idempotency_key,
        "original_sha256": request.original_sha256,
        "attempts": 1,
    }
    done = ForwardCompleted(
        **delivery,
        transfer_syntax_uid=request.transfer_syntax_uid,
        size=request.blob.size,
        delivered_at=now,
        latency_s=0.5,
        verification=VerificationMethod.QIDO,
    )
    publish(stack, [(Topic.FORWARD_REQUESTED, request), (Topic.FORWARD_COMPLETED, done)])
    wait_for(
        "the delivery counted",
        lambda: (
            _status(ledger, study) == 200
            and destination(study_json(ledger, study), "pacs")["delivered"] == 1
        ),
        timeout_s=60,
    )
    row = destination(study_json(ledger, study), "pacs")
    assert row["verification"] is True
    assert (row["verified"], row["reached"]) == (0, 0)
    time.sleep(3)  # past the quiet period: acknowledged is not enough here
    assert delivered_events(stack) == []
    verified = ForwardVerified(
        **delivery, method=VerificationMethod.QIDO, checks=1, delivered_at=now, verified_at=now
    )
    publish(stack, [(Topic.FORWARD_VERIFIED, verified)])
    wait_for("dicom.study.delivered", lambda: delivered_events(stack), timeout_s=60)
    (event,) = delivered_events(stack)
    assert event["destinations"] == [{"destination": "pacs", "instances": 1, "verified": True}]
    assert destination(study_json(ledger, study), "pacs")["verified"] == 1


def test_the_cli_says_when_the_ledger_cannot_be_asked() -> None:
    result = radflow("study", "1.2.3", "--url", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 2
    assert "cannot ask the ledger" in result.stderr


def test_with_two_replicas_each_study_s_whole_story_is_in_one_of_them(
    stack: Stack,
    start_ledger: Callable[..., IngestProcess],
    tmp_path: Path,
) -> None:
    """The range assignor gives partition p of every forward topic to one member: a
    study's request and its outcome, on two topics, meet in the same replica."""
    replicas = [start_ledger(**LEDGER), start_ledger(**LEDGER)]
    wait_for(
        "both replicas own partitions",
        lambda: all(_held(r) for r in replicas),
        timeout_s=90,
    )
    held = [_held(r) for r in replicas]
    assert not held[0] & held[1] and held[0] | held[1] == {0, 1, 2}
    studies = _two_per_partition()
    events: list[tuple[Topic, Any]] = []
    for study in studies:
        (request,) = requests(stack, tmp_path, study, 1, "pacs")
        events.append((Topic.FORWARD_REQUESTED, request))
        events.append((Topic.FORWARD_COMPLETED, _completed(request)))
    publish(stack, events)

    def told() -> bool:
        for study in studies:
            answers = [r for r in replicas if _status(r, study) == 200]
            if len(answers) != 1:
                return False
            row = destination(study_json(answers[0], study), "pacs")
            if (row["routed"], row["delivered"]) != (1, 1):
                return False
        return True

    wait_for("every study complete in exactly one replica", told, timeout_s=90)
    owners = {i for study in studies for i, r in enumerate(replicas) if _status(r, study) == 200}
    assert owners == {0, 1}, "studies in every partition: both replicas hold some"


def _two_per_partition(partitions: int = 3) -> list[str]:
    """Study UIDs, two whose key the producers' partitioner puts in each partition."""
    found: dict[int, list[str]] = {p: [] for p in range(partitions)}
    while any(len(uids) < 2 for uids in found.values()):
        uid = generate_uid()
        partition = DefaultPartitioner()(uid.encode("ascii"), list(range(partitions)), None)
        if len(found[partition]) < 2:
            found[partition].append(uid)
    return [uid for uids in found.values() for uid in uids]


def _held(ledger: IngestProcess) -> set[int]:
    """The partitions a replica owns (its 404 answer lists them)."""
    answer = httpx.get(f"{ledger.url}/ledger/studies/1.2.3", timeout=5)
    assert answer.status_code == 404
    return set(answer.json()["partitions"])


def _completed(request: ForwardRequested) -> ForwardCompleted:
    return ForwardCompleted(
        **request.identity(),
        destination=request.destination,
        lane=request.lane,
        idempotency_key=request.idempotency_key,
        original_sha256=request.original_sha256,
        attempts=1,
        transfer_syntax_uid=request.transfer_syntax_uid,
        size=request.blob.size,
        delivered_at=datetime.now(UTC),
        latency_s=0.5,
    )


def test_a_ledger_killed_by_sigkill_loses_nothing_and_counts_nothing_twice(
    stack: Stack,
    start_ledger: Callable[..., IngestProcess],
    tmp_path: Path,
) -> None:
    study = generate_uid()
    routed = requests(stack, tmp_path, study, 40, "pacs")
    first = start_ledger(**LEDGER)
    publish(stack, [(Topic.FORWARD_REQUESTED, r) for r in routed])
    wait_for(
        "some requests counted",
        lambda: (
            _status(first, study) == 200
            and destination(study_json(first, study), "pacs")["routed"] >= 1
        ),
        timeout_s=60,
    )
    first.proc.kill()  # whatever it read and did not commit is read again
    first.expected_exit = -9
    second = start_ledger(**LEDGER)
    publish(stack, [(Topic.FORWARD_COMPLETED, _completed(r)) for r in routed])
    wait_for("dicom.study.delivered", lambda: delivered_events(stack), timeout_s=120)
    row = destination(study_json(second, study), "pacs")
    assert (row["routed"], row["delivered"], row["pending"]) == (40, 40, 0)
    assert {i["sop_instance_uid"] for i in row["instances"]} == {r.sop_instance_uid for r in routed}
    (event,) = delivered_events(stack)
    assert event["instances"] == 40 and event["revision"] == 1
