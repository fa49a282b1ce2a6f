"""Worklist metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ORDERS = Counter(
    "radflow_worklist_orders_total",
    "HL7 order messages received, by sending site (unknown: not in the sites file), "
    "message type (ORM^O01, OMI^O23, other) and the acknowledgement they got (AA, AE, AR).",
    ["site", "message_type", "ack"],
)
CHANGES = Counter(
    "radflow_worklist_item_changes_total",
    "Scheduled procedure steps written to worklist.items by this replica, by change "
    "(upsert, remove).",
    ["change"],
)
OPEN_ITEMS = Gauge(
    "radflow_worklist_open_items",
    "Open scheduled procedure steps in the merged view, per site.",
    ["site"],
)
FIND_REQUESTS = Counter(
    "radflow_worklist_find_requests_total",
    "Modality Worklist C-FIND requests, by the calling AE's site and outcome (success, "
    "failed, cancelled).",
    ["site", "outcome"],
)
FIND_SECONDS = Histogram(
    "radflow_worklist_find_seconds",
    "From a C-FIND request to its last answer built (matching included, network excluded).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
FIND_MATCHES = Histogram(
    "radflow_worklist_find_matches",
    "Items returned per C-FIND request.",
    buckets=(0, 1, 2, 5, 10, 25, 50, 100, 250, 1000),
)
ASSOCIATIONS_REJECTED = Counter(
    "radflow_worklist_associations_rejected_total",
    "Worklist associations rejected, by reason (unknown_calling_ae).",
    ["reason"],
)
RESTORED = Gauge(
    "radflow_worklist_restored_items",
    "Open steps read back from worklist.items at the last start.",
)
