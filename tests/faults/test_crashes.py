"""SIGKILL of each service while a stream goes through it (a crash, an OOM kill):
nothing is finished and nothing committed, yet once the service is back every
instance a sender was told is stored reaches both destinations exactly once, and
nothing is dead-lettered. The sender behaves as a modality does: what was not
acknowledged (a refused association while ingest is down, an association cut in the
middle) is sent again. report-return, killed while it returns reports to a RIS, sends
each report once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from faults.harness import (
    Pipeline,
    Sent,
    assert_exactly_once,
    make_series,
    outcome,
    send_in_background,
    size,
    sop_uid,
)
from faults.reports import ReportStream
from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.mllp_peer import MllpPeer
from support.fleet import Fleet
from support.stack import Stack

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.faults,
    # While ingest is down the sender's associations are refused, and pynetdicom drops
    # the refused socket without closing it (transport.py, connect): its ResourceWarning.
    pytest.mark.filterwarnings(
        "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
    ),
]

PACE_S = 0.05
"""Between two C-STOREs: the stream lasts several seconds, so a kill lands mid-stream."""
DOWN_S = 2.0
"""How long a killed service stays down before it is started again."""


def progress(pipeline: Pipeline, sent: Sent, service: str) -> Callable[[], int]:
    """How many instances ``service`` has passed on so far."""
    stack, first = pipeline.stack, pipeline.destinations.counters["a"]

    def uids_on(topic: Topic) -> set[str]:
        return {e["data"]["sop_instance_uid"] for e in stack.events(topic)}

    probes: dict[str, Callable[[], int]] = {
        "ingest": lambda: len(sent.acked),
        "transcode": lambda: len(uids_on(Topic.INSTANCE_NORMALIZED)),
        "router": lambda: len(uids_on(Topic.FORWARD_REQUESTED)),
        "stow_forwarder": lambda: len(first.deliveries()),
    }
    return probes[service]


@pytest.mark.parametrize(
    "service",
    [
        "ingest",
        "transcode",
        "router",
        "stow_forwarder",  # killed with a request on the wire (see below)
    ],
)
def test_a_service_killed_mid_stream_delivers_every_acknowledged_instance_once(
    start_pipeline, fleet: Fleet, tmp_path: Path, service: str
) -> None:
    pipeline: Pipeline = start_pipeline()
    count = size().instances
    files = make_series(tmp_path / "study", count, studies=4)
    uids = {sop_uid(f) for f in files}
    sent = Sent()
    began = time.monotonic()
    sender = send_in_background(
        pipeline.ingest.dimse_port,
        files,
        sent,
        retry_until=began + size().drain_s,
        pace_s=PACE_S,
    )
    passed = progress(pipeline, sent, service)
    wait_for(
        f"a third of the stream through {service}",
        lambda: passed() >= count // 3,
        timeout_s=size().drain_s,
        every_s=0.2,
    )
    if service == "stow_forwarder":
        # The worst moment: a request on the wire, which the destination goes on to store.
        wait_for(
            "a STOW-RS request on the wire",
            lambda: any(c.in_flight for c in pipeline.destinations.counters.values()),
            timeout_s=size().drain_s,
            every_s=0.005,
        )
    killed = fleet.kill(service)
    killed_at = passed()
    time.sleep(DOWN_S)
    fleet.restart(killed.proc.name)
    sender.join(timeout=size().drain_s)
    assert not sender.is_alive(), "the sender never got everything acknowledged"
    drain = pipeline.wait_delivered(sent.acked, timeout_s=size().drain_s)
    time.sleep(3)  # anything sent twice would arrive now
    result = outcome(
        pipeline,
        sent,
        f"kill_{service}",
        f"SIGKILL of {service} a third into a stream of {count} instances, restarted",
        drain,
        instances=count,
        passed_when_killed=killed_at,
        down_s=DOWN_S,
        refused=dict(sent.refused),
        total_s=round(time.monotonic() - began, 1),
    )
    result.record(tmp_path)
    assert_exactly_once(result)
    assert sent.acked == uids, f"{len(uids - sent.acked)} instances never acknowledged"


def test_report_return_killed_mid_stream_returns_each_report_once(
    stack: Stack, fleet: Fleet, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    peer = MllpPeer().start()
    try:
        stream = ReportStream(stack, peer, size().instances // 4)
        stream.start_service(fleet, pipeline_env, tmp_path)
        stream.start()
        stream.wait_a_third()
        killed = fleet.kill("report_return")
        killed_at = len(peer.received)
        time.sleep(DOWN_S)
        fleet.restart(killed.proc.name)
        result = stream.finish(
            "kill_report_return",
            f"SIGKILL of report-return a third into {stream.count} reports, restarted",
            in_flight_resends=1,
            received_when_killed=killed_at,
            down_s=DOWN_S,
        )
        result.record(tmp_path)
        assert_exactly_once(result)
        assert result.details["unexpected_messages"] == 0
    finally:
        peer.stop()
