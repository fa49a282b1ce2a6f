"""The file meta ingest writes and the streamed view of an original (pure, no I/O)."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ImplicitVRLittleEndian

from radflow_core.file_meta import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    CanonicalFile,
    dataset_offset,
    encode_file_meta,
)
from support.dicom import dataset_bytes, make_instance

SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"
SOP_INSTANCE = "1.2.3.4.5"


def _part10(meta: FileMetaDataset, dataset: bytes, *, enforce_standard: bool = True) -> bytes:
    buffer = io.BytesIO()
    buffer.write(b"\x07" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=enforce_standard)  # type: ignore[arg-type]
    return buffer.getvalue() + dataset


def _read_all(file: io.RawIOBase, size: int) -> bytes:
    out = bytearray()
    while chunk := file.read(size):
        out += chunk
    return bytes(out)


def test_meta_has_radflows_implementation_and_nothing_of_the_sender() -> None:
    encoded = encode_file_meta(SOP_CLASS, SOP_INSTANCE, ImplicitVRLittleEndian)
    assert encoded[:132] == b"\x00" * 128 + b"DICM"
    meta = pydicom.dcmread(io.BytesIO(encoded)).file_meta
    assert {e.keyword: e.value for e in meta} == {
        "FileMetaInformationGroupLength": len(encoded) - 132 - 12,
        "FileMetaInformationVersion": b"\x00\x01",
        "MediaStorageSOPClassUID": SOP_CLASS,
        "MediaStorageSOPInstanceUID": SOP_INSTANCE,
        "TransferSyntaxUID": ImplicitVRLittleEndian,
        "ImplementationClassUID": IMPLEMENTATION_CLASS_UID,
        "ImplementationVersionName": IMPLEMENTATION_VERSION_NAME,
    }
    assert encode_file_meta(SOP_CLASS, SOP_INSTANCE, ImplicitVRLittleEndian) == encoded


def test_dataset_offset_ends_any_senders_meta(tmp_path: Path) -> None:
    path = make_instance(tmp_path / "a.dcm")
    dataset = dataset_bytes(path.read_bytes())
    meta = pydicom.dcmread(path).file_meta
    meta.SourceApplicationEntityTitle = "VIEWER1"
    meta.PrivateInformationCreatorUID = UID("1.2.3")
    meta.PrivateInformation = b"\x01\x02" * 300
    raw = _part10(meta, dataset)
    assert raw[dataset_offset(io.BytesIO(raw)) :] == dataset
    # A meta without group length (non-conformant, still read) ends where pydicom says.
    del meta.FileMetaInformationGroupLength
    raw = _part10(meta, dataset, enforce_standard=False)
    assert raw[dataset_offset(io.BytesIO(raw)) :] == dataset


@pytest.mark.parametrize("chunk", [1, 7, 100, 1 << 20])
def test_canonical_file_streams_meta_then_the_received_dataset(chunk: int) -> None:
    head = encode_file_meta(SOP_CLASS, SOP_INSTANCE, ImplicitVRLittleEndian)
    received = b"sender's meta" + bytes(range(256)) * 40
    with tempfile.TemporaryFile() as file:
        file.write(received)
        view = CanonicalFile(head, file, offset=13)
        expected = head + received[13:]
        assert view.size == len(expected)
        assert _read_all(view, chunk) == expected
        assert view.read(10) == b""
        view.seek(len(head) - 3)
        assert view.read(10) == expected[len(head) - 3 : len(head) + 7]
        view.seek(-5, io.SEEK_END)
        assert view.read() == expected[-5:]


def test_conformance_statement_names_the_implementation_written() -> None:
    conformance = Path(__file__).parents[2] / "docs" / "conformance.md"
    text = " ".join(conformance.read_text().split())
    assert f"Implementation Class UID `{IMPLEMENTATION_CLASS_UID}`" in text
    assert f"Implementation Version Name `{IMPLEMENTATION_VERSION_NAME}`" in text


def _pydicom_meta(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("sop_instance", "syntax"),
    [
        ("1.2.3.4.5", "1.2.840.10008.1.2.1"),  # odd length: padded
        ("1.2.3.4.56", "1.2.840.10008.1.2"),  # even length
        ("1." + "2" * 62, "1.2.840.10008.1.2.4.80"),  # 64 characters
        ("1.2.840.113619.2.55.3.604688119.969.1268071029.320", "1.2.840.10008.1.2.4.90"),
    ],
)
def test_meta_bytes_are_pydicoms_exactly(sop_instance: str, syntax: str) -> None:
    # Every stored original's sha256 depends on these bytes: the hand encoding must
    # never drift from what pydicom wrote for the originals stored before it.
    assert encode_file_meta(SOP_CLASS, sop_instance, syntax) == _pydicom_meta(
        SOP_CLASS, sop_instance, syntax
    )
