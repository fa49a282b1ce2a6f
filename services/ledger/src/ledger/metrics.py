"""Ledger metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

OVERDUE = Gauge(
    "radflow_ledger_overdue_instances",
    "Instances routed to a destination longer ago than RADFLOW_LEDGER_OVERDUE_AFTER_S that "
    "have not reached it (delivered, or verified where verification is on) and have not "
    "failed, per destination, in the partitions this replica owns.",
    ["destination"],
)
STUDIES = Gauge(
    "radflow_ledger_studies", "Studies the ledger keeps, in the partitions this replica owns."
)
STUDIES_DELIVERED = Counter(
    "radflow_ledger_studies_delivered_total",
    "dicom.study.delivered events published (a study delivered again with more instances "
    "counts again).",
)
