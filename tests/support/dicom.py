"""DICOM test data and senders: pydicom's bundled files, generated instances, DCMTK
storescu, and pynetdicom's SCU (including a raw sender for malformed requests)."""

from __future__ import annotations

import os
import subprocess
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
    ExplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config

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
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", generate_uid())
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
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
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
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
        assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
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


def _storescu_profile(path: Path, ts: str) -> Path:
    """A storescu config file proposing exactly ``ts`` for the file's SOP class (for
    syntaxes that have no -x option, e.g. JPEG Lossless process 14)."""
    sop_class = pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID
    config = path.with_suffix(".storescu.cfg")
    config.write_text(
        "[[TransferSyntaxes]]\n[Only]\nTransferSyntax1 = " + ts + "\n"
        "[[PresentationContexts]]\n[Ctx]\nPresentationContext1 = " + sop_class + "\\Only\n"
        "[[Profiles]]\n[Default]\nPresentationContexts = Ctx\n"
    )
    return config


# storescu's option proposing each transfer syntax (with the uncompressed ones).
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.2": "-xb",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.5": "-xr",
}


def storescu(
    port: int,
    *files: Path,
    ts: str | None = None,
    called_ae: str = "RADFLOW",
    calling_ae: str = "STORESCU",
    extra: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run DCMTK's storescu (TCP_NODELAY=1) and return its result (stderr has statuses)."""
    if ts in STORESCU_PROPOSE:
        propose = ["-R", STORESCU_PROPOSE[ts]]
    elif ts:
        propose = ["-xf", str(_storescu_profile(files[0], ts)), "Default"]
    else:
        propose = ["-R"]
    return subprocess.run(
        [
            "storescu",
            *propose,
            "-aet",
            calling_ae,
            "-aec",
            called_ae,
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "TCP_NODELAY": "1"},
    )
