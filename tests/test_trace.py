"""``radflow trace``: the story of an instance and of a study, told by the topics of the
real pipeline (ingest → transcode → router → stow-forwarder → Orthanc), run as the
operator's console script."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from radflow_core.topics import Topic
from radflow_devstack.kit.rules_file import write_rules
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess
from support.cli import radflow
from support.dicom import PHI_ID, PHI_NAME, make_instance, pynetdicom_store
from support.metrics import metric
from support.orthanc import OrthancView
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

RULES = """
rules:
  - name: ct-to-orthanc
    when: {modality: CT}
    route: [orthanc]
  - name: us-waits
    when: {modality: US}
    route: [orthanc]
    wait_for_study_complete: {quiet_seconds: 3600, level: study}
default: {hold: unrouted}
"""


def trace(stack: Stack, uid: str, *more: str) -> subprocess.CompletedProcess[str]:
    return radflow(stack, "trace", uid, *more)


def send(ingest: IngestProcess, tmp_path: Path, study: str, modality: str) -> str:
    uid = generate_uid()
    path = make_instance(
        tmp_path / f"{uid}.dcm", sop_instance_uid=uid, study_instance_uid=study, modality=modality
    )
    assert pynetdicom_store(ingest.dimse_port, path).status == 0
    return uid


def test_trace_tells_the_same_story_as_the_pipeline_and_the_destination(
    stack: Stack,
    start_ingest,
    start_transcode,
    start_router,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    rules = write_rules(
        tmp_path / "rules.yaml", {"orthanc": f"url: {orthanc.dicomweb}"}, rules=RULES
    )
    later = {"wait_ready": False, "wait_port": False}
    ingest: IngestProcess = start_ingest(**later)
    router = start_router(rules_file=str(rules), **later)
    for service in (
        ingest,
        start_transcode(**later),
        router,
        start_forwarder(rules_file=str(rules), **later),
    ):
        service.wait_ready()
    study = generate_uid()
    ct = [send(ingest, tmp_path, study, "CT") for _ in range(2)]
    held = send(ingest, tmp_path, study, "MR")
    waiting = send(ingest, tmp_path, study, "US")
    wait_for(
        "2 deliveries, a hold and a study waiting",
        lambda: (
            len(stack.events(Topic.FORWARD_COMPLETED)) == 2
            and len(stack.events(Topic.INSTANCE_HELD)) == 1
            and metric(router.url, "radflow_router_pending_instances", lane="routine") == 1
        ),
        timeout_s=180,
    )

    done = trace(stack, ct[0], "--json")
    assert done.returncode == 0, done.stderr
    story = json.loads(done.stdout)
    assert story["kind"] == "instance"
    events = story["events"]
    flow = [e["type"] for e in events]
    assert flow == [
        "dicom.instance.received",
        "dicom.instance.normalized",
        "dicom.forward.requested",
        "dicom.forward.completed",
    ]
    assert all(e["sop_instance_uid"] == ct[0] for e in events)
    # The audit trail carries Patient IDs: read only when asked (and allowed).
    audited = trace(stack, ct[0], "--json", "--audit")
    assert audited.returncode == 0, audited.stderr
    assert "radflow.audit" in {e["type"] for e in json.loads(audited.stdout)["events"]}
    assert [e["since_first_s"] for e in events] == sorted(e["since_first_s"] for e in events)
    assert events[0]["hop_s"] is None and all(e["hop_s"] >= 0 for e in events[1:])
    requested = {
        e["data"]["destination"]
        for e in stack.events(Topic.FORWARD_REQUESTED)
        if e["data"]["sop_instance_uid"] == ct[0]
    }
    traced = {e["destination"] for e in events if e["type"] == "dicom.forward.requested"}
    delivered = {e["destination"] for e in events if e["type"] == "dicom.forward.completed"}
    assert traced == delivered == requested == {"orthanc"}
    assert ct[0] in orthanc.sop_instance_uids()
    assert story["destinations"]["orthanc"] == {"completed": 1, "requested": 1}

    whole = trace(stack, study, "--json")
    assert whole.returncode == 0, whole.stderr
    told = json.loads(whole.stdout)
    assert told["kind"] == "study"
    assert told["destinations"]["orthanc"] == {"completed": 2, "requested": 2}
    assert told["destinations"]["*"] == {"held": 1, "normalized": 4, "received": 4}
    (hold,) = [e for e in told["events"] if e["type"] == "dicom.instance.held"]
    assert hold["sop_instance_uid"] == held and "reason unrouted" in hold["detail"]
    (pending,) = [e for e in told["events"] if e["type"] == "radflow.router.pending"]
    assert pending["sop_instance_uid"] == waiting and pending["destination"] == "orthanc"
    assert sorted(orthanc.sop_instance_uids()) == sorted(ct)

    readable = trace(stack, study)
    assert readable.returncode == 0, readable.stderr
    lines = readable.stdout.splitlines()
    assert lines[0] == f"study {study}: {len(told['events'])} events, 4 instance(s)"
    first = next(i for i, line in enumerate(lines) if ct[1] in line and "received" in line)
    last = next(i for i, line in enumerate(lines) if ct[1] in line and "completed" in line)
    assert first < last
    assert "orthanc: completed 2, requested 2" in readable.stdout
    assert PHI_ID not in readable.stdout + whole.stdout
    assert PHI_NAME not in readable.stdout + whole.stdout

    nothing = trace(stack, generate_uid())
    assert nothing.returncode == 1 and "no retained event names" in nothing.stderr
