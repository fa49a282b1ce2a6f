"""Ingest metrics (Prometheus). Names are part of the dashboards' contract.

With RADFLOW_INGEST_WORKERS > 1 every worker writes its values to files shared with
the parent (prometheus_client's multiprocess mode), which serves one /metrics for the
pod: counters and histograms are summed across workers (dead ones included, so
totals never go back), and each gauge says how its workers' values combine.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from radflow_core.events import Lane, Protocol

INSTANCES = Counter(
    "radflow_ingest_instances_total",
    "Instances received, by protocol and outcome (stored, duplicate, or a status label).",
    ["protocol", "outcome"],
)
BYTES = Counter("radflow_ingest_bytes_total", "Bytes of instances stored.", ["protocol"])
STORE_SECONDS = Histogram(
    "radflow_ingest_store_seconds",
    "Claim-check duration per instance (hash, parse, blob, event), by protocol.",
    ["protocol"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30),
)
LANES = Counter(
    "radflow_ingest_lane_total",
    "Instances announced, by the lane their event was published in (stat, routine).",
    ["lane"],
)
ORDER_MATCHES = Counter(
    "radflow_ingest_order_matches_total",
    "Instances announced whose accession number matched an open order of "
    "worklist.items, by the lane their event was published in (a STAT order: stat).",
    ["lane"],
)
ORDER_ITEMS = Gauge(
    "radflow_ingest_order_items",
    "Open worklist items (scheduled procedure steps) known to the order lookup; with "
    "workers, the highest among the living ones.",
    multiprocess_mode="livemax",
)
ORDER_TABLE_LOADED = Gauge(
    "radflow_ingest_order_table_loaded",
    "1 once worklist.items was read to its end; 0 before and while it cannot be read "
    "(instances are then matched with the orders known so far: none at start). With "
    "workers: 0 if any living worker's is 0.",
    multiprocess_mode="livemin",
)
RULES_GENERATION = Gauge(
    "radflow_ingest_rules_generation",
    "Rule-file versions applied since start (ingest reads its STAT policy); with "
    "workers, the highest among the living ones.",
    multiprocess_mode="livemax",
)
RULES_VALID = Gauge(
    "radflow_ingest_rules_valid",
    "1 while the rule file in force is the file on disk (or none is configured); 0 "
    "after a rejected change, or while no valid file was seen (every instance then "
    "takes the routine lane). With workers: 0 if any living worker's is 0.",
    multiprocess_mode="livemin",
)
RULES_RELOADS = Counter(
    "radflow_ingest_rules_reloads_total", "Rule-file changes, by outcome.", ["outcome"]
)
ASSOCIATIONS = Gauge(
    "radflow_ingest_associations_active",
    "Open DIMSE associations (of every living worker).",
    multiprocess_mode="livesum",
)
WORKER_CONNECTIONS = Counter(
    "radflow_ingest_worker_connections_total",
    "Connections accepted on the DIMSE listeners (plain and TLS), by worker process "
    "(0 to RADFLOW_INGEST_WORKERS-1; 0 when there is one): how evenly the kernel "
    "spreads senders across the workers sharing the ports.",
    ["worker"],
)
ASSOCIATIONS_REJECTED = Counter(
    "radflow_ingest_associations_rejected_total",
    "Association requests refused, by reason: calling_ae_not_allowed (allow-list), "
    "certificate_not_allowed (DICOM TLS certificate not mapped to the calling AE), "
    "sender_limit (the sender's concurrent associations).",
    ["reason"],
)
TLS_HANDSHAKE_FAILURES = Counter(
    "radflow_ingest_tls_handshake_failures_total",
    "DICOM TLS connections whose handshake failed (no, untrusted or expired client "
    "certificate, no common protocol version, timeout).",
)
STOW_REQUESTS = Counter(
    "radflow_ingest_stow_requests_total", "STOW-RS requests by HTTP status.", ["status"]
)
AUTH_FAILURES = Counter(
    "radflow_ingest_auth_failures_total",
    "STOW-RS requests refused by authentication, by reason (missing, expired, "
    "audience, issuer, signature, unknown_key, algorithm, scope, api_key, not_allowed, "
    "issuer_unavailable, ...).",
    ["reason"],
)


def _announce_outcomes() -> None:
    """Give the success series a zero from the start: Prometheus computes increase()
    from the samples it has, so a series born at 1 on the first instance would hide
    that instance, and the quiet-ingest alert would count a fresh pod's first hour of
    traffic as none."""
    for protocol in Protocol:
        BYTES.labels(protocol.value)
        STORE_SECONDS.labels(protocol.value)
        for outcome in ("stored", "duplicate"):
            INSTANCES.labels(protocol.value, outcome)
    for lane in Lane:
        LANES.labels(lane.value)
        ORDER_MATCHES.labels(lane.value)
    # Refusals too (the reasons ASSOCIATIONS_REJECTED names): the dashboard's rate()
    # then draws a lone refused association, not 0.
    for reason in ("calling_ae_not_allowed", "certificate_not_allowed", "sender_limit"):
        ASSOCIATIONS_REJECTED.labels(reason)


_announce_outcomes()
