"""Forwarder metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

DELIVERED = Counter(
    "radflow_forwarder_delivered_total",
    "Instances a destination acknowledged, by destination and lane.",
    ["destination", "lane"],
)
SKIPPED = Counter(
    "radflow_forwarder_already_delivered_total",
    "Replayed requests recognised as delivered and not sent again.",
    ["destination"],
)
FAILED = Counter(
    "radflow_forwarder_failed_total",
    "Instances sent to dicom.forward.failed, by destination and reason.",
    ["destination", "reason"],
)
VERIFIED = Counter(
    "radflow_forwarder_verified_total",
    "Delivered instances the destination was asked about afterwards and holds, by "
    "destination and method (qido, storage-commitment).",
    ["destination", "method"],
)
VERIFICATION_FAILURES = Counter(
    "radflow_forwarder_verification_failures_total",
    "Instances a destination acknowledged and did not hold when asked afterwards "
    "(not_held_after_delivery on dicom.forward.failed), by destination.",
    ["destination"],
)
VERIFY_CHECKS = Counter(
    "radflow_forwarder_verification_checks_total",
    "Questions asked to verify deliveries (QIDO-RS searches, storage commitment "
    "requests), by destination.",
    ["destination"],
)
RETRIED = Counter(
    "radflow_forwarder_retries_total",
    "Requests retried after a retriable failure, by destination and cause.",
    ["destination", "cause"],
)
IN_FLIGHT = Gauge(
    "radflow_forwarder_in_flight", "Instances being sent now, by destination.", ["destination"]
)
CIRCUIT = Gauge(
    "radflow_forwarder_circuit_state",
    "Circuit breaker per destination: 0 closed, 1 half-open (probing), 2 open.",
    ["destination"],
)
LATENCY = Histogram(
    "radflow_forwarder_delivery_latency_seconds",
    "From ingest receiving an instance to the destination acknowledging it.",
    ["destination", "lane"],
    # 120, 600 and 1800 s: the usual STAT and routine objectives, so the quantiles
    # drawn against them are not interpolated across 5 to 60 minutes. (The objectives
    # themselves are counted exactly, in SLO_DELIVERIES.)
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 900, 1800, 3600),
)
REQUEST_SECONDS = Histogram(
    "radflow_forwarder_request_seconds",
    "Duration of one STOW-RS request, by destination and HTTP status class.",
    ["destination", "status"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)
BATCH_SIZE = Histogram(
    "radflow_forwarder_batch_instances",
    "Instances per STOW-RS request.",
    ["destination"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200),
)
UNKNOWN_DESTINATION = Counter(
    "radflow_forwarder_unknown_destination_total",
    "Forward requests for a destination the rule file does not define, reported on "
    "dicom.instance.held, by the destination they name.",
    ["destination"],
)
DESTINATIONS = Gauge(
    "radflow_forwarder_destinations", "Destinations being delivered to (from the rule file)."
)
RULES_GENERATION = Gauge(
    "radflow_forwarder_rules_generation",
    "How many valid rule files were applied since start (1 after start).",
)
RULES_VALID = Gauge(
    "radflow_forwarder_rules_valid",
    "1 if the rule file on disk is the one in use; 0 if its last change was rejected.",
)
RULES_RELOADS = Counter(
    "radflow_forwarder_rules_reloads_total",
    "Rule file changes seen, by outcome (applied, rejected).",
    ["outcome"],
)
SLO_DELIVERIES = Counter(
    "radflow_forwarder_slo_deliveries_total",
    "Instances of a destination and lane that has a latency objective, by outcome: "
    "within (acknowledged within the objective's seconds of ingest receiving it), over "
    "(acknowledged later) or failed (sent to dicom.forward.failed). Exact, unlike "
    "interpolating the latency histogram's buckets: the burn-rate alerts read it.",
    ["destination", "lane", "outcome"],
)
SLO_TARGET = Gauge(
    "radflow_forwarder_slo_target_seconds",
    "The latency objective's threshold from the rule file (slo.<lane>.within_s), by "
    "destination and lane.",
    ["destination", "lane"],
)
SLO_OBJECTIVE = Gauge(
    "radflow_forwarder_slo_objective_ratio",
    "Share of instances that must be delivered within the threshold (slo.<lane>.percent "
    "/ 100), by destination and lane; 1 minus it is the error budget.",
    ["destination", "lane"],
)
DEIDENTIFIED = Counter(
    "radflow_forwarder_deidentified_total",
    "Instances de-identified before delivery (DICOM PS3.15 Annex E), by destination and profile.",
    ["destination", "profile"],
)
DEIDENTIFY_REFUSED = Counter(
    "radflow_forwarder_deidentify_refused_total",
    "Instances of a de-identifying route sent to dicom.forward.failed instead of being "
    "delivered, by destination, profile and reason (burned_in_annotation, "
    "cannot_deidentify, deidentification_key_missing).",
    ["destination", "profile", "reason"],
)
