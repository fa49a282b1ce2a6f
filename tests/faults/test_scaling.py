"""Every consumer stage scaled out from one replica to three and back to one while a
stream flows: the partitions move between replicas (a rebalance at each step, the
leaving replicas handing back what they hold), and each destination still gets every
acknowledged instance exactly once, nothing dead-letters, every replica exits 0."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
from radflow_devstack.kit.waiting import wait_for
from support.fleet import Fleet
from support.stack import IngestProcess

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]

STAGES = ("transcode", "router", "stow_forwarder")
PACE_S = 0.15
"""Between two instances: the stream must outlast both scaling steps."""


def _scale_all(fleet: Fleet, pipeline: Pipeline, n: int) -> dict[str, list[IngestProcess]]:
    """Scale every stage to ``n`` replicas at once (as a deployment's rollout does)."""

    def one(module: str) -> list[IngestProcess]:
        extra = {"rules_file": str(pipeline.rules)} if module != "transcode" else {}
        return fleet.scale(module, n, env=pipeline.settings, **extra)

    with ThreadPoolExecutor(len(STAGES)) as pool:
        return dict(zip(STAGES, pool.map(one, STAGES), strict=True))


def _acked(sent: Sent) -> int:
    with sent.lock:
        return len(sent.acked)


def test_every_stage_scaled_out_and_in_under_a_stream_delivers_everything_once(
    start_pipeline, fleet: Fleet, services: list[IngestProcess], tmp_path: Path
) -> None:
    pipeline: Pipeline = start_pipeline()
    # More than the stream needs (about 25 s of starting and stopping replicas in CI,
    # longer on a loaded machine): it must be flowing throughout both rescalings, and
    # it is stopped once they are done.
    files = make_series(tmp_path / "study", max(size().instances, 600), studies=4)
    sent = Sent()
    stop = threading.Event()
    sender = send_in_background(
        pipeline.ingest.dimse_port,
        files,
        sent,
        retry_until=time.monotonic() + size().drain_s,
        pace_s=PACE_S,
        stop=stop,
    )
    wait_for("a part of the stream acknowledged", lambda: _acked(sent) >= 10, timeout_s=60)
    acked = {"before_scale_out": _acked(sent)}

    began = time.monotonic()
    out = _scale_all(fleet, pipeline, 3)
    scale_out_s = time.monotonic() - began
    assert {m: len(r) for m, r in out.items()} == dict.fromkeys(STAGES, 3)
    acked["after_scale_out"] = _acked(sent)
    wait_for(
        "more of the stream acknowledged on three replicas",
        lambda: _acked(sent) >= acked["after_scale_out"] + 10,
        timeout_s=60,
    )
    replicas = {h.proc.name for m in STAGES for h in fleet.replicas(m)}

    began = time.monotonic()
    back = _scale_all(fleet, pipeline, 1)
    scale_in_s = time.monotonic() - began
    assert {m: len(r) for m, r in back.items()} == dict.fromkeys(STAGES, 1)
    acked["after_scale_in"] = _acked(sent)
    kept = {h.proc.name for handles in back.values() for h in handles}
    stopped = {h.proc.name: h.expected_exit for h in services if h.proc.name in replicas - kept}
    assert sender.is_alive(), "the stream ended before the scale-in did: send more, or slower"
    wait_for(
        "more of the stream acknowledged after the scale-in",
        lambda: _acked(sent) >= acked["after_scale_in"] + 10,
        timeout_s=60,
    )
    stop.set()

    sender.join(timeout=size().drain_s)
    assert not sender.is_alive(), "the sender did not finish"
    drain = pipeline.wait_delivered(sent.acked, timeout_s=size().drain_s)
    time.sleep(3)  # anything sent twice would arrive now
    result = outcome(
        pipeline,
        sent,
        "scale_out_and_in",
        "Transcode, router and stow-forwarder scaled 1 → 3 → 1 under a stream",
        drain,
        scale_out_s=round(scale_out_s, 1),
        scale_in_s=round(scale_in_s, 1),
        acknowledged_by_phase=acked,
        stopped_replicas_exit=stopped,
        normalized_by_replica={
            h.proc.name: h.log().count('"instance normalized"')
            for h in services
            if h.proc.name.startswith("transcode-")
        },
    )
    result.record(tmp_path)
    assert_exactly_once(result)
    assert len(stopped) == 2 * len(STAGES), stopped
    assert all(code == 0 for code in stopped.values()), f"replicas stopped with {stopped}"
    assert sent.acked == sent.started, "not everything sent was acknowledged in the end"
