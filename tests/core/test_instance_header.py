"""The Part 10 header reader on pydicom's bundled good and broken files."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info

from radflow_core.dicom_status import StoreStatus
from radflow_core.instance_header import (
    Accession,
    InvalidInstance,
    read_header,
    read_header_and_identifiers,
    read_header_and_patient,
    read_patient_id,
)
from support.dicom import PHI_ID, bundled_file, dataset_bytes, make_instance
from support.nesting import deeply_nested


def _read(data: bytes):  # type: ignore[no-untyped-def]
    return read_header(io.BytesIO(data), len(data))


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("no_meta.dcm", StoreStatus.CANNOT_UNDERSTAND),
        ("MR_truncated.dcm", StoreStatus.CANNOT_UNDERSTAND),
        ("meta_missing_tsyntax.dcm", StoreStatus.MISSING_ATTRIBUTE),
        ("JPEGLSNearLossless_08.dcm", StoreStatus.MISSING_ATTRIBUTE),  # no Study UID
        ("UN_sequence.dcm", StoreStatus.MISSING_ATTRIBUTE),
    ],
)
def test_broken_files_get_the_status_that_names_the_problem(name: str, status: StoreStatus) -> None:
    with pytest.raises(InvalidInstance) as info:
        _read(bundled_file(name).read_bytes())
    assert info.value.status is status


@pytest.mark.parametrize(
    "name",
    ["CT_small.dcm", "MR_small_bigendian.dcm", "image_dfl.dcm", "JPEG2000.dcm", "test-SR.dcm"],
)
def test_good_files_yield_their_identifying_attributes(name: str) -> None:
    header = _read(bundled_file(name).read_bytes())
    assert header.sop_instance_uid and header.study_instance_uid and header.series_instance_uid


def test_deep_nesting_is_refused_not_a_crash(tmp_path: Path) -> None:
    base = make_instance(tmp_path / "a.dcm").read_bytes()
    assert _read(deeply_nested(base, 50)).modality == "CT"
    with pytest.raises(InvalidInstance) as info:
        _read(deeply_nested(base, 20000))
    assert info.value.status is StoreStatus.CANNOT_UNDERSTAND
    assert "nested" in info.value.detail


def test_unaccepted_transfer_syntax_is_refused(tmp_path: Path) -> None:
    raw = make_instance(tmp_path / "a.dcm").read_bytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3"
    meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: explicit VR LE framing
    out = io.BytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta)
    data = out.getvalue() + dataset_bytes(raw)
    with pytest.raises(InvalidInstance) as info:
        _read(data)
    assert info.value.status is StoreStatus.TRANSFER_SYNTAX_NOT_SUPPORTED


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"RequestedProcedurePriority": "STAT"}, "STAT"),
        ({"RequestedProcedurePriority": "ROUTINE "}, "ROUTINE"),
        ({}, None),
    ],
    ids=["stat", "routine-padded", "absent"],
)
def test_requested_procedure_priority_is_read_from_the_top_level(
    tmp_path: Path, extra: dict[str, str], expected: str | None
) -> None:
    path = make_instance(tmp_path / "a.dcm", extra=extra)
    assert _read(path.read_bytes()).requested_procedure_priority == expected


def test_requested_procedure_priority_is_found_in_the_request_attributes_sequence(
    tmp_path: Path,
) -> None:
    item = Dataset()
    item.RequestedProcedureID = "RP1"
    item.RequestedProcedurePriority = "STAT"
    path = make_instance(tmp_path / "a.dcm", extra={"RequestAttributesSequence": [item]})
    assert _read(path.read_bytes()).requested_procedure_priority == "STAT"


class _Counting(io.BytesIO):
    """Remembers how far into the file anything was read."""

    furthest = 0

    def read(self, size: int | None = -1) -> bytes:
        data = super().read(size)
        self.furthest = max(self.furthest, self.tell())
        return data


def test_the_audit_patient_id_is_read_from_the_start_of_the_file_only(tmp_path: Path) -> None:
    """The forwarder reads it with ranged GETs: nothing after (0010,0020) is fetched."""
    data = make_instance(tmp_path / "a.dcm", rows=256, columns=256).read_bytes()
    counting = _Counting(data)
    assert read_patient_id(counting) == PHI_ID
    assert counting.furthest < 2048 < len(data)
    header, patient = read_header_and_patient(io.BytesIO(data), len(data))
    assert patient == PHI_ID
    assert PHI_ID not in repr(header), "the header stays PHI-free"


def test_an_instance_without_a_patient_id_has_no_audit_patient(tmp_path: Path) -> None:
    path = make_instance(tmp_path / "a.dcm")
    ds = pydicom.dcmread(path)
    del ds.PatientID
    ds.save_as(path)
    assert read_patient_id(io.BytesIO(path.read_bytes())) is None


def test_the_accession_number_and_its_issuer_are_read_apart_from_the_header(
    tmp_path: Path,
) -> None:
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "RIS_A "
    path = make_instance(
        tmp_path / "a.dcm",
        extra={"AccessionNumber": "ACC42 ", "IssuerOfAccessionNumberSequence": [issuer]},
    )
    data = path.read_bytes()
    header, identifiers = read_header_and_identifiers(io.BytesIO(data), len(data))
    assert identifiers.accession == Accession("ACC42", "RIS_A")
    assert "ACC42" not in repr(header) + repr(identifiers), "never in a log line"
    bare = make_instance(tmp_path / "b.dcm", extra={"AccessionNumber": "ACC43"}).read_bytes()
    assert read_header_and_identifiers(io.BytesIO(bare), len(bare))[1].accession == Accession(
        "ACC43", None
    )
    none = make_instance(tmp_path / "c.dcm").read_bytes()
    assert read_header_and_identifiers(io.BytesIO(none), len(none))[1].accession is None
