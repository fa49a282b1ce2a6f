"""Several modalities sending the same instances at the same moment (a study pushed
from two consoles, a retry racing the original), and a STOW-RS client sending part of
them too: each SOP Instance UID reaches each destination exactly once. Ingest stores
every original under its own file meta, so an instance has one sha256 (and one
idempotency key downstream) whichever protocol and calling AE brought it."""

from __future__ import annotations

import threading
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
from support.stow import referenced, stow

pytestmark = [pytest.mark.pipeline, pytest.mark.faults]

SENDERS = 4
STOW_BATCH = 10


@pytest.mark.parametrize(
    "with_stow",
    [pytest.param(False, id="dimse"), pytest.param(True, id="dimse_and_stow")],
)
def test_concurrent_senders_of_overlapping_instances_deliver_each_once(
    start_pipeline, tmp_path: Path, with_stow: bool
) -> None:
    pipeline: Pipeline = start_pipeline()
    count = size().instances // 2
    files = make_series(tmp_path / "study", count, studies=4)
    uids = {sop_uid(f) for f in files}
    quarter = count // SENDERS
    # Two senders send everything in the same order (every instance raced at once), two
    # start a quarter and three quarters in, and each of those skips its last quarter.
    orders = [
        files,
        files,
        files[quarter:] + files[: quarter // 2],
        files[3 * quarter :] + files[: 2 * quarter],
    ]
    stowed = files[: count // 2] if with_stow else []
    sent = Sent()
    stow_statuses: list[int] = []
    began = time.monotonic()
    go = threading.Barrier(SENDERS + with_stow)

    def stow_sender() -> None:
        go.wait()
        for start in range(0, len(stowed), STOW_BATCH):
            batch = stowed[start : start + STOW_BATCH]
            response = stow(pipeline.ingest.stow_url, [f.read_bytes() for f in batch])
            stow_statuses.append(response.status_code)
            if response.status_code in (200, 202):
                with sent.lock:
                    sent.acked.update(referenced(response.json()))

    def dimse_sender(index: int) -> threading.Thread:
        def run() -> None:
            go.wait()
            send(
                pipeline.ingest.dimse_port,
                orders[index],
                sent,
                calling_ae=f"MODALITY{index}",
                retry_until=began + size().drain_s,
            )

        return threading.Thread(target=run, daemon=True)

    threads = [dimse_sender(i) for i in range(SENDERS)]
    if with_stow:
        threads.append(threading.Thread(target=stow_sender, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(size().drain_s)
        assert not thread.is_alive(), "a sender never finished"
    sending = time.monotonic() - began
    drain = pipeline.wait_delivered(sent.acked, timeout_s=size().drain_s)
    time.sleep(3)  # anything sent twice would arrive now
    result = outcome(
        pipeline,
        sent,
        "concurrent_senders" if with_stow else "concurrent_dimse_senders",
        f"{SENDERS} DIMSE senders{' and a STOW-RS sender' if with_stow else ''}, "
        f"overlapping sets of {count} instances",
        drain,
        instances=count,
        dimse_senders=SENDERS,
        sent_by_dimse=sum(len(o) for o in orders),
        sent_by_stow=len(stowed),
        stow_statuses=stow_statuses,
        refused=dict(sent.refused),
        sending_s=round(sending, 1),
    )
    result.record(tmp_path)
    assert_exactly_once(result)
    assert sent.acked == uids, f"{len(uids - sent.acked)} instances never acknowledged"
    assert result.delivered == {"a": count, "b": count}, result.delivered
    assert set(stow_statuses) <= {200}, stow_statuses
