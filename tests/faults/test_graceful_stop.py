"""SIGTERM of each service while a stream goes through it (a rolling update): the
service finishes or hands back its in-flight work, exits 0, and once started again
every instance a sender was told is stored reaches both destinations exactly once.
Ingest, stopped in the middle of a STOW-RS request that is still arriving, answers
it (200, or a plain 503 that stored nothing) and delivers whatever it answered 200.
report-return, stopped while it returns reports to a RIS, sends each report once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
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
from support.stow import AUTH_HEADERS, multipart, referenced

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
"""Between two C-STOREs: the stream lasts several seconds, so a stop lands mid-stream."""
STOW_PARTS = 20
STOW_CHUNK_S = 0.1
"""Between two chunks of the STOW-RS body: the request lasts a couple of seconds, so
the SIGTERM arrives while its body is still coming in."""


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


class SlowStow:
    """A STOW-RS POST whose body arrives a chunk at a time, in a thread."""

    def __init__(self, url: str, files: list[Path]) -> None:
        self.body, self.content_type = multipart(f.read_bytes() for f in files)
        self.url = url
        self.status: int | None = None
        self.stored: list[str] = []
        self.error: str | None = None
        self.thread = threading.Thread(target=self._post, daemon=True)
        self.started = threading.Event()

    def _chunks(self) -> Iterator[bytes]:
        step = max(1, len(self.body) // STOW_PARTS)
        for offset in range(0, len(self.body), step):
            self.started.set()
            yield self.body[offset : offset + step]
            time.sleep(STOW_CHUNK_S)

    def _post(self) -> None:
        try:
            response = httpx.post(
                self.url,
                content=self._chunks(),
                headers={"Content-Type": self.content_type, **AUTH_HEADERS},
                timeout=60,
            )
        except httpx.HTTPError as exc:
            self.error = repr(exc)
            return
        self.status = response.status_code
        if response.status_code in (200, 202):
            self.stored = referenced(response.json())

    def start(self) -> SlowStow:
        self.thread.start()
        return self


@pytest.mark.parametrize("service", ["ingest", "transcode", "router", "stow_forwarder"])
def test_a_service_stopped_mid_stream_exits_0_and_delivers_everything_once(
    start_pipeline, fleet: Fleet, tmp_path: Path, service: str
) -> None:
    pipeline: Pipeline = start_pipeline()
    count = size().instances
    files = make_series(tmp_path / "study", count, studies=4)
    uids = {sop_uid(f) for f in files}
    stow_files = make_series(tmp_path / "stow", STOW_PARTS)
    stow_uids = {sop_uid(f) for f in stow_files}
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
    stow = None
    if service == "ingest":
        stow = SlowStow(pipeline.ingest.stow_url, stow_files).start()
        stow.started.wait(10)
        time.sleep(4 * STOW_CHUNK_S)
    stopping = time.monotonic()
    stopped = fleet.get(service)
    code = fleet.terminate(stopped.proc.name)
    stop_s = time.monotonic() - stopping
    passed_when_stopped = passed()
    details: dict[str, object] = {
        "instances": count,
        "passed_when_stopped": passed_when_stopped,
        "exit_code": code,
        "stop_s": round(stop_s, 1),
    }
    if stow is not None:
        stow.thread.join(60)
        assert not stow.thread.is_alive(), "the STOW-RS request never ended"
        details["stow"] = {
            "parts": STOW_PARTS,
            "status": stow.status,
            "stored": len(stow.stored),
            "error": stow.error,
        }
        with sent.lock:
            sent.acked.update(stow.stored)
    fleet.restart(stopped.proc.name)
    sender.join(timeout=size().drain_s)
    assert not sender.is_alive(), "the sender never got everything acknowledged"
    drain = pipeline.wait_delivered(sent.acked, timeout_s=size().drain_s)
    time.sleep(3)  # anything sent twice would arrive now
    details["refused"] = dict(sent.refused)
    details["total_s"] = round(time.monotonic() - began, 1)
    result = outcome(
        pipeline,
        sent,
        f"sigterm_{service}",
        f"SIGTERM of {service} a third into a stream of {count} instances, restarted",
        drain,
        **details,
    )
    result.record(tmp_path)
    assert code == 0, f"{service} exited {code} on SIGTERM"
    assert_exactly_once(result)
    assert uids <= sent.acked, f"{len(uids - sent.acked)} instances never acknowledged"
    if stow is not None:
        assert stow.error is None, f"the in-flight STOW-RS request failed: {stow.error}"
        assert stow.status in (200, 503), f"STOW-RS answered {stow.status} during the stop"
        if stow.status == 200:
            assert set(stow.stored) == stow_uids


def test_report_return_stopped_mid_stream_exits_0_and_returns_each_report_once(
    stack: Stack, fleet: Fleet, pipeline_env: dict[str, str], tmp_path: Path
) -> None:
    peer = MllpPeer().start()
    try:
        stream = ReportStream(stack, peer, size().instances // 4)
        service = stream.start_service(fleet, pipeline_env, tmp_path)
        stream.start()
        stream.wait_a_third()
        stopping = time.monotonic()
        code = fleet.terminate(service.proc.name)
        stop_s = time.monotonic() - stopping
        received_when_stopped = len(peer.received)
        fleet.restart(service.proc.name)
        result = stream.finish(
            "sigterm_report_return",
            f"SIGTERM of report-return a third into {stream.count} reports, restarted",
            received_when_stopped=received_when_stopped,
            exit_code=code,
            stop_s=round(stop_s, 1),
        )
        result.record(tmp_path)
        assert code == 0, f"report-return exited {code} on SIGTERM"
        assert_exactly_once(result)
        assert result.details["unexpected_messages"] == 0
    finally:
        peer.stop()
