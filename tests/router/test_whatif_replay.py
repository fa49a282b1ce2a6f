"""``python -m router replay``: a rule change tried on what the real pipeline routed
(ingest → transcode → router on the real broker and S3), run as an operator runs it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from radflow_core.events import (
    DecodeStatus,
    ForwardRequested,
    InstanceNormalized,
    encode,
    wrap,
)
from radflow_core.kafka import EventProducer
from radflow_core.topics import Topic
from radflow_devstack.kit.rules_file import write_rules
from radflow_devstack.kit.waiting import wait_for
from support import forward
from support.dicom import PHI_ID, PHI_NAME, make_instance, pynetdicom_store
from support.metrics import metric
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline

DESTINATIONS = {
    "pacs": "url: http://127.0.0.1:1/dicom-web",
    "second": "url: http://127.0.0.1:2/dicom-web",
}
STAT = """
stat:
  calling_aes: [ER_CT1]
"""
OLD = (
    STAT
    + """
rules:
  - name: us-waits
    when: {modality: US}
    route: [pacs]
    wait_for_study_complete: {quiet_seconds: 3600, level: study}
  - name: ct-mr
    when: {modality: [CT, MR]}
    route: [pacs]
default: {hold: unrouted}
"""
)
NEW = (
    STAT
    + """
rules:
  - name: us
    when: {modality: US}
    route: [pacs]
  - name: ct-also-second
    when: {modality: CT}
    route: [pacs, second]
  - name: brain-mr
    when:
      all:
        - modality: MR
        - study_description: {regex: BRAIN}
    route: [pacs]
default: {hold: unrouted}
"""
)


def send(
    ingest: IngestProcess,
    tmp_path: Path,
    study: str,
    modality: str,
    calling_ae: str = "PYSCU",
    **extra: Any,
) -> str:
    uid = generate_uid()
    path = make_instance(
        tmp_path / f"{uid}.dcm",
        sop_instance_uid=uid,
        study_instance_uid=study,
        modality=modality,
        extra=extra or None,
    )
    assert pynetdicom_store(ingest.dimse_port, path, calling_ae=calling_ae).status == 0
    return uid


def replay(
    stack: Stack, rules: Path, since: datetime, *more: str
) -> subprocess.CompletedProcess[str]:
    command = ["replay", "--rules", str(rules), "--from", since.isoformat(), *more]
    return subprocess.run(
        [sys.executable, "-m", "router", *command],
        env={**os.environ, **stack.env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_what_if_of_a_rule_change_lists_exactly_the_instances_whose_destinations_change(
    stack: Stack, start_ingest, start_transcode, start_router, tmp_path: Path
) -> None:
    old = write_rules(tmp_path / "old.yaml", DESTINATIONS, rules=OLD)
    new = write_rules(tmp_path / "new.yaml", DESTINATIONS, rules=NEW)
    ingest: IngestProcess = start_ingest(rules_file=str(old), wait_ready=False, wait_port=False)
    transcode = start_transcode(wait_ready=False, wait_port=False)
    router = start_router(rules_file=str(old), wait_ready=False, wait_port=False)
    for service in (ingest, transcode, router):
        service.wait_ready()
    started = datetime.now(UTC)
    before = send(ingest, tmp_path, generate_uid(), "CT")  # outside the window below
    wait_for("the first request", lambda: len(stack.events(Topic.FORWARD_REQUESTED)) == 1)
    time.sleep(0.2)
    window = datetime.now(UTC)

    study, other = generate_uid(), generate_uid()
    ct = [send(ingest, tmp_path, study, "CT") for _ in range(2)]
    brain = send(ingest, tmp_path, study, "MR", StudyDescription="BRAIN PERFUSION")
    waiting = send(ingest, tmp_path, study, "US")
    knee = send(ingest, tmp_path, other, "MR", StudyDescription="KNEE")
    held = send(ingest, tmp_path, other, "OT")
    stat = send(ingest, tmp_path, other, "CT", calling_ae="ER_CT1")  # the STAT lane's topics
    wait_for(
        "4 more requests, a STAT one, a hold and a study waiting",
        lambda: (
            stack.routed(routine=5, stat=1)
            and len(stack.events(Topic.INSTANCE_HELD)) == 1
            and metric(router.url, "radflow_router_pending_instances", lane="routine") == 1
        ),
        timeout_s=120,
    )

    done = replay(stack, new, window, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    changes = {c["sop_instance_uid"]: (c["added"], c["removed"]) for c in report["changes"]}
    assert changes == {
        ct[0]: (["second"], []),
        ct[1]: (["second"], []),
        stat: (["second"], []),
        knee: ([], ["pacs"]),
    }
    (stat_change,) = [c for c in report["changes"] if c["sop_instance_uid"] == stat]
    assert stat_change["after"]["destinations"]["second"]["lane"] == "stat"
    assert (report["instances"], report["compared"], report["undecided"]) == (7, 7, [])
    assert before not in changes and report["unevaluated"] == []
    dests = report["destinations"]
    assert (dests["pacs"]["requested"], dests["pacs"]["would"], dests["pacs"]["removed"]) == (
        6,
        5,
        1,
    )
    assert (dests["second"]["requested"], dests["second"]["would"]) == (0, 3)
    assert (dests["(held)"]["requested"], dests["(held)"]["would"]) == (1, 2)
    by_rule = {(r["destination"], r["rule"]): (r["requested"], r["would"]) for r in report["rules"]}
    assert by_rule[("pacs", "ct-mr")] == (5, 0)
    assert by_rule[("pacs", "us-waits")] == (1, 0)  # still waiting: read from the changelog
    assert by_rule[("pacs", "us")] == (0, 1)
    assert by_rule[("pacs", "brain-mr")] == (0, 1)  # StudyDescription: read from the header
    assert by_rule[("second", "ct-also-second")] == (0, 3)
    assert by_rule[("(held)", "unrouted")] == (1, 2)
    assert brain not in changes and waiting not in changes and held not in changes

    # The rules in force change nothing, over the whole history.
    same = replay(stack, old, started, "--json")
    assert same.returncode == 0, same.stderr
    unchanged = json.loads(same.stdout)
    assert (unchanged["compared"], unchanged["changes"]) == (8, [])

    readable = replay(stack, new, window)
    assert readable.returncode == 0, readable.stderr
    assert "4 instance(s) change destination:" in readable.stdout
    listed = readable.stdout.split("change destination:")[1]
    assert all(uid in listed for uid in (*ct, stat, knee))
    assert not any(uid in listed for uid in (before, brain, waiting, held))
    assert PHI_ID not in readable.stdout and PHI_NAME not in readable.stdout
    assert stack.routed(routine=5, stat=1), "the replay sent nothing"


NIGHT_RULES = """
rules:
  - name: acme-at-night
    when:
      all:
        - Manufacturer: ACME
        - time: {between: "18:00-07:00"}
    route: [second]
    continue: true
  - name: everything
    route: [pacs]
default: {hold: unrouted}
"""


def normalized_v1(request: ForwardRequested) -> bytes:
    """The v1 normalized event (no routing attributes) the request was made from."""
    event = InstanceNormalized(
        **request.identity(),
        original=request.blob,
        original_transfer_syntax_uid=request.transfer_syntax_uid,
        canonical=request.blob,
        canonical_transfer_syntax_uid=request.transfer_syntax_uid,
        decode_status=DecodeStatus.ALREADY_CANONICAL,
        normalized_at=request.received_at,
    )
    envelope = json.loads(encode(wrap(event, "transcode")))
    envelope["dataschema"] = "radflow:dicom.instance.normalized:v1"
    del envelope["data"]["routing"]
    return json.dumps(envelope).encode()


def test_a_v1_event_is_judged_on_its_stored_header_at_the_hour_the_router_decided(
    stack: Stack, tmp_path: Path
) -> None:
    """Manufacturer is not in a v1 event: it is read from the blob store. The window
    rule sees each request's routed_at, not the time of the replay."""
    rules = write_rules(tmp_path / "night.yaml", DESTINATIONS, rules=NIGHT_RULES, timezone="UTC")
    files = {
        name: make_instance(tmp_path / f"{name}.dcm", extra={"Manufacturer": maker})
        for name, maker in (("acme-night", "ACME"), ("acme-day", "ACME"), ("other", "OTHER"))
    }
    requests = dict(zip(files, forward.stored(stack, list(files.values()), "pacs"), strict=True))
    yesterday = datetime.now(UTC).replace(microsecond=0) - timedelta(days=1)
    hours = {"acme-night": 22, "acme-day": 10, "other": 23}
    decided = {
        name: r.model_copy(update={"routed_at": yesterday.replace(hour=hours[name], minute=0)})
        for name, r in requests.items()
    }
    since = datetime.now(UTC)

    async def publish() -> None:
        async with EventProducer(stack.kafka, "test") as producer:
            for request in decided.values():
                topic = stack.topic(Topic.INSTANCE_NORMALIZED)
                await producer.send(topic, request.key, normalized_v1(request))
                await producer.send(
                    stack.topic(Topic.FORWARD_REQUESTED),
                    request.key,
                    encode(wrap(request, "router")),
                )

    asyncio.run(publish())
    done = replay(stack, rules, since, "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["compared"], report["unevaluated"]) == (3, [])
    (change,) = report["changes"]
    assert change["sop_instance_uid"] == decided["acme-night"].sop_instance_uid
    assert (change["added"], change["removed"]) == (["second"], [])
    assert datetime.fromisoformat(change["at"]) == decided["acme-night"].routed_at
