"""``radflow dlq`` against the real pipeline, run as the operator runs it (a
subprocess): a destination that refuses, fixed by a rules change, gets each instance
exactly once from ``radflow dlq replay``, and a second replay sends nothing."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest

from forwarder.test_forwarder_pipeline import completed, failed, send, series
from radflow_core.topics import Topic
from radflow_devstack.kit.rules_file import write_rules
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess
from radflow_devstack.stow_counter import StowCounter
from support.cli import json_lines, radflow
from support.metrics import metric
from support.orthanc import OrthancView
from support.stack import Stack

pytestmark = pytest.mark.pipeline


def test_a_refusing_destination_fixed_by_a_rules_change_gets_each_instance_once_by_replay(
    stack: Stack,
    start_ingest: Callable[..., Any],
    start_transcode: Callable[..., Any],
    start_router: Callable[..., Any],
    start_forwarder: Callable[..., Any],
    start_orthanc_server: Callable[..., ManagedProcess],
    stow_counter: Callable[[ManagedProcess], StowCounter],
    tmp_path: Path,
) -> None:
    server = start_orthanc_server()
    orthanc, counter = OrthancView(server), stow_counter(server)
    rules = write_rules(
        tmp_path / "rules.yaml", {"pacs": f"url: {counter.url}/no-such-dicomweb-root"}, ["pacs"]
    )
    ingest = start_ingest()
    start_transcode()
    start_router(rules_file=str(rules))
    forwarder = start_forwarder(rules_file=str(rules), reload_interval_s="0.5")
    files = series(tmp_path, 6)
    uids = sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
    send(ingest, files)
    wait_for("6 dead letters", lambda: len(failed(stack)) == 6, timeout_s=180)
    assert completed(stack) == [] and orthanc.count() == 0

    listed = json_lines(radflow(stack, "dlq", "list", "--json", "--destination", "pacs"))
    assert sorted(x["instance"] for x in listed) == uids
    assert {(x["topic"], x["reason"]) for x in listed} == {("dicom.forward.failed", "rejected")}
    assert {x["replay_to"] for x in listed} == {stack.topic(Topic.FORWARD_REQUESTED)}
    assert json_lines(radflow(stack, "dlq", "list", "--json", "--reason", "retries_*")) == []
    table = radflow(stack, "dlq", "list")
    assert table.returncode == 0 and "6 dead letters" in table.stdout
    shown = radflow(stack, "dlq", "show", listed[0]["id"])
    assert shown.returncode == 0 and listed[0]["instance"] in shown.stdout
    assert '"type": "dicom.forward.requested"' in shown.stdout  # the original request

    # Replayed before the fix, each request fails again: a second letter for each.
    early = radflow(stack, "dlq", "replay")
    assert early.returncode == 0 and "replayed 6, skipped 0" in early.stdout, early.stderr
    wait_for("6 more dead letters", lambda: len(failed(stack)) == 12, timeout_s=120)
    assert counter.deliveries() == {}

    generation = metric(forwarder.url, "radflow_forwarder_rules_generation")
    assert generation is not None
    write_rules(rules, {"pacs": f"url: {counter.url}/dicom-web"}, ["pacs"])
    wait_for(
        "the forwarder to apply the fixed rules",
        lambda: (metric(forwarder.url, "radflow_forwarder_rules_generation") or 0) > generation,
        timeout_s=60,
    )

    dry = json_lines(radflow(stack, "dlq", "replay", "--dry-run", "--json"))
    assert sorted(x["outcome"] for x in dry) == ["replay"] * 6 + ["skip"] * 6
    assert len(stack.events(Topic.FORWARD_REQUESTED)) == 12  # a dry run publishes nothing

    # Each request once, from its newest letter; the older are the same request.
    first = radflow(stack, "dlq", "replay", "--destination", "pacs")
    assert first.returncode == 0, first.stderr
    assert "replayed 6, skipped 6, not replayable 0" in first.stdout
    assert first.stdout.count("the same request is replayed by") == 6
    wait_for("6 deliveries", lambda: len(completed(stack)) == 6, timeout_s=120)
    assert sorted(counter.deliveries()) == uids
    assert set(counter.deliveries().values()) == {1}
    assert orthanc.count() == 6
    sent = sum(counter.attempts().values())

    second = radflow(stack, "dlq", "replay", "--destination", "pacs")
    assert second.returncode == 0, second.stderr
    assert "replayed 0, skipped 12, not replayable 0" in second.stdout
    assert second.stdout.count("already delivered") == 12
    assert len(stack.events(Topic.FORWARD_REQUESTED)) == 18  # routed, replayed twice

    # Past the CLI's check, the forwarder's markers still keep a replay from sending.
    forced = radflow(stack, "dlq", "replay", "--ignore-completed", "--json")
    assert sorted(x["outcome"] for x in json_lines(forced)) == ["replay"] * 6 + ["skip"] * 6
    wait_for(
        "6 replays recognised as delivered",
        lambda: sum(d["already_delivered"] for d in completed(stack)) == 6,
        timeout_s=120,
    )
    assert sum(counter.attempts().values()) == sent
    assert set(counter.deliveries().values()) == {1}
    assert orthanc.count() == 6
    assert len(failed(stack)) == 12


HOLD_MR = """rules:
  - name: ct
    when: {modality: CT}
    route: [pacs]
default: {hold: no rule for this modality}
"""
ROUTE_MR = """rules:
  - name: ct-and-mr
    when: {modality: {in: [CT, MR]}}
    route: [pacs]
default: {hold: no rule for this modality}
"""


def test_held_instances_are_routed_by_replay_once_a_rule_routes_them(
    stack: Stack,
    start_ingest: Callable[..., Any],
    start_transcode: Callable[..., Any],
    start_router: Callable[..., Any],
    start_forwarder: Callable[..., Any],
    start_orthanc_server: Callable[..., ManagedProcess],
    stow_counter: Callable[[ManagedProcess], StowCounter],
    tmp_path: Path,
) -> None:
    server = start_orthanc_server()
    counter = stow_counter(server)
    pacs = {"pacs": f"url: {counter.url}/dicom-web"}
    rules = write_rules(tmp_path / "rules.yaml", pacs, rules=HOLD_MR)
    ingest = start_ingest()
    start_transcode()
    router = start_router(rules_file=str(rules), reload_interval_s="0.5")
    start_forwarder(rules_file=str(rules))
    files = series(tmp_path, 4, modality="MR")
    uids = sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
    send(ingest, files)
    wait_for("4 held", lambda: len(stack.events(Topic.INSTANCE_HELD)) == 4, timeout_s=180)

    held = json_lines(radflow(stack, "dlq", "list", "--json", "--topic", "dicom.instance.held"))
    assert sorted(x["instance"] for x in held) == uids
    assert {x["reason"] for x in held} == {"no rule for this modality"}
    assert (
        json_lines(radflow(stack, "dlq", "list", "--json", "--topic", "dicom.forward.failed")) == []
    )

    generation = metric(router.url, "radflow_router_rules_generation")
    assert generation is not None
    write_rules(rules, pacs, rules=ROUTE_MR)
    wait_for(
        "the router to apply the rule for MR",
        lambda: (metric(router.url, "radflow_router_rules_generation") or 0) > generation,
        timeout_s=60,
    )
    replay = json_lines(radflow(stack, "dlq", "replay", "--json", "--topic", "dicom.instance.held"))
    assert [x["outcome"] for x in replay] == ["replay"] * 4
    assert {x["topic"] for x in replay} == {stack.topic(Topic.INSTANCE_NORMALIZED)}
    wait_for("4 deliveries", lambda: len(completed(stack)) == 4, timeout_s=120)
    assert sorted(counter.deliveries()) == uids
    assert len(stack.events(Topic.INSTANCE_HELD)) == 4  # the new rules held none again

    # Held letters have no completion to check: a second replay routes them again, and
    # the requests' idempotency keys keep the forwarder from sending them twice.
    again = radflow(stack, "dlq", "replay", "--topic", "dicom.instance.held")
    assert again.returncode == 0 and "replayed 4" in again.stdout
    wait_for(
        "4 replays recognised as delivered",
        lambda: sum(d["already_delivered"] for d in completed(stack)) == 4,
        timeout_s=120,
    )
    assert set(counter.deliveries().values()) == {1}
