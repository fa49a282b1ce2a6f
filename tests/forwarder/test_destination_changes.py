"""What the forwarder does when the rule file's destinations change under it, against
the real broker, S3 server and Orthanc: forward requests are published straight to
their topic, as the router would."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid

from radflow_core.events import Lane
from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess
from support.dicom import make_instance
from support.forward import publish, routed, stored
from support.metrics import metric
from support.orthanc import OrthancView
from support.stack import Stack

pytestmark = pytest.mark.pipeline


def write_rules(path: Path, destinations: dict[str, str]) -> Path:
    """Replace the rule file whole (as a ConfigMap update does); every destination is
    routed to."""
    lines = ["version: 1", "destinations:"]
    lines += [f"  {name}: {{{body}}}" for name, body in destinations.items()]
    lines += ["rules:", "  - name: everything", f"    route: [{', '.join(destinations)}]"]
    lines += ["default: {hold: unrouted}"]
    staged = path.with_suffix(".next")
    staged.write_text("\n".join(lines) + "\n")
    return staged.replace(path)


def instances(tmp_path: Path, count: int) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    return [
        make_instance(
            tmp_path / f"{i}.dcm",
            study_instance_uid=study,
            series_instance_uid=series,
            rows=32,
            columns=32,
        )
        for i in range(count)
    ]


def completed(stack: Stack) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(Topic.FORWARD_COMPLETED)]


def test_a_destination_pointed_at_another_server_under_the_same_name_gets_replays_sent(
    stack: Stack,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    first, second = OrthancView(start_orthanc_server()), OrthancView(start_orthanc_server())
    rules = write_rules(tmp_path / "rules.yaml", {"pacs": f"url: '{first.dicomweb}'"})
    forwarder = start_forwarder(rules_file=str(rules), reload_interval_s="0.5")
    requests = routed(stack, instances(tmp_path, 3), "pacs")
    wait_for("3 delivered to the first server", lambda: len(completed(stack)) == 3, timeout_s=60)
    assert first.count() == 3

    write_rules(rules, {"pacs": f"url: '{second.dicomweb}/'"})
    wait_for(
        "the destination restarted with the new URL",
        lambda: '"destination changed"' in forwarder.log(),
        timeout_s=30,
    )
    publish(stack, requests)  # the same requests again, e.g. a replay of the topic
    wait_for("3 delivered to the second server", lambda: second.count() == 3, timeout_s=60)
    wait_for("6 acknowledgements", lambda: len(completed(stack)) == 6, timeout_s=30)
    assert [d["already_delivered"] for d in completed(stack)] == [False] * 6
    assert first.count() == 3


def held(stack: Stack) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(Topic.INSTANCE_HELD)]


def test_requests_for_an_undefined_destination_are_held_and_delivered_once_it_is_added(
    stack: Stack,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    defined = {"pacs": f"url: '{orthanc.dicomweb}'", "ris": "kind: report-return, site: ris1"}
    rules = write_rules(tmp_path / "rules.yaml", defined)
    forwarder = start_forwarder(
        rules_file=str(rules), reload_interval_s="0.5", unknown_destination_grace_s="0"
    )
    files = instances(tmp_path, 4)
    routed(stack, files[:1], "pacs")
    routed(stack, files[1:2], "ris")  # report-return's: defined, not the forwarder's to report
    routine, urgent = stored(stack, files[2:], "later")
    publish(stack, [routine, urgent.model_copy(update={"lane": Lane.STAT})])
    wait_for("2 held", lambda: len(held(stack)) == 2, timeout_s=60)
    wait_for("1 delivered to pacs", lambda: len(completed(stack)) == 1, timeout_s=60)
    assert {h["sop_instance_uid"] for h in held(stack)} == {
        routine.sop_instance_uid,
        urgent.sop_instance_uid,
    }
    assert {h["reason"] for h in held(stack)} == {"unknown_destination: later"}
    assert {h["canonical"]["sha256"] for h in held(stack)} == {
        routine.blob.sha256,
        urgent.blob.sha256,
    }
    unknown = "radflow_forwarder_unknown_destination_total"
    assert metric(forwarder.url, unknown, destination="later") == 2
    assert metric(forwarder.url, unknown, destination="ris") is None

    write_rules(rules, {**defined, "later": f"url: '{orthanc.dicomweb}'"})
    wait_for("the held requests delivered", lambda: len(completed(stack)) == 3, timeout_s=60)
    assert orthanc.count() == 3
    assert {d["destination"] for d in completed(stack)} == {"pacs", "later"}
    assert len(held(stack)) == 2
