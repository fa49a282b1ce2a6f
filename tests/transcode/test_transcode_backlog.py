"""Transcode working through a backlog with several instances in flight, on the real
broker and S3: a slow instance is overtaken, a broken one is dead-lettered, the offset
is committed past every record once all are settled, and a crash, a stop or an S3
outage in the middle loses nothing and stores no instance twice."""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from pydicom.uid import generate_uid

from radflow_core.kafka import connection_options
from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess
from support.dicom import bundled_file, make_instance
from support.metrics import metric_sum
from support.proxy import FaultProxy
from support.stack import IngestProcess, Stack
from support.stow import stow

pytestmark = pytest.mark.pipeline

GROUP = "radflow-transcode"


def _normalized(stack: Stack) -> list[dict]:
    return [e["data"] for e in stack.events(Topic.INSTANCE_NORMALIZED)]


def _study(tmp_path: Path, count: int, study: str, **kwargs: int) -> list[bytes]:
    """``count`` 64x64 (or ``rows``x``columns``) CT instances of ``study``."""
    return [
        make_instance(
            tmp_path / f"{generate_uid()}.dcm",
            study_instance_uid=study,
            **{"rows": 64, "columns": 64, **kwargs},
        ).read_bytes()
        for _ in range(count)
    ]


def _broken(study: str) -> bytes:
    """A lossy JPEG whose pixel data cannot be decoded, moved into ``study``."""
    ds = pydicom.dcmread(bundled_file("JPEG-lossy.dcm"))
    ds.StudyInstanceUID = study
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def _send(ingest: IngestProcess, *requests: list[bytes]) -> None:
    """One STOW-RS request after the other (within one, ingest may announce the parts
    in any order)."""
    for parts in requests:
        response = stow(ingest.stow_url, parts)
        assert response.status_code == 200, response.text


def _uncommitted(stack: Stack, group: str, total: int) -> int:
    """Records of the received topic past the group's committed offsets.

    Counted from the ``total`` records the test sent (each partition's offsets start at
    0 with no gaps, so the committed offsets add up to the records consumed), not from
    the broker's end offsets: Tansu under-reports those when several batches of a
    partition land within one second (radflow_devstack.broker), as ingest's one-PUT
    acknowledgement path now makes them do.
    """

    async def committed() -> int:
        topic = stack.topic(Topic.INSTANCE_RECEIVED)
        consumer = AIOKafkaConsumer(
            **connection_options(stack.kafka),
            group_id=stack.kafka.group(group),
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            partitions = [TopicPartition(topic, p) for p in range(3)]
            return sum([await consumer.committed(tp) or 0 for tp in partitions])
        finally:
            await consumer.stop()

    return total - asyncio.run(committed())


def test_a_slow_instance_is_overtaken_and_a_broken_one_dead_lettered_in_a_backlog(
    stack: Stack, start_ingest, start_transcode, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    study = generate_uid()
    small = _study(tmp_path, 24, study)
    large = _study(tmp_path, 1, study, rows=4096, columns=4096)  # 32 MiB: the large path
    _send(ingest, small[:4], large, [*small[4:12], _broken(study), *small[12:]])
    wait_for("the backlog received", lambda: len(stack.events()) == 26, timeout_s=60)
    order = [e["data"]["sop_instance_uid"] for e in stack.events()]
    slow = pydicom.dcmread(io.BytesIO(large[0])).SOPInstanceUID

    start_transcode(workers="2", concurrency="4")
    wait_for(
        "25 normalized and 1 dead-lettered",
        lambda: len(_normalized(stack)) == 25 and len(stack.events(Topic.INSTANCE_FAILED)) == 1,
        timeout_s=180,
    )
    [letter] = [e["data"] for e in stack.events(Topic.INSTANCE_FAILED)]
    assert letter["reason"] == "undecodable_pixel_data"
    done_at = {e["sop_instance_uid"]: e["normalized_at"] for e in _normalized(stack)}
    after_slow = order[order.index(slow) + 1 :]
    assert any(done_at[uid] < done_at[slow] for uid in after_slow if uid in done_at), (
        "nothing received after the slow instance was normalized before it"
    )
    wait_for("every record committed", lambda: _uncommitted(stack, GROUP, 26) == 0, timeout_s=30)
    assert len(stack.keys("canonical/")) == 25


@pytest.mark.parametrize("how", ["kill", "sigterm"])
def test_a_crash_or_stop_mid_backlog_loses_nothing_and_stores_each_instance_once(
    how: str, stack: Stack, start_ingest, start_transcode, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    parts = _study(tmp_path, 120, generate_uid())
    _send(ingest, parts[:60], parts[60:])
    wait_for("the backlog received", lambda: len(stack.events()) == 120, timeout_s=60)
    expected = {e["data"]["sop_instance_uid"] for e in stack.events()}

    first: IngestProcess = start_transcode(concurrency="8")
    wait_for(
        "some normalized",
        lambda: metric_sum(first.url, "radflow_transcode_instances_total") >= 15,
        timeout_s=120,
        every_s=0.02,
    )
    if how == "kill":
        first.proc.kill()
        first.expected_exit = -9
    else:
        assert first.proc.stop() == 0
    assert len(_normalized(stack)) < 120, "the backlog was done before the interruption"

    start_transcode(concurrency="8")
    wait_for(
        "every instance normalized",
        lambda: {e["sop_instance_uid"] for e in _normalized(stack)} == expected,
        timeout_s=180,
    )
    wait_for("every record committed", lambda: _uncommitted(stack, GROUP, 120) == 0, timeout_s=30)
    events = _normalized(stack)
    canonical = {e["sop_instance_uid"]: set() for e in events}
    for event in events:
        canonical[event["sop_instance_uid"]].add(event["canonical"]["key"])
    assert all(len(keys) == 1 for keys in canonical.values())
    assert sorted(k for keys in canonical.values() for k in keys) == stack.keys("canonical/")
    assert len(stack.keys("normalized/")) == 120
    assert stack.events(Topic.INSTANCE_FAILED) == []
    repeated = {
        uid: n for uid, n in Counter(e["sop_instance_uid"] for e in events).items() if n > 1
    }
    if how == "sigterm":
        # What was in hand was finished and marked; the rest was read again.
        assert repeated == {}
    else:
        # Only what was in flight when the process died can be announced twice.
        assert len(repeated) <= 8, repeated


def test_an_s3_outage_mid_backlog_is_waited_out_without_dead_letters(
    stack: Stack, s3_server: ManagedProcess, start_ingest, start_transcode, tmp_path: Path
) -> None:
    assert s3_server.port
    ingest: IngestProcess = start_ingest()
    parts = _study(tmp_path, 60, generate_uid())
    _send(ingest, parts)
    wait_for("the backlog received", lambda: len(stack.events()) == 60, timeout_s=60)
    proxy = FaultProxy(s3_server.port)
    try:
        transcode: IngestProcess = start_transcode(
            env={
                "RADFLOW_S3_ENDPOINT": f"http://127.0.0.1:{proxy.port}",
                "RADFLOW_S3_RETRIES": "0",
            },
            concurrency="8",
        )
        wait_for(
            "some normalized",
            lambda: metric_sum(transcode.url, "radflow_transcode_instances_total") >= 10,
            timeout_s=120,
            every_s=0.02,
        )
        proxy.cut()
        time.sleep(1.5)
        proxy.restore()
        wait_for("all 60 normalized", lambda: len(stack.keys("normalized/")) == 60, timeout_s=120)
        retried = metric_sum(transcode.url, "radflow_consumer_records_total", outcome="retried")
    finally:
        proxy.close()
    assert retried > 0, "the outage hit nothing in flight: the test did not test anything"
    assert stack.events(Topic.INSTANCE_FAILED) == []
    wait_for("every record committed", lambda: _uncommitted(stack, GROUP, 60) == 0, timeout_s=30)
    assert len({e["sop_instance_uid"] for e in _normalized(stack)}) == 60
    assert len(stack.keys("canonical/")) == 60
