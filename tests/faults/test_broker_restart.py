"""The broker killed and started again under load, on the durable broker (Tansu keeping
its log in S3): senders are refused while it is away and send again, every service
reconnects on its own, and everything acknowledged reaches both destinations exactly
once."""

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
    send_in_background,
    size,
)
from radflow_devstack.broker import Broker
from radflow_devstack.kit.waiting import wait_for
from support.stack import Stack

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]

BROKER_AWAY_S = 8.0
"""How long the broker stays dead: as a pod restart takes, and longer than ingest waits
for the broker to acknowledge an announcement (5 s), so that senders are refused."""


# Skipped in CI while the local S3 server was moto: consumers on the durable broker
# trickled after the restart (one of two CI-sized runs by hand stalled, nothing lost,
# not drained in 180 s), consistent with Tansu's end-offset issue on S3 (see
# radflow_devstack.broker). On SeaweedFS six CI-sized runs in a row passed in 38-53 s
# (2026-12-01, load average ~7), so it runs in CI again. The end-offset issue itself
# is still there on SeaweedFS: a stall here would be it.


def test_a_hard_broker_restart_under_load_delivers_everything_acknowledged_once(
    durable_broker: Broker, durable_stack: Stack, start_pipeline, tmp_path: Path
) -> None:
    pipeline: Pipeline = start_pipeline(on=durable_stack)
    files = make_series(tmp_path / "study", size().outage_instances)
    sent = Sent()
    began = time.monotonic()
    sender = send_in_background(
        pipeline.ingest.dimse_port,
        files,
        sent,
        retry_until=began + size().drain_s,
        pace_s=0.05,
    )
    wait_for(
        "a part of the stream acknowledged and delivered",
        lambda: len(sent.acked) >= 15 and pipeline.destinations.deliveries()["a"] > 0,
        timeout_s=60,
    )
    with sent.lock:
        acked_before = len(sent.acked)
    down_at = time.monotonic()
    durable_broker.kill()  # a crash: nothing flushed on the way out
    time.sleep(BROKER_AWAY_S)
    durable_broker.start()  # the same port, the same log
    down_s = time.monotonic() - down_at

    sender.join(timeout=size().drain_s)
    assert not sender.is_alive(), "the sender did not finish after the broker returned"
    with sent.lock:
        refused = dict(sent.refused)
    for name, handle in pipeline.started.items():
        assert handle.proc.proc is not None and handle.proc.proc.poll() is None, (
            f"{name} exited after the broker restart"
        )
    drain = pipeline.wait_delivered(sent.acked, timeout_s=size().drain_s)
    time.sleep(3)  # anything sent twice would arrive now
    result = outcome(
        pipeline,
        sent,
        "broker_restart",
        "The durable broker killed and restarted while a stream is sent and processed",
        drain,
        broker_down_s=round(down_s, 1),
        acknowledged_before_restart=acked_before,
        c_store_refused={f"{status:#06x}": n for status, n in sorted(refused.items())},
    )
    result.record(tmp_path)
    assert refused and all(0xA700 <= s <= 0xA7FF for s in refused), (
        f"C-STORE while the broker was away answered {refused}, expected 0xA7xx refusals"
    )
    assert_exactly_once(result)
    assert len(sent.acked) == len(files), "not everything was acknowledged in the end"
