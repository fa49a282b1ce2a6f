"""Topic names: the one list every service and the deployment share."""

from __future__ import annotations

from enum import StrEnum


class Topic(StrEnum):
    """Every Kafka topic of the pipeline, in flow order (see docs/events/README.md)."""

    INSTANCE_RECEIVED = "dicom.instance.received"
    """One event per instance stored by ingest (the claim check), routine lane."""
    INSTANCE_RECEIVED_STAT = "dicom.instance.received.stat"
    """The same for instances ingest puts in the STAT lane (the rule file's ``stat:``
    policy); transcode reads it ahead of the routine lane."""
    INSTANCE_NORMALIZED = "dicom.instance.normalized"
    """One event per instance whose canonical lossless variant is stored (transcode),
    routine lane."""
    INSTANCE_NORMALIZED_STAT = "dicom.instance.normalized.stat"
    """The same for the STAT lane; the router reads it ahead of the routine lane."""
    INSTANCE_PREVIEW = "dicom.instance.preview"
    """One event per lossy preview instance transcode derived from an original (a new,
    DERIVED\\SECONDARY instance, never a replacement); the router sends it ahead of the
    full series, in the STAT lane, to destinations whose route asks for previews."""
    INSTANCE_FAILED = "dicom.instance.failed"
    """Dead letters of transcode: instances that cannot be decoded or normalized."""
    FORWARD_REQUESTED = "dicom.forward.requested"
    """One event per (instance, destination) to deliver in the routine lane (router)."""
    FORWARD_REQUESTED_STAT = "dicom.forward.requested.stat"
    """The same for the STAT lane; forwarders read it ahead of the routine lane."""
    FORWARD_COMPLETED = "dicom.forward.completed"
    """One event per instance delivered to one destination (stow-forwarder)."""
    FORWARD_VERIFIED = "dicom.forward.verified"
    """One event per delivered instance that its destination was asked about afterwards
    and proved to hold (stow-forwarder; destinations with ``verify:`` only)."""
    FORWARD_FAILED = "dicom.forward.failed"
    """Dead letters of delivery: what a destination refused or what ran out of retries."""
    STUDY_DELIVERED = "dicom.study.delivered"
    """One event each time every routed instance of a study has reached every destination
    it was routed to (verified where verification is on), after a quiet period (ledger)."""
    INSTANCE_HELD = "dicom.instance.held"
    """Instances no rule routed and whose default is a hold, with the reason (router)."""
    WORKLIST_ITEMS = "worklist.items"
    """Compacted: the open scheduled procedure steps of every site's orders, keyed
    ``<site>/<accession>/<step>``; a cancel or completion is a tombstone (worklist).
    Demographics stay in the order document in the blob store."""
    REPORTS_FINALIZED = "reports.finalized"
    """One event per signed report version to return to the ordering site's RIS (from
    the reporting platform); the report itself is a document in the blob store."""
    REPORT_RETURNED = "report.returned"
    """One event per report the site's RIS acknowledged with AA (report-return)."""
    REPORT_FAILED = "report.failed"
    """Dead letters of report-return: reports not returned, with the reason and the
    coded part of the RIS's acknowledgement when it answered."""
    ROUTER_PENDING = "radflow.router.pending"
    """Internal changelog of the router's studies waiting to be complete (compacted;
    partitioned like dicom.instance.normalized). Not a feed for downstream use."""
    ROUTER_PENDING_STAT = "radflow.router.pending.stat"
    """The same for the STAT lane (partitioned like dicom.instance.normalized.stat)."""
    LEDGER = "radflow.ledger"
    """Internal changelog of the ledger's per-study delivery state (compacted; partitioned
    like the forward topics it is built from). Not a feed for downstream use."""
    AUDIT = "radflow.audit"
    """DICOM audit messages (PS3.15 A.5) from every service: instances received and
    transferred, reports sent, authentication failures, configuration changes, start
    and stop (see docs/security.md, Audit trail)."""


STAT_LANE: dict[Topic, Topic] = {
    Topic.INSTANCE_RECEIVED: Topic.INSTANCE_RECEIVED_STAT,
    Topic.INSTANCE_NORMALIZED: Topic.INSTANCE_NORMALIZED_STAT,
    Topic.FORWARD_REQUESTED: Topic.FORWARD_REQUESTED_STAT,
    Topic.ROUTER_PENDING: Topic.ROUTER_PENDING_STAT,
}
"""Routine topic → its STAT-lane twin. Each stage on the instance path reads the STAT
twin with a consumer of its own, so STAT work never queues behind a routine backlog."""
