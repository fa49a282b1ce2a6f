"""Deliveries counted against each destination's latency objectives, by a real
forwarder delivering to a real Orthanc: forward requests are published straight to
their topic, as the router would, with the time ingest received them set in the past
where a test needs a delivery that misses its objective."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from radflow_core.events import ForwardRequested, Lane
from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess
from support.dicom import make_instance
from support.forward import publish, stored
from support.metrics import metric
from support.orthanc import OrthancView
from support.stack import Stack

pytestmark = pytest.mark.pipeline

SLO = "radflow_forwarder_slo_deliveries_total"


def write_rules(path: Path, destinations: dict[str, str]) -> Path:
    """Replace the rule file whole; every destination is routed to."""
    lines = ["version: 1", "destinations:"]
    for name, body in destinations.items():
        lines += [f"  {name}:", *(f"    {line}" for line in body.splitlines())]
    lines += ["rules:", "  - name: everything", f"    route: [{', '.join(destinations)}]"]
    lines += ["default: {hold: unrouted}"]
    staged = path.with_suffix(".next")
    staged.write_text("\n".join(lines) + "\n")
    return staged.replace(path)


def requests(
    stack: Stack, tmp_path: Path, destination: str, ages_s: list[float], lane: Lane
) -> list[ForwardRequested]:
    """One stored instance per age: a request received ``age`` seconds ago."""
    study, series = generate_uid(), generate_uid()
    folder = tmp_path / f"{destination}-{lane.value}-{study[-8:]}"
    folder.mkdir()
    files = [
        make_instance(
            folder / f"{i}.dcm",
            study_instance_uid=study,
            series_instance_uid=series,
            rows=32,
            columns=32,
        )
        for i in range(len(ages_s))
    ]
    now = datetime.now(UTC)
    return [
        request.model_copy(update={"lane": lane, "received_at": now - timedelta(seconds=age)})
        for request, age in zip(stored(stack, files, destination), ages_s, strict=True)
    ]


def outcomes(url: str, destination: str, lane: str) -> dict[str, float | None]:
    return {
        outcome: metric(url, SLO, destination=destination, lane=lane, outcome=outcome)
        for outcome in ("within", "over", "failed")
    }


def test_each_delivery_is_counted_within_or_over_its_lane_s_objective_and_failures_count(
    stack: Stack,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    rules = write_rules(
        tmp_path / "rules.yaml",
        {
            "pacs": f"url: '{orthanc.dicomweb}'\n"
            "slo:\n"
            "  routine: {within_s: 600, percent: 99}\n"
            "  stat: {within_s: 30, percent: 99.9}",
            "refusing": f"url: '{orthanc.url}/no-such-dicomweb-root'\n"
            "slo: {routine: {within_s: 600, percent: 95}}",
            "plain": f"url: '{orthanc.dicomweb}'",
        },
    )
    forwarder = start_forwarder(rules_file=str(rules), reload_interval_s="0.5")
    url = forwarder.url
    # Before any delivery: the objectives are exported and every outcome is a 0.
    assert (
        metric(url, "radflow_forwarder_slo_target_seconds", destination="pacs", lane="stat") == 30
    )
    assert metric(
        url, "radflow_forwarder_slo_objective_ratio", destination="pacs", lane="routine"
    ) == pytest.approx(0.99)
    assert outcomes(url, "pacs", "routine") == {"within": 0, "over": 0, "failed": 0}
    assert (
        metric(url, "radflow_forwarder_slo_target_seconds", destination="plain", lane="routine")
        is None
    )

    publish(
        stack,
        [
            *requests(stack, tmp_path, "pacs", [0, 0, 0, 3600, 7200], Lane.ROUTINE),
            *requests(stack, tmp_path, "pacs", [0, 120, 300], Lane.STAT),
            *requests(stack, tmp_path, "refusing", [0, 0], Lane.ROUTINE),
            *requests(stack, tmp_path, "plain", [0, 9999], Lane.ROUTINE),
        ],
    )
    wait_for(
        "10 delivered and 2 refused",
        lambda: (
            len(stack.events(Topic.FORWARD_COMPLETED)) == 10
            and len(stack.events(Topic.FORWARD_FAILED)) == 2
        ),
        timeout_s=120,
    )
    assert orthanc.count() == 10
    assert outcomes(url, "pacs", "routine") == {"within": 3, "over": 2, "failed": 0}
    assert outcomes(url, "pacs", "stat") == {"within": 1, "over": 2, "failed": 0}
    assert outcomes(url, "refusing", "routine") == {"within": 0, "over": 0, "failed": 2}
    # No objective, nothing counted against one; its latency histogram still is.
    assert outcomes(url, "plain", "routine") == {"within": None, "over": None, "failed": None}
    assert (
        metric(
            url,
            "radflow_forwarder_delivery_latency_seconds_count",
            destination="plain",
            lane="routine",
        )
        == 2
    )

    # A changed objective is applied without restarting the destination; one removed
    # is no longer exported, so no burn rate is computed against it.
    write_rules(
        rules,
        {
            "pacs": f"url: '{orthanc.dicomweb}'\nslo: {{routine: {{within_s: 7000, percent: 90}}}}",
            "refusing": f"url: '{orthanc.url}/no-such-dicomweb-root'",
            "plain": f"url: '{orthanc.dicomweb}'",
        },
    )
    wait_for(
        "the new routine threshold exported",
        lambda: (
            metric(url, "radflow_forwarder_slo_target_seconds", destination="pacs", lane="routine")
            == 7000
        ),
        timeout_s=30,
    )
    log = forwarder.log()
    assert log.count('"destination objectives changed"') == 2, "pacs and refusing"
    assert '"destination changed"' not in log
    assert (
        metric(url, "radflow_forwarder_slo_target_seconds", destination="pacs", lane="stat") is None
    )
    assert (
        metric(url, "radflow_forwarder_slo_objective_ratio", destination="refusing", lane="routine")
        is None
    )
    publish(stack, requests(stack, tmp_path, "pacs", [3600], Lane.ROUTINE))
    wait_for("11 delivered", lambda: orthanc.count() == 11, timeout_s=60)
    wait_for(
        "the 1 h old instance counted within the new 7000 s threshold",
        lambda: outcomes(url, "pacs", "routine")["within"] == 4,
        timeout_s=30,
    )
    assert outcomes(url, "pacs", "routine") == {"within": 4, "over": 2, "failed": 0}
