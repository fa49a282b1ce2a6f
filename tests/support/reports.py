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

from pydicom.uid import generate_uid

from radflow_core.blobstore import BlobStore, HashedFile, content_key
from radflow_core.events import ReportFinalized, ReportStatus
from radflow_core.kafka import EventProducer
from support.stack import Stack


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
