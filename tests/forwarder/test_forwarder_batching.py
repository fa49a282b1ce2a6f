"""How the forwarder's requests are cut and overlapped, against the real broker, S3
server and Orthanc: forward requests are published straight to the topic (as the
router would), pinned to one partition so that they arrive in one fetch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import generate_uid

from radflow_core.topics import Topic
from radflow_devstack.kit.waiting import wait_for
from radflow_devstack.processes import ManagedProcess
from stow_forwarder.markers import DELIVERED_MARKER, State, decode, merge
from support.dicom import make_instance
from support.forward import publish, routed
from support.metrics import metric, metric_sum
from support.orthanc import OrthancView
from support.stack import Stack

pytestmark = pytest.mark.pipeline


def studies(tmp_path: Path, count: int, per_study: int, rows: int = 32) -> list[Path]:
    """``count`` studies of ``per_study`` instances each, interleaved instance by
    instance as several modalities sending at once would leave them."""
    made: list[list[Path]] = []
    for s in range(count):
        study, series = generate_uid(), generate_uid()
        folder = tmp_path / f"study-{s}"
        folder.mkdir()
        made.append(
            [
                make_instance(
                    folder / f"{i:03d}.dcm",
                    study_instance_uid=study,
                    series_instance_uid=series,
                    rows=rows,
                    columns=rows,
                )
                for i in range(per_study)
            ]
        )
    return [files[i] for i in range(per_study) for files in made]


def rules(path: Path, orthanc: OrthancView, max_batch: int) -> Path:
    path.write_text(
        "version: 1\ndestinations:\n"
        f"  orthanc: {{url: '{orthanc.dicomweb}', max_batch: {max_batch}}}\n"
        "rules:\n  - name: everything\n    route: [orthanc]\ndefault: {hold: x}\n"
    )
    return path


def completed(stack: Stack) -> list[dict[str, Any]]:
    return [e["data"] for e in stack.events(Topic.FORWARD_COMPLETED)]


def test_interleaved_studies_in_one_fetch_go_one_request_per_study_up_to_max_batch(
    stack: Stack,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    orthanc = OrthancView(start_orthanc_server())
    files = studies(tmp_path, count=3, per_study=12)
    requests = routed(stack, files, "orthanc")
    forwarder = start_forwarder(rules_file=str(rules(tmp_path / "rules.yaml", orthanc, 20)))
    wait_for("36 deliveries", lambda: len(completed(stack)) == 36, timeout_s=60)
    assert orthanc.count() == 36
    assert stack.events(Topic.FORWARD_FAILED) == []
    batches = "radflow_forwarder_batch_instances"
    assert metric(forwarder.url, f"{batches}_count", destination="orthanc") == 3
    assert metric(forwarder.url, f"{batches}_sum", destination="orthanc") == 36

    def s3(operation: str) -> float:
        return metric_sum(forwarder.url, "radflow_blob_requests_total", operation=operation)

    # Markers per batch: one LIST to check, one PUT of the intent, one of the answer;
    # no request per instance but the download of its bytes.
    assert (s3("list"), s3("put_marker"), s3("stat"), s3("get")) == (3, 6, 0, 36)
    # Replayed, every request is found delivered by listings alone (one per study
    # and fetch): no marker is written, none of this process's own is read again, no
    # bytes are downloaded.
    publish(stack, requests)
    wait_for("72 acknowledgements", lambda: len(completed(stack)) == 72, timeout_s=60)
    assert sum(d["already_delivered"] for d in completed(stack)) == 36
    assert s3("list") > 3
    assert (s3("put_marker"), s3("get_marker"), s3("get"), s3("stat")) == (6, 0, 36, 0)
    assert orthanc.count() == 36


def test_a_request_repeated_within_one_fetch_is_sent_once_and_acknowledged_twice(
    stack: Stack,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    """The repeat is cut into a later batch, which is staged while the first is on the
    wire, before the first one's delivery marker exists."""
    orthanc = OrthancView(start_orthanc_server())
    files = studies(tmp_path, count=1, per_study=6)
    routed(stack, [*files, files[0]], "orthanc")
    forwarder = start_forwarder(rules_file=str(rules(tmp_path / "rules.yaml", orthanc, 50)))
    wait_for("7 acknowledgements", lambda: len(completed(stack)) == 7, timeout_s=60)
    done = completed(stack)
    first = pydicom.dcmread(files[0]).SOPInstanceUID
    assert sorted(d["already_delivered"] for d in done if d["sop_instance_uid"] == first) == [
        False,
        True,
    ]
    assert sum(not d["already_delivered"] for d in done) == 6
    assert metric_sum(forwarder.url, "radflow_forwarder_batch_instances_sum") == 6
    assert (
        metric(forwarder.url, "radflow_forwarder_already_delivered_total", destination="orthanc")
        == 1
    )
    assert orthanc.count() == 6


def test_a_forwarder_stopped_mid_backlog_leaves_no_accepted_instance_unacknowledged(
    stack: Stack,
    start_forwarder,
    start_orthanc_server: Callable[..., ManagedProcess],
    tmp_path: Path,
) -> None:
    """SIGTERM while batches are on the wire, being staged and being settled: what the
    destination accepted has its marker and its completed event before the process
    exits; after a restart every instance is sent exactly once more or not at all."""
    orthanc = OrthancView(start_orthanc_server())
    files = studies(tmp_path, count=4, per_study=60, rows=128)
    requests = routed(stack, files, "orthanc")
    rule_file = str(rules(tmp_path / "rules.yaml", orthanc, 10))
    forwarder = start_forwarder(rules_file=rule_file)
    wait_for("some delivered", lambda: orthanc.count() >= 30, timeout_s=60)
    assert forwarder.proc.stop() == 0
    held = set(orthanc.sop_instance_uids())
    assert len(held) < len(files), "stopped too late to test anything"
    acknowledged = {d["sop_instance_uid"] for d in completed(stack)}
    assert held == acknowledged
    # What a batch marker records as delivered was acknowledged; what it records as
    # sending was not (or not yet recorded).
    states: dict[str, State] = {}
    for key in stack.keys(f"{DELIVERED_MARKER}/"):
        answer = stack.minio().get_object(stack.s3.bucket, key)
        try:
            merge(states, decode(answer.read()))
        finally:
            answer.close()
            answer.release_conn()
    marked = {
        r.sop_instance_uid for r in requests if states.get(r.idempotency_key) is State.DELIVERED
    }
    assert marked == held
    start_forwarder(rules_file=rule_file)
    wait_for("all delivered", lambda: orthanc.count() == len(files), timeout_s=120)
    wait_for(
        "every request acknowledged",
        lambda: len({d["idempotency_key"] for d in completed(stack)}) == len(files),
        timeout_s=60,
    )
    sent = [d for d in completed(stack) if not d["already_delivered"]]
    assert len(sent) == len(files), "an instance was sent twice"
    assert stack.events(Topic.FORWARD_FAILED) == []
