"""Forward requests made straight from files, as the router would emit them: for the
forwarder's tests and benchmark, which need a backlog of routed instances without
running ingest, transcode and router first."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from radflow_core.blobstore import BlobStore, HashedFile, content_key
from radflow_core.events import ForwardRequested, Lane, Protocol, Sender


async def stored_request(
    blobs: BlobStore, path: Path, destination: str, source: str
) -> ForwardRequested:
    """Store the file as its canonical variant and return the routine forward request
    for it to ``destination`` (delivered as stored; ``source`` names who made it)."""
    ds, hashed = await asyncio.to_thread(_read, path)
    key = content_key("canonical", ds.StudyInstanceUID, hashed.sha256)
    stored = await blobs.put_file(key, hashed, "canonical", check_existing=False)
    now = datetime.now(UTC)
    identity = f"{ds.SOPInstanceUID}\n{hashed.sha256}\n{destination}"
    return ForwardRequested(
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        modality=ds.Modality,
        sender=Sender(protocol=Protocol.DIMSE, calling_ae=source.upper()[:16]),
        received_at=now,
        destination=destination,
        lane=Lane.ROUTINE,
        blob=stored.ref,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        requested_transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        original_sha256=hashed.sha256,
        rules=("everything",),
        rules_digest=source,
        idempotency_key=hashlib.sha256(identity.encode("utf-8")).hexdigest(),
        routed_at=now,
    )


def _read(path: Path) -> tuple[Dataset, HashedFile]:
    return pydicom.dcmread(path, stop_before_pixels=True), HashedFile.from_bytes(path.read_bytes())
