"""Structured Reports as report documents: text, headings, observer, order and patient
from pydicom's bundled SR files and from TID 2000-shaped reports."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from report_return.report import (
    MissingAccessionNumber,
    MissingPatientIdentifier,
    NotComplete,
    NotVerified,
    UnreadableReport,
)
from report_return.sr import document_from_sr
from support.dicom import bundled_file
from support.reports import make_sr


def with_order(name: str) -> bytes:
    ds = pydicom.dcmread(bundled_file(name))
    ds.AccessionNumber, ds.PatientID = "A1", "P1"
    out = io.BytesIO()
    ds.save_as(out)
    return out.getvalue()


def test_the_bundled_comprehensive_sr_becomes_its_text_in_document_order() -> None:
    doc = document_from_sr(with_order("test-SR.dcm"))
    (section,) = doc.sections
    assert section.heading == "Diagnosis"
    assert section.text.splitlines() == [
        "A mass of 3 cm was detected.",  # a CONTINUOUS container: one paragraph
        "A mass of",
        "Diameter: 3 cm",
        "was detected.",
        "Sample Text",
        "A",
        "B",
        "C",
        "",
        "Inferred Sample Text",
        "New line.",
        "",
        '&%$§"!()<>{}/;',
        "Code: Sample Code 3",
        "Code: Sample Code 2",
        "Sample Text 2",
    ]
    assert doc.radiologist.id == "1705" and doc.radiologist.name.given == "Jörg"
    assert doc.signed_at == datetime(2001, 2, 13, 18, 47, 46, tzinfo=UTC)
    assert doc.procedure is not None
    assert doc.procedure.meaning == "OFFIS Structured Reporting Test Document"


def test_headings_codes_order_and_patient_of_a_tid_2000_report(tmp_path: Path) -> None:
    path = make_sr(tmp_path / "r.dcm", findings=["one", "two"], impression=["three"])
    doc = document_from_sr(path.read_bytes())
    assert [(s.heading, s.code.code if s.code else None, s.text) for s in doc.sections] == [
        ("Findings", "121070", "one\ntwo"),
        ("Impressions", "121072", "three"),
    ]
    assert (doc.accession_number, doc.placer_order_number, doc.filler_order_number) == (
        "ACC-SR-1",
        "PL-SR-9",
        "FI-SR-9",
    )
    (identifier,) = doc.patient.identifiers
    assert (identifier.id, identifier.assigning_authority) == ("MRN-4711", "NORTH")
    assert doc.patient.sex == "F" and str(doc.patient.birth_date) == "1970-01-01"
    assert doc.signed_at.isoformat() == "2026-11-23T12:15:00+01:00"


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"completion": "PARTIAL"}, NotComplete),
        ({"verification": "UNVERIFIED"}, NotVerified),
        ({"accession": ""}, MissingAccessionNumber),
        ({"patient_id": ""}, MissingPatientIdentifier),
    ],
)
def test_reports_that_cannot_be_returned(tmp_path: Path, change: dict, error: type) -> None:
    path = make_sr(tmp_path / "r.dcm", findings=["x"], impression=[], **change)
    with pytest.raises(error):
        document_from_sr(path.read_bytes())


def test_the_bundled_partial_sr_and_non_sr_files_are_refused() -> None:
    with pytest.raises(NotComplete):
        document_from_sr(bundled_file("reportsi.dcm").read_bytes())
    with pytest.raises(UnreadableReport, match="not a Structured Report"):
        document_from_sr(bundled_file("CT_small.dcm").read_bytes())
    with pytest.raises(UnreadableReport, match="not a readable DICOM"):
        document_from_sr(b"not dicom at all")
