"""STOW-RS ingest against the real broker and S3 server."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import pydicom
import pytest

from radflow_core.dicom_status import StoreStatus
from support.dicom import as_stored, bundled_file, make_instance
from support.metrics import metric
from support.nesting import deeply_nested
from support.stack import IngestProcess, Stack
from support.stow import AUTH_HEADERS, failed_reasons, multipart, referenced, stow

pytestmark = pytest.mark.pipeline

STORED = {"protocol": "stow-rs", "outcome": "stored"}
DUPLICATE = {"protocol": "stow-rs", "outcome": "duplicate"}


def test_all_instances_stored_answers_200_with_referenced_sequence(
    stack: Stack, start_ingest, ts_corpus: dict[str, Path]
) -> None:
    ingest: IngestProcess = start_ingest()
    files = list(ts_corpus.values())
    response = stow(ingest.stow_url, [f.read_bytes() for f in files])
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("application/dicom+json")
    body = response.json()
    assert "00081198" not in body
    sent_uids = [pydicom.dcmread(f).SOPInstanceUID for f in files]
    assert sorted(referenced(body)) == sorted(sent_uids)
    events = stack.events()
    assert len(events) == len(files)
    stored = {as_stored(f.read_bytes()) for f in files}
    for event in events:
        # Each part's data set byte for byte, behind ingest's file meta.
        assert stack.assert_event_matches_blob(event) in stored
        assert event["data"]["sender"]["protocol"] == "stow-rs"
        assert event["data"]["sender"]["identity"] == "apikey:tests"


def test_instances_of_another_study_fail_with_409_when_nothing_is_stored(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    path = make_instance(tmp_path / "a.dcm")
    other_study = pydicom.uid.generate_uid()
    response = stow(f"{ingest.stow_url}/{other_study}", [path.read_bytes()])
    assert response.status_code == 409, response.text
    assert failed_reasons(response.json()) == [
        (pydicom.dcmread(path).SOPInstanceUID, StoreStatus.STUDY_MISMATCH)
    ]
    assert stack.events() == []


def test_mixed_request_answers_202_and_stores_the_good_part(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    study = pydicom.uid.generate_uid()
    good = make_instance(tmp_path / "good.dcm", study_instance_uid=study)
    foreign = make_instance(tmp_path / "foreign.dcm")
    response = stow(
        f"{ingest.stow_url}/{study}",
        [good.read_bytes(), foreign.read_bytes(), b"not dicom at all"],
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert referenced(body) == [pydicom.dcmread(good).SOPInstanceUID]
    assert sorted(failed_reasons(body), key=str) == sorted(
        [
            (pydicom.dcmread(foreign).SOPInstanceUID, StoreStatus.STUDY_MISMATCH),
            (None, StoreStatus.CANNOT_UNDERSTAND),
        ],
        key=str,
    )
    events = stack.events()
    assert [e["data"]["sop_instance_uid"] for e in events] == referenced(body)


@pytest.mark.parametrize(
    "payload",
    [
        b"garbage",
        bundled_file("MR_truncated.dcm").read_bytes(),
        bundled_file("no_meta.dcm").read_bytes(),
    ],
    ids=["garbage", "truncated", "no-file-meta"],
)
def test_unparsable_instances_answer_400_with_cannot_understand(
    stack: Stack, start_ingest, payload: bytes
) -> None:
    ingest: IngestProcess = start_ingest()
    response = stow(ingest.stow_url, [payload])
    assert response.status_code == 400, response.text
    assert failed_reasons(response.json()) == [(None, StoreStatus.CANNOT_UNDERSTAND)]
    assert stack.events() == []


def test_wrong_media_types_answer_415(start_ingest, tmp_path: Path) -> None:
    ingest: IngestProcess = start_ingest()
    data = make_instance(tmp_path / "a.dcm").read_bytes()
    not_multipart = httpx.post(
        ingest.stow_url, content=data, headers={"Content-Type": "application/dicom", **AUTH_HEADERS}
    )
    assert not_multipart.status_code == 415
    metadata_type = stow(ingest.stow_url, [b"{}"], part_type="application/dicom+json")
    assert metadata_type.status_code == 415
    xml_only = stow(ingest.stow_url, [data], Accept="application/dicom+xml")
    assert xml_only.status_code == 406


def test_deeply_nested_instance_is_refused_and_the_receiver_carries_on(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    good = make_instance(tmp_path / "a.dcm").read_bytes()
    response = stow(ingest.stow_url, [deeply_nested(good, 20000)])
    assert response.status_code == 400
    assert failed_reasons(response.json()) == [(None, StoreStatus.CANNOT_UNDERSTAND)]
    assert stow(ingest.stow_url, [good]).status_code == 200
    assert len(stack.events()) == 1


def test_malformed_multipart_answers_400(stack: Stack, start_ingest) -> None:
    ingest: IngestProcess = start_ingest()
    no_boundary = httpx.post(
        ingest.stow_url,
        content=b"--x\r\n\r\n",
        headers={"Content-Type": 'multipart/related; type="application/dicom"', **AUTH_HEADERS},
    )
    assert no_boundary.status_code == 400
    _, ctype = multipart([b""])
    empty = httpx.post(
        ingest.stow_url, content=b"", headers={"Content-Type": ctype, **AUTH_HEADERS}
    )
    assert empty.status_code == 400
    bad_study = stow(f"{ingest.stow_url}/not-a-uid", [b""])
    assert bad_study.status_code == 400
    assert stack.events() == []


def test_oversized_request_answers_413(stack: Stack, start_ingest, tmp_path: Path) -> None:
    ingest: IngestProcess = start_ingest(max_request_bytes="4096")
    big = make_instance(tmp_path / "big.dcm", rows=64, columns=64).read_bytes()
    assert len(big) > 4096
    response = stow(ingest.stow_url, [big])
    assert response.status_code == 413
    assert stack.events() == []


def test_oversized_instance_fails_with_its_reason(start_ingest, tmp_path: Path) -> None:
    ingest: IngestProcess = start_ingest(max_instance_bytes="4096")
    big = make_instance(tmp_path / "big.dcm", rows=64, columns=64).read_bytes()
    response = stow(ingest.stow_url, [big])
    assert response.status_code == 409
    assert failed_reasons(response.json()) == [(None, StoreStatus.INSTANCE_TOO_LARGE)]


def test_large_instance_spools_to_disk_and_is_stored_intact(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest(spool_memory_bytes="65536")
    path = make_instance(tmp_path / "big.dcm", rows=1024, columns=1024)  # 2 MiB of pixels
    response = stow(ingest.stow_url, [path.read_bytes()])
    assert response.status_code == 200, response.text
    (event,) = stack.events()
    assert stack.assert_event_matches_blob(event) == as_stored(path.read_bytes())


@pytest.mark.parametrize("concurrency", ["1", "8"])
def test_many_parts_with_bad_ones_store_the_rest_and_answer_in_part_order(
    stack: Stack, start_ingest, tmp_path: Path, concurrency: str
) -> None:
    ingest: IngestProcess = start_ingest(stow_concurrency=concurrency)
    study = pydicom.uid.generate_uid()
    good = [
        make_instance(tmp_path / f"{i}.dcm", study_instance_uid=study, rows=64, columns=64)
        for i in range(24)
    ]
    foreign = make_instance(tmp_path / "foreign.dcm")
    parts = [p.read_bytes() for p in good]
    parts.insert(5, foreign.read_bytes())
    parts.insert(17, b"not dicom at all")
    response = stow(f"{ingest.stow_url}/{study}", parts)
    assert response.status_code == 202, response.text
    body = response.json()
    good_uids = [pydicom.dcmread(p).SOPInstanceUID for p in good]
    assert referenced(body) == good_uids
    assert failed_reasons(body) == [
        (pydicom.dcmread(foreign).SOPInstanceUID, StoreStatus.STUDY_MISMATCH),
        (None, StoreStatus.CANNOT_UNDERSTAND),
    ]
    events = stack.events()
    assert sorted(e["data"]["sop_instance_uid"] for e in events) == sorted(good_uids)
    sent = {as_stored(p.read_bytes()) for p in good}
    for event in events:
        assert stack.assert_event_matches_blob(event) in sent


def test_an_instance_twice_in_one_request_is_announced_once(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    a, b = (make_instance(tmp_path / f"{n}.dcm").read_bytes() for n in "ab")
    response = stow(ingest.stow_url, [a, b, a, a])
    assert response.status_code == 200, response.text
    uid_a, uid_b = (pydicom.dcmread(io.BytesIO(x)).SOPInstanceUID for x in (a, b))
    assert referenced(response.json()) == [uid_a, uid_b, uid_a, uid_a]
    assert sorted(e["data"]["sop_instance_uid"] for e in stack.events()) == sorted([uid_a, uid_b])
    assert metric(ingest.url, "radflow_ingest_instances_total", **STORED) == 2
    assert metric(ingest.url, "radflow_ingest_instances_total", **DUPLICATE) == 2


def test_an_original_above_the_part_size_is_not_uploaded_twice(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    part_size = 5 * 1024 * 1024
    ingest: IngestProcess = start_ingest(env={"RADFLOW_S3_PART_SIZE": str(part_size)})
    data = make_instance(tmp_path / "big.dcm", rows=1700, columns=1700).read_bytes()
    assert len(data) > part_size
    for _ in range(2):
        assert stow(ingest.stow_url, [data]).status_code == 200
    (event,) = stack.events()
    assert stack.assert_event_matches_blob(event) == as_stored(data)
    uploaded = metric(ingest.url, "radflow_blob_uploaded_bytes_total", kind="original")
    assert uploaded == len(as_stored(data))
    assert metric(ingest.url, "radflow_ingest_instances_total", **DUPLICATE) == 1
