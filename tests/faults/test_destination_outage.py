"""A destination down for longer than the consumers' poll interval (minutes in CI
terms, tens of minutes in ``make faults``): everything reaches it exactly once when it
returns, and the other destination keeps receiving throughout."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from faults.harness import (
    Pipeline,
    Sent,
    assert_exactly_once,
    make_series,
    outcome,
    send,
    size,
    sop_uid,
)
from radflow_devstack.kit.waiting import wait_for
from support.metrics import metric_sum

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]


def test_a_destination_down_past_the_poll_interval_gets_everything_once_when_back(
    start_pipeline, tmp_path: Path
) -> None:
    pipeline: Pipeline = start_pipeline()
    down, up = pipeline.destinations.counters["b"], pipeline.destinations.counters["a"]
    files = make_series(tmp_path / "study", 40)
    uids = [sop_uid(f) for f in files]
    down.down("refuse")
    began = time.monotonic()
    sent = Sent()
    send(pipeline.ingest.dimse_port, files[:20], sent)
    wait_for(
        "the first half at the healthy destination",
        lambda: set(uids[:20]) <= set(up.deliveries()),
        timeout_s=size().drain_s,
        every_s=0.5,
    )
    forwarder = pipeline.started["stow_forwarder"]
    wait_for(
        "the forwarder to show it waits on destination b",
        lambda: metric_sum(
            forwarder.url,
            "radflow_consumer_waiting_since_timestamp_seconds",
            reason="destination_unavailable",
        ),
        timeout_s=60,
    )
    while time.monotonic() - began < size().outage_s:
        assert forwarder.proc.proc is not None and forwarder.proc.proc.poll() is None, (
            "the forwarder died during the outage"
        )
        time.sleep(1)
    # More arrives late in the outage, and reaches the healthy destination at once.
    send(pipeline.ingest.dimse_port, files[20:], sent)
    wait_for(
        "the second half at the healthy destination",
        lambda: set(uids) <= set(up.deliveries()),
        timeout_s=size().drain_s,
        every_s=0.5,
    )
    assert not set(uids) & set(down.deliveries()), "the down destination received something"
    outage = time.monotonic() - began
    down.up()
    drain = pipeline.wait_delivered(sent.acked, timeout_s=size().drain_s)
    time.sleep(3)  # anything sent twice would arrive now
    result = outcome(
        pipeline,
        sent,
        "destination_outage",
        "A destination down longer than the consumer poll interval, then back",
        drain,
        outage_s=round(outage, 1),
        max_poll_interval_ms=size().max_poll_interval_ms,
    )
    result.record(tmp_path)
    assert_exactly_once(result)
    assert forwarder.proc.proc is not None and forwarder.proc.proc.poll() is None
