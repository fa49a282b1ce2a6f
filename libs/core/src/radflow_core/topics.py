"""Topic names: the one list every service and the deployment share."""

from __future__ import annotations

from enum import StrEnum


class Topic(StrEnum):
    """Every Kafka topic of the pipeline, in flow order (see docs/events/README.md)."""

    INSTANCE_RECEIVED = "dicom.instance.received"
    """One event per instance stored by ingest (the claim check)."""
    INSTANCE_NORMALIZED = "dicom.instance.normalized"
    """One event per instance whose canonical lossless variant is stored (transcode)."""
    INSTANCE_FAILED = "dicom.instance.failed"
    """Dead letters of transcode: instances that cannot be decoded or normalized."""
