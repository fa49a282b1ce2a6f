"""A soak: a steady stream for a while (30 s in CI, 15 minutes in ``make faults``).
Acknowledgement times do not creep up from the first third to the last, no service's
memory keeps growing, and everything reaches both destinations exactly once."""

from __future__ import annotations

import statistics
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
from support.stack import IngestProcess

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]

WARM_UP = 10
"""Instances sent before memory is first measured: the first ones load the codecs and
fill the clients' pools, a one-off growth that is not a leak."""
RSS_GROWTH_MB = 30.0
"""What a service's resident memory may grow by from after the warm-up to the end."""
P99_FACTOR, P99_SLACK_S = 2.0, 0.5
"""The last third's p99 may be at most twice the first third's plus half a second.
The CI machine has two cores shared with another test run: a third has only tens of
acknowledgements, so its p99 is its slowest one or two, and a neighbour's burst delays
one of them by several hundred milliseconds without anything being wrong here. A
pipeline falling behind (a backlog, a leak, a queue growing) makes every later
acknowledgement slower, and crosses this bound within the soak."""


def _rss_mb(handle: IngestProcess) -> float:
    assert handle.proc.proc is not None
    status = Path(f"/proc/{handle.proc.proc.pid}/status").read_text()
    kb = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))
    return round(int(kb) / 1024, 1)


def _percentile(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1]


def test_a_steady_stream_keeps_acknowledgement_times_and_memory_flat(
    start_pipeline, tmp_path: Path
) -> None:
    pipeline: Pipeline = start_pipeline()
    rate, soak_s = size().soak_rate_per_s, size().soak_s
    files = make_series(tmp_path / "study", WARM_UP + round(rate * soak_s), studies=5)
    rss_start = {n: _rss_mb(h) for n, h in pipeline.started.items()}

    warm = Sent()
    send_in_background(pipeline.ingest.dimse_port, files[:WARM_UP], warm).join(timeout=120)
    pipeline.wait_delivered(warm.acked, timeout_s=size().drain_s)
    rss_warm = {n: _rss_mb(h) for n, h in pipeline.started.items()}

    sent = Sent()
    began = time.monotonic()
    sender = send_in_background(
        pipeline.ingest.dimse_port,
        files[WARM_UP:],
        sent,
        every_s=1 / rate,
        retry_until=began + soak_s + size().drain_s,
    )
    sender.join(timeout=soak_s + size().drain_s)
    assert not sender.is_alive(), "the sender did not finish"
    sending_s = time.monotonic() - began
    drain = pipeline.wait_delivered(sent.acked, timeout_s=size().drain_s)
    rss_end = {n: _rss_mb(h) for n, h in pipeline.started.items()}
    time.sleep(3)  # anything sent twice would arrive now

    third = sending_s / 3
    windows: dict[str, list[float]] = {"first": [], "middle": [], "last": []}
    for at, seconds in zip(sent.acked_at, sent.ack_seconds, strict=True):
        windows[("first", "middle", "last")[min(2, int((at - began) // third))]].append(seconds)
    latency = {
        name: {
            "count": len(values),
            "p50_ms": round(1000 * _percentile(values, 50)),
            "p99_ms": round(1000 * _percentile(values, 99)),
        }
        for name, values in windows.items()
    }
    growth = {n: round(rss_end[n] - rss_warm[n], 1) for n in rss_end}
    sent.acked |= warm.acked
    result = outcome(
        pipeline,
        sent,
        "soak",
        f"A steady stream of {rate:g} instances a second for {soak_s:g} s",
        drain,
        sending_s=round(sending_s, 1),
        rate_per_s=rate,
        ack_latency=latency,
        rss_mb={"start": rss_start, "after_warm_up": rss_warm, "end": rss_end},
        rss_growth_mb=growth,
    )
    result.record(tmp_path)
    assert_exactly_once(result)
    assert len(sent.acked) == len(files), "not everything was acknowledged"
    first, last = latency["first"]["p99_ms"] / 1000, latency["last"]["p99_ms"] / 1000
    assert last <= P99_FACTOR * first + P99_SLACK_S, f"acknowledgements got slower: {latency}"
    assert all(g < RSS_GROWTH_MB for g in growth.values()), f"memory grew: {growth}"
