"""A reporting platform for the report-return tests: report documents (radflow.report
v1, with sentinel demographics) stored in the test's bucket and announced on
reports.finalized; and sites files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from radflow_core.blobstore import BlobStore, HashedFile, content_key
from radflow_core.events import ReportFinalized, ReportStatus
from radflow_core.kafka import EventProducer
from support.stack import Stack

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
FHIR_CLIENT = "radflow-report-return"
FHIR_SECRET = "fhir-client-secret"
"""The OAuth2 client the stand-in EHR (the fhir_server fixture) knows."""


def write_sites(path: Path, sites: dict[str, dict[str, Any]]) -> Path:
    """A sites file (YAML is a superset of JSON)."""
    path.write_text(json.dumps({"version": 1, "sites": sites}, indent=2))
    return path


def document(**overrides: Any) -> dict[str, Any]:
    """A report document (radflow.report v1) with sentinel demographics."""
    doc: dict[str, Any] = {
        "accession_number": "ACC-1001",
        "placer_order_number": "PL-77",
        "filler_order_number": "FI-88",
        "study_instance_uid": generate_uid(),
        "procedure": {"code": "CTCHEST", "meaning": "CT Chest w/o contrast", "scheme": "L"},
        "patient": {
            "identifiers": [{"id": "MRN-4711", "assigning_authority": "NORTH"}],
            "name": {"family": "SENTINEL", "given": "PHINAME"},
            "birth_date": "1970-01-01",
            "sex": "F",
        },
        "sections": [{"heading": "Findings", "text": "No acute findings."}],
        "impression": "Normal study.",
        "radiologist": {"id": "R-17", "name": {"family": "Reader", "given": "Rita"}},
        "signed_at": "2026-11-23T19:30:02+00:00",
    }
    doc.update(overrides)
    return doc


Publish = Callable[..., ReportFinalized]


def publisher(stack: Stack) -> Publish:
    """Store a report document and announce it; returns the event."""

    def publish(
        doc: dict[str, Any] | bytes,
        *,
        site: str = "north",
        report_id: str | None = None,
        version: int = 1,
        status: ReportStatus = ReportStatus.FINAL,
        study: str | None = None,
        sha256: str | None = None,
    ) -> ReportFinalized:
        raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        study = study or (doc.get("study_instance_uid") if isinstance(doc, dict) else None)
        study = study or generate_uid()

        async def run() -> ReportFinalized:
            blobs = BlobStore(stack.s3)
            producer = EventProducer(stack.kafka, "test-platform")
            await producer.start()
            try:
                hashed = HashedFile.from_bytes(raw)
                stored = await blobs.put_bytes(
                    content_key("report", study, hashed.sha256), raw, kind="report"
                )
                ref = stored.ref
                if sha256 is not None:
                    ref = ref.model_copy(update={"sha256": sha256})
                event = ReportFinalized(
                    report_id=report_id or f"R{generate_uid()[-12:]}",
                    report_version=version,
                    status=status,
                    site=site,
                    study_instance_uid=study,
                    document=ref,
                    signed_at=datetime.now(UTC),
                )
                await producer.publish(event, event.key)
                return event
            finally:
                await producer.stop()
                blobs.close()

        return asyncio.run(run())

    return publish


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, scheme, meaning
    return code


def _text_item(text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "TEXT"
    item.ConceptNameCodeSequence = [_code("121071", "DCM", "Finding")]
    item.TextValue = text
    return item


def _container(meaning: str, code: str, texts: list[str]) -> Dataset:
    item = Dataset()
    item.RelationshipType, item.ValueType = "CONTAINS", "CONTAINER"
    item.ContinuityOfContent = "SEPARATE"
    item.ConceptNameCodeSequence = [_code(code, "DCM", meaning)]
    item.ContentSequence = [_text_item(t) for t in texts]
    return item


def make_sr(
    path: Path,
    *,
    findings: list[str],
    impression: list[str],
    study: str | None = None,
    accession: str = "ACC-SR-1",
    patient_id: str = "MRN-4711",
    completion: str = "COMPLETE",
    verification: str = "VERIFIED",
) -> Path:
    """A Basic Text SR shaped like TID 2000 (Findings and Impression containers) with a
    verifying observer, the order it answers, and sentinel demographics."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = BASIC_TEXT_SR
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = "SENTINEL^PHINAME", patient_id, "NORTH"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.AccessionNumber = accession
    ds.StudyDate, ds.StudyTime = "20261123", "101500"
    ds.ContentDate, ds.ContentTime = "20261123", "120000"
    ds.StudyDescription = "CT Chest"
    request = Dataset()
    request.StudyInstanceUID = ds.StudyInstanceUID
    request.AccessionNumber = accession
    request.PlacerOrderNumberImagingServiceRequest = "PL-SR-9"
    request.FillerOrderNumberImagingServiceRequest = "FI-SR-9"
    request.RequestedProcedureDescription = "CT Chest w/o contrast"
    request.RequestedProcedureCodeSequence = [_code("CTCHEST", "L", "CT Chest w/o contrast")]
    ds.ReferencedRequestSequence = [request]
    observer = Dataset()
    observer.VerifyingObserverName = "Reader^Rita"
    observer.VerifyingOrganization = "Teleradiology"
    observer.VerificationDateTime = "20261123121500+0100"
    observer.VerifyingObserverIdentificationCodeSequence = [_code("R-17", "L", "Rita Reader")]
    ds.VerifyingObserverSequence = [observer]
    ds.CompletionFlag, ds.VerificationFlag = completion, verification
    ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
    ds.ConceptNameCodeSequence = [_code("18748-4", "LN", "Diagnostic imaging report")]
    ds.ContentSequence = [
        _container("Findings", "121070", findings),
        _container("Impressions", "121072", impression),
    ]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BASIC_TEXT_SR
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    return path
