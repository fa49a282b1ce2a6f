"""DICOM test data and senders: pydicom's bundled files, generated instances, and
pynetdicom's SCU (including a raw sender for malformed requests). DCMTK's storescu is
in :mod:`radflow_devstack.kit.dcmtk`."""

from __future__ import annotations

import io
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    generate_uid,
)
from pynetdicom import AE, _config

from radflow_core.file_meta import encode_file_meta
from radflow_core.scu import keep_responses
from radflow_devstack.kit.part10 import write_part10

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
PHI_NAME = "SENTINEL^PHINAME"
PHI_ID = "SENTINEL-PHI-ID-4711"


def bundled_file(name: str) -> Path:
    """A file bundled with pydicom (never get_testdata_file: it downloads when missing)."""
    path = TEST_FILES / name
    assert path.exists(), f"pydicom test file {name} missing"
    return path


def dataset_bytes(raw: bytes) -> bytes:
    """The encoded dataset of a Part 10 file, without preamble and file meta."""
    return raw[_meta_end(raw) :]


def as_stored(sent: bytes) -> bytes:
    """What ingest stores for a Part 10 file sent to it: its own file meta (radflow's
    implementation, nothing of the sender's), then the data set bytes exactly as sent."""
    ds = pydicom.dcmread(io.BytesIO(sent), stop_before_pixels=True)
    meta = encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ds.file_meta.TransferSyntaxUID)
    return meta + dataset_bytes(sent)


def _meta_end(raw: bytes) -> int:
    """Offset where the dataset starts in a Part 10 file (after the group 0002 elements)."""
    offset = 132
    while offset + 8 <= len(raw):
        group = int.from_bytes(raw[offset : offset + 2], "little")
        if group != 0x0002:
            return offset
        vr = raw[offset + 4 : offset + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            length = int.from_bytes(raw[offset + 8 : offset + 12], "little")
            offset += 12 + length
        else:
            length = int.from_bytes(raw[offset + 6 : offset + 8], "little")
            offset += 8 + length
    return offset


def make_instance(
    path: Path,
    *,
    sop_instance_uid: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    sop_class_uid: str = CT_IMAGE_STORAGE,
    modality: str = "CT",
    rows: int = 16,
    columns: int = 16,
    omit: tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a small CT-like instance (with sentinel demographics) to ``path``; UIDs are
    written as given, even invalid ones; ``extra`` sets more attributes by keyword."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on the invalid UIDs tests ask for
        return _make_instance(
            path,
            sop_instance_uid=sop_instance_uid,
            study_instance_uid=study_instance_uid,
            series_instance_uid=series_instance_uid,
            sop_class_uid=sop_class_uid,
            modality=modality,
            rows=rows,
            columns=columns,
            omit=omit,
            extra=extra or {},
        )


def _make_instance(
    path: Path,
    *,
    sop_instance_uid: str | None,
    study_instance_uid: str | None,
    series_instance_uid: str | None,
    sop_class_uid: str,
    modality: str,
    rows: int,
    columns: int,
    omit: tuple[str, ...],
    extra: dict[str, Any],
) -> Path:
    ds = Dataset()
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid or generate_uid()
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.Modality = modality
    ds.BodyPartExamined = "CHEST"
    ds.PatientName = PHI_NAME
    ds.PatientID = PHI_ID
    ds.PatientBirthDate = "19700101"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes(range(256)) * (rows * columns * 2 // 256 + 1)
    ds.PixelData = ds.PixelData[: rows * columns * 2]
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    for keyword in omit:
        delattr(ds, keyword)
    write_part10(
        path,
        ds,
        sop_class_uid=sop_class_uid,
        sop_instance_uid=ds.get("SOPInstanceUID", generate_uid()),
    )
    return path


@dataclass(frozen=True)
class StoreResult:
    status: int
    comment: str | None


PRIORITY = {"medium": 0, "high": 1, "low": 2}
"""DIMSE C-STORE Priority values."""


def pynetdicom_store(
    port: int,
    path: Path,
    called_ae: str = "RADFLOW",
    calling_ae: str = "PYSCU",
    priority: str = "medium",
) -> StoreResult:
    """Send one file with pynetdicom's SCU, proposing the file's own transfer syntax."""
    ds = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title=called_ae))
    assert assoc.is_established, "association not established"
    try:
        rsp = assoc.send_c_store(ds, priority=PRIORITY[priority])
    finally:
        assoc.release()
    assert rsp is not None and "Status" in rsp, "no C-STORE response"
    return StoreResult(int(rsp.Status), rsp.get("ErrorComment"))


def raw_store(
    port: int,
    *,
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    data: bytes,
    called_ae: str = "RADFLOW",
) -> StoreResult:
    """A C-STORE whose command UIDs and data set bytes are exactly as given.

    pynetdicom's chunked send mode takes the command UIDs from a file's meta and sends
    the bytes after it unparsed, which is how a broken or lying sender looks.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "raw.dcm"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class_uid
        meta.MediaStorageSOPInstanceUID = sop_instance_uid
        meta.TransferSyntaxUID = transfer_syntax
        with path.open("wb") as f:
            f.write(b"\0" * 128 + b"DICM")
            write_file_meta_info(f, meta)
            f.write(data)
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context(sop_class_uid, [transfer_syntax])
        assoc = keep_responses(ae.associate("127.0.0.1", port, ae_title=called_ae))
        assert assoc.is_established
        previous = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            rsp = assoc.send_c_store(path)
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = previous
            assoc.release()
    assert rsp is not None and "Status" in rsp, "no C-STORE response"
    return StoreResult(int(rsp.Status), rsp.get("ErrorComment"))
