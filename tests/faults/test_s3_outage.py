"""S3 down for minutes (seconds in CI) under a stream: ingest refuses with statuses a
sender retries (C-STORE 0xA7xx, STOW-RS 503 with Retry-After) and keeps nothing it
could not store, every consumer waits instead of dead-lettering, and once S3 is back
everything acknowledged reaches both destinations exactly once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess
from support.metrics import metric_sum
from support.proxy import FaultProxy
from support.stow import stow

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]

CONSUMERS = ("transcode", "router", "stow_forwarder")
WAITING = "radflow_consumer_waiting_since_timestamp_seconds"


@pytest.fixture
def s3_paths(s3_server: ManagedProcess) -> Iterator[dict[str, FaultProxy]]:
    """Two network paths to S3: ingest's and the consumers'. Requested before the
    pipeline, so they outlive its services (which stop against a reachable S3)."""
    assert s3_server.port
    proxies = {"ingest": FaultProxy(s3_server.port), "consumers": FaultProxy(s3_server.port)}
    yield proxies
    for proxy in proxies.values():
        proxy.close()


def _endpoint(proxy: FaultProxy) -> dict[str, str]:
    return {"RADFLOW_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}"}


def test_s3_down_under_a_stream_refuses_retryably_waits_and_then_delivers_everything_once(
    s3_paths: dict[str, FaultProxy],
    start_pipeline,
    fleet,
    pipeline_env: dict[str, str],
    tmp_path: Path,
) -> None:
    ingest = fleet.start(  # starting while the consumers start
        "ingest",
        env={**pipeline_env, **_endpoint(s3_paths["ingest"])},
        wait_ready=False,
        wait_port=False,
    )
    pipeline: Pipeline = start_pipeline(CONSUMERS, env=_endpoint(s3_paths["consumers"]))
    pipeline.started["ingest"] = ingest.wait_ready()
    files = make_series(tmp_path / "study", size().outage_instances)
    stowed = make_series(tmp_path / "stowed", 1)[0]
    sent = Sent()
    began = time.monotonic()
    sender = send_in_background(
        pipeline.ingest.dimse_port,
        files,
        sent,
        retry_until=began + size().s3_outage_s + size().drain_s,
        pace_s=0.05,
    )
    wait_for("a part of the stream acknowledged", lambda: len(sent.acked) >= 10, timeout_s=60)

    # S3 goes away: for the consumers first, so that transcode surely has work in hand
    # when it does, then for ingest too (acknowledged instances still arrive meanwhile).
    s3_paths["consumers"].cut()
    transcode = pipeline.started["transcode"]
    wait_for(
        "transcode to show it waits on the blob store",
        lambda: metric_sum(transcode.url, WAITING, reason="blob_store_unavailable"),
        timeout_s=60,
    )
    with sent.lock:
        refused_before = sum(sent.refused.values())
    s3_paths["ingest"].cut()
    cut_at = time.monotonic()
    # The store in hand at the cut may still succeed; the first refusal after it ends
    # that store (the sender sends one at a time): from then on nothing is acknowledged.
    wait_for(
        "ingest to refuse a C-STORE",
        lambda: sum(sent.refused.values()) > refused_before,
        timeout_s=30,
        every_s=0.1,
    )
    with sent.lock:
        acked_at_cut = len(sent.acked)

    response = stow(pipeline.ingest.stow_url, [stowed.read_bytes()])
    stow_status, retry_after = response.status_code, response.headers.get("Retry-After")
    waits: dict[str, set[str]] = {m: set() for m in CONSUMERS}
    while time.monotonic() - cut_at < size().s3_outage_s:
        for module in CONSUMERS:
            handle = pipeline.started[module]
            assert handle.proc.proc is not None and handle.proc.proc.poll() is None, (
                f"{module} died during the S3 outage"
            )
            waits[module] |= _waiting_reasons(handle.url)
        time.sleep(1)
    with sent.lock:
        refused = dict(sent.refused)
        acked_in_outage = len(sent.acked) - acked_at_cut
    outage = time.monotonic() - cut_at
    for proxy in s3_paths.values():
        proxy.restore()

    sender.join(timeout=size().drain_s)
    assert not sender.is_alive(), "the sender did not finish after S3 returned"
    after = stow(pipeline.ingest.stow_url, [stowed.read_bytes()])
    assert after.status_code == 200, after.text
    with sent.lock:
        sent.acked.add(sop_uid(stowed))
    drain = pipeline.wait_delivered(sent.acked, timeout_s=size().drain_s)
    time.sleep(3)  # anything sent twice would arrive now
    result = outcome(
        pipeline,
        sent,
        "s3_outage",
        "S3 unreachable for every service under a stream, then back",
        drain,
        outage_s=round(outage, 1),
        c_store_refused={f"{status:#06x}": n for status, n in sorted(refused.items())},
        acknowledged_during_outage=acked_in_outage,
        stow_rs_during_outage={"status": stow_status, "retry_after": retry_after},
        consumers_waiting_for={m: sorted(r) for m, r in waits.items()},
    )
    result.record(tmp_path)

    assert refused and all(0xA700 <= s <= 0xA7FF for s in refused), (
        f"C-STORE during the outage answered {refused}, expected only 0xA7xx"
    )
    assert acked_in_outage == 0, "ingest acknowledged instances it could not store"
    assert stow_status == 503 and retry_after and int(retry_after) > 0, (
        f"STOW-RS during the outage: {stow_status}, Retry-After {retry_after!r}"
    )
    assert "blob_store_unavailable" in waits["transcode"], waits
    assert_exactly_once(result)
    assert len(sent.acked) == len(files) + 1, "not everything was acknowledged in the end"


def _waiting_reasons(url: str) -> set[str]:
    """The reasons a service's consumer waits for now (its waiting gauge's series)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        sample.labels["reason"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == WAITING and sample.value
    }
