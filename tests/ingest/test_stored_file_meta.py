"""The original ingest stores has ingest's own file meta, so one data set is one blob
and one event whichever protocol and calling AE brought it (against the real broker
and S3 server, sent by STOW-RS, pynetdicom and DCMTK)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID

from radflow_core.dicom_status import StoreStatus
from radflow_core.file_meta import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from radflow_devstack.kit.dcmtk import storescu
from support.dicom import dataset_bytes, make_instance, pynetdicom_store
from support.metrics import metric
from support.stack import IngestProcess, Stack
from support.stow import stow

pytestmark = pytest.mark.pipeline

INSTANCES = "radflow_ingest_instances_total"


def _with_senders_meta(path: Path) -> bytes:
    """``path``'s data set behind a file meta as a workstation writes one: its own
    implementation, its AE title as Source Application Entity Title, a nonzero preamble."""
    ds = pydicom.dcmread(path)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = UID("1.2.3.4.5.6")
    meta.ImplementationVersionName = "WORKSTATION_9"
    meta.SourceApplicationEntityTitle = "VIEWER1"
    buffer = io.BytesIO()
    buffer.write(b"\x01" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)  # type: ignore[arg-type]
    return buffer.getvalue() + dataset_bytes(path.read_bytes())


def test_one_dataset_by_stow_rs_and_two_dimse_callers_is_stored_once_with_one_event(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    path = make_instance(tmp_path / "a.dcm")
    sent = _with_senders_meta(path)

    assert stow(ingest.stow_url, [sent]).status_code == 200
    first = pynetdicom_store(ingest.dimse_port, path, calling_ae="MODALITY1")
    assert first.status == StoreStatus.SUCCESS, first
    second = storescu(ingest.dimse_port, path, calling_ae="MODALITY2")
    assert second.returncode == 0, second.stderr

    (event,) = stack.events()
    assert event["data"]["sender"]["protocol"] == "stow-rs"
    assert len(stack.keys("original/")) == 1
    assert metric(ingest.url, INSTANCES, protocol="stow-rs", outcome="stored") == 1
    assert metric(ingest.url, INSTANCES, protocol="dimse", outcome="duplicate") == 2
    assert metric(ingest.url, INSTANCES, protocol="dimse", outcome="stored") == 0

    stored = stack.assert_event_matches_blob(event)
    assert stored[:132] == b"\x00" * 128 + b"DICM"
    assert dataset_bytes(stored) == dataset_bytes(sent)
    meta = pydicom.dcmread(io.BytesIO(stored)).file_meta
    assert sorted(e.keyword for e in meta) == sorted(
        [
            "FileMetaInformationGroupLength",
            "FileMetaInformationVersion",
            "MediaStorageSOPClassUID",
            "MediaStorageSOPInstanceUID",
            "TransferSyntaxUID",
            "ImplementationClassUID",
            "ImplementationVersionName",
        ]
    )
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.ImplementationVersionName == IMPLEMENTATION_VERSION_NAME
    assert meta.TransferSyntaxUID == event["data"]["transfer_syntax_uid"]
    assert meta.MediaStorageSOPInstanceUID == event["data"]["sop_instance_uid"]


def test_one_dataset_by_dimse_first_then_stow_rs_is_stored_once_with_one_event(
    stack: Stack, start_ingest, tmp_path: Path
) -> None:
    ingest: IngestProcess = start_ingest()
    path = make_instance(tmp_path / "a.dcm")

    result = pynetdicom_store(ingest.dimse_port, path, calling_ae="MODALITY1")
    assert result.status == StoreStatus.SUCCESS, result
    assert stow(ingest.stow_url, [_with_senders_meta(path)]).status_code == 200

    (event,) = stack.events()
    assert event["data"]["sender"]["calling_ae"] == "MODALITY1"
    assert metric(ingest.url, INSTANCES, protocol="stow-rs", outcome="duplicate") == 1
