"""DIMSE ingest against the real broker and S3 server, sent by DCMTK and pynetdicom."""

from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE

from radflow_core.dicom_status import StoreStatus
from radflow_devstack.kit.dcmtk import storescu
from radflow_devstack.kit.waiting import wait_for
from support.dicom import (
    PHI_ID,
    PHI_NAME,
    dataset_bytes,
    make_instance,
    pynetdicom_store,
    raw_store,
)
from support.stack import IngestProcess, Stack

pytestmark = pytest.mark.pipeline


def _by_instance(events: list[dict]) -> dict[tuple[str, str], list[dict]]:
    grouped: dict[tuple[str, str], list[dict]] = {}
    for event in events:
        data = event["data"]
        grouped.setdefault((data["sop_instance_uid"], data["transfer_syntax_uid"]), []).append(
            event
        )
    return grouped


def _assert_each_stored_once(stack: Stack, sent: dict[str, Path]) -> None:
    """Each sent file: exactly one event, its blob in S3 with the event's sha256, and
    the stored dataset identical to the sent one."""
    grouped = _by_instance(stack.events())
    assert sum(len(v) for v in grouped.values()) == len(sent)
    for ts, path in sent.items():
        original = pydicom.dcmread(path)
        events = grouped.get((original.SOPInstanceUID, ts), [])
        assert len(events) == 1, f"{path.name}: {len(events)} events"
        event = events[0]
        assert event["type"] == "dicom.instance.received"
        assert event["data"]["study_instance_uid"] == original.StudyInstanceUID
        assert event["data"]["sop_class_uid"] == original.SOPClassUID
        stored = stack.assert_event_matches_blob(event)
        assert _elements(pydicom.dcmread(io.BytesIO(stored))) == _elements(original), path.name


def _elements(ds: pydicom.Dataset) -> dict[int, object]:
    """Tag → value, without group lengths and trailing padding (FFFC,FFFC), which
    senders may add or drop (DCMTK drops the padding)."""
    return {int(e.tag): e.value for e in ds if e.tag.element != 0 and e.tag != 0xFFFCFFFC}


def test_every_transfer_syntax_from_storescu_is_stored_and_announced_once(
    stack: Stack, start_ingest, ts_corpus: dict[str, Path]
) -> None:
    ingest: IngestProcess = start_ingest()
    for ts, path in ts_corpus.items():
        result = storescu(ingest.dimse_port, path, ts=ts)
        assert result.returncode == 0, f"{path.name} ({ts}): {result.stderr}"
    _assert_each_stored_once(stack, ts_corpus)


def test_every_transfer_syntax_from_pynetdicom_is_stored_byte_for_byte(
    stack: Stack, start_ingest, ts_corpus: dict[str, Path]
) -> None:
    ingest: IngestProcess = start_ingest()
    for ts, path in ts_corpus.items():
        result = pynetdicom_store(ingest.dimse_port, path)
        assert result.status == StoreStatus.SUCCESS, f"{path.name} ({ts}): {result}"
    _assert_each_stored_once(stack, ts_corpus)
    # The dataset bytes arrive and are kept exactly as encoded by the sender.
    for event in stack.events():
        stored = stack.assert_event_matches_blob(event)
        ds = pydicom.dcmread(io.BytesIO(stored))
        assert ds.file_meta.TransferSyntaxUID == event["data"]["transfer_syntax_uid"]
        assert event["data"]["sender"] == {
            "protocol": "dimse",
            "calling_ae": "PYSCU",
            "called_ae": "RADFLOW",
            "peer_address": "127.0.0.1",
            "client": None,
            "identity": None,  # plain DIMSE proves nothing about the sender
        }


def test_same_bytes_twice_succeed_without_a_second_blob_or_event(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    path = make_instance(tmp_path / "a.dcm")
    for _ in range(3):
        assert pynetdicom_store(ingest.dimse_port, path).status == StoreStatus.SUCCESS
    events = stack.events()
    assert len(events) == 1
    assert len(stack.keys("original/")) == 1
    metrics = httpx.get(f"{ingest.url}/metrics").text
    assert 'radflow_ingest_instances_total{outcome="stored",protocol="dimse"} 1.0' in metrics
    assert 'radflow_ingest_instances_total{outcome="duplicate",protocol="dimse"} 2.0' in metrics


def test_same_uid_with_different_bytes_is_kept_as_two_versions(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    uid, study = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    first = make_instance(tmp_path / "1.dcm", sop_instance_uid=uid, study_instance_uid=study)
    second = make_instance(
        tmp_path / "2.dcm", sop_instance_uid=uid, study_instance_uid=study, rows=8
    )
    for path in (first, second):
        assert pynetdicom_store(ingest.dimse_port, path).status == StoreStatus.SUCCESS
    events = stack.events()
    assert len(events) == 2
    assert {e["data"]["sop_instance_uid"] for e in events} == {uid}
    assert {e["data"]["blob"]["sha256"] for e in events} == {
        hashlib.sha256(stack.object_bytes(e["data"]["blob"]["key"])).hexdigest() for e in events
    }
    assert len({e["data"]["blob"]["key"] for e in events}) == 2


def test_event_and_logs_carry_no_patient_demographics(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    good = make_instance(tmp_path / "good.dcm")
    bad = make_instance(tmp_path / "bad.dcm", omit=("StudyInstanceUID",))
    assert pynetdicom_store(ingest.dimse_port, good).status == StoreStatus.SUCCESS
    assert pynetdicom_store(ingest.dimse_port, bad).status == StoreStatus.MISSING_ATTRIBUTE
    events = stack.events()
    assert len(events) == 1
    stored = stack.assert_event_matches_blob(events[0])
    assert PHI_NAME.encode() in stored  # the blob is the PHI store...
    for text in (str(events), ingest.log()):  # ...events and logs are not
        assert PHI_NAME not in text
        assert PHI_ID not in text
        assert "19700101" not in text


@pytest.mark.parametrize(
    ("omit", "status"),
    [
        (("SOPInstanceUID",), StoreStatus.MISSING_ATTRIBUTE),
        (("StudyInstanceUID",), StoreStatus.MISSING_ATTRIBUTE),
        (("SeriesInstanceUID",), StoreStatus.MISSING_ATTRIBUTE),
    ],
)
def test_dataset_without_identifying_uids_is_refused_with_no_event(
    stack: Stack, start_ingest, tmp_path: Path, omit: tuple[str, ...], status: StoreStatus
) -> None:
    ingest: IngestProcess = start_ingest()
    path = make_instance(tmp_path / "x.dcm", omit=omit)
    raw = path.read_bytes()
    result = raw_store(
        ingest.dimse_port,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid="1.2.3.4",
        transfer_syntax="1.2.840.10008.1.2.1",
        data=dataset_bytes(raw),
    )
    assert result.status == status
    assert result.comment and omit[0] in result.comment
    assert stack.events() == []
    assert stack.keys("original/") == []


def test_command_and_dataset_disagreeing_are_refused(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    path = make_instance(tmp_path / "x.dcm")
    ds = pydicom.dcmread(path)
    data = dataset_bytes(path.read_bytes())
    wrong_instance = raw_store(
        ingest.dimse_port,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid="1.2.3.999",
        transfer_syntax="1.2.840.10008.1.2.1",
        data=data,
    )
    assert wrong_instance.status == StoreStatus.SOP_INSTANCE_MISMATCH
    wrong_class = raw_store(
        ingest.dimse_port,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.4",  # MR, dataset is CT
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax="1.2.840.10008.1.2.1",
        data=data,
    )
    assert wrong_class.status == StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    assert stack.events() == []


def test_invalid_uid_is_refused(stack: Stack, start_ingest, tmp_path: Path) -> None:
    ingest: IngestProcess = start_ingest()
    path = make_instance(tmp_path / "x.dcm", study_instance_uid="1.2.03.4")  # leading zero
    ds = pydicom.dcmread(path)
    result = raw_store(
        ingest.dimse_port,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax="1.2.840.10008.1.2.1",
        data=dataset_bytes(path.read_bytes()),
    )
    assert result.status == StoreStatus.INVALID_UID
    assert stack.events() == []


@pytest.mark.parametrize("cut", [0.5, 0.97])
def test_truncated_or_garbage_dataset_is_refused_and_the_association_goes_on(
    stack: Stack, start_ingest, tmp_path: Path, cut: float
) -> None:
    ingest: IngestProcess = start_ingest()
    path = make_instance(tmp_path / "x.dcm", rows=64, columns=64)
    ds = pydicom.dcmread(path)
    data = dataset_bytes(path.read_bytes())
    result = raw_store(
        ingest.dimse_port,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax="1.2.840.10008.1.2.1",
        data=data[: int(len(data) * cut)],
    )
    assert 0xC000 <= result.status <= 0xCFFF, hex(result.status)
    garbage = raw_store(
        ingest.dimse_port,
        sop_class_uid=ds.SOPClassUID,
        sop_instance_uid=ds.SOPInstanceUID,
        transfer_syntax="1.2.840.10008.1.2.1",
        data=b"\xff" * 300,
    )
    assert 0xC000 <= garbage.status <= 0xCFFF, hex(garbage.status)
    assert stack.events() == []
    # The receiver is unharmed: a good instance right after is stored.
    assert pynetdicom_store(ingest.dimse_port, path).status == StoreStatus.SUCCESS
    assert len(stack.events()) == 1


def test_echo_succeeds_and_wrong_called_ae_is_rejected(start_ingest) -> None:
    ingest: IngestProcess = start_ingest()
    ok = subprocess.run(
        ["echoscu", "-aec", "RADFLOW", "127.0.0.1", str(ingest.dimse_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    wrong = subprocess.run(
        ["echoscu", "-aec", "NOTUS", "127.0.0.1", str(ingest.dimse_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stderr


def test_allow_list_admits_listed_callers_only(start_ingest) -> None:
    ingest: IngestProcess = start_ingest(allowed_peers="CT1@127.0.0.1,MR2@10.0.0.0/8")
    admitted = subprocess.run(
        ["echoscu", "-aet", "CT1", "-aec", "RADFLOW", "127.0.0.1", str(ingest.dimse_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert admitted.returncode == 0, admitted.stderr
    for caller in ("MR2", "OTHER"):  # MR2 is listed, but from another network
        refused = subprocess.run(
            ["echoscu", "-aet", caller, "-aec", "RADFLOW", "127.0.0.1", str(ingest.dimse_port)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode != 0
        assert "Calling AE Title Not Recognized" in refused.stderr
    metrics = httpx.get(f"{ingest.url}/metrics").text
    assert 'radflow_ingest_associations_rejected_total{reason="calling_ae_not_allowed"} 2.0' in (
        metrics
    )


def test_associations_beyond_the_limit_are_rejected_as_transient(start_ingest) -> None:
    ingest: IngestProcess = start_ingest(max_associations="1")
    ae = AE(ae_title="FIRST")
    ae.add_requested_context("1.2.840.10008.1.1")
    first = ae.associate("127.0.0.1", ingest.dimse_port, ae_title="RADFLOW")
    assert first.is_established
    try:
        second = ae.associate("127.0.0.1", ingest.dimse_port, ae_title="RADFLOW")
        assert second.is_rejected
        assert second.acceptor.primitive is not None
        assert second.acceptor.primitive.result == 0x02  # rejected-transient: retry later
        assert second.acceptor.primitive.diagnostic == 0x02  # local limit exceeded
    finally:
        first.release()

    def no_open_association() -> bool:
        return "radflow_ingest_associations_active 0.0" in httpx.get(f"{ingest.url}/metrics").text

    wait_for("ingest to see both associations closed", no_open_association)

    # pynetdicom counts an association until its thread has ended, a moment after the
    # connection closed (which the gauge follows), so the slot frees shortly after.
    def third_accepted() -> bool:
        third = ae.associate("127.0.0.1", ingest.dimse_port, ae_title="RADFLOW")
        if not third.is_established:
            return False
        third.release()
        return True

    wait_for("a new association to be accepted once the first closed", third_accepted)
