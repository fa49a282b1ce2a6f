"""Report-return metrics (Prometheus). The names are what the Grafana dashboard reads."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

SENT = Counter(
    "radflow_report_return_sent_total",
    "ORU^R01 messages written to a site's RIS (every attempt, retries included).",
    ["site"],
)
ACKS = Counter(
    "radflow_report_return_acks_total",
    "Answers from a site's RIS by code: AA, AE, AR, or invalid (unreadable, or not for "
    "the message sent).",
    ["site", "code"],
)
RETRIES = Counter(
    "radflow_report_return_retries_total",
    "Messages sent again after a timeout, a connection failure or an AE.",
    ["site"],
)
FAILED = Counter(
    "radflow_report_return_failed_total",
    "Reports put on report.failed, by site and reason.",
    ["site", "reason"],
)
ACK_LATENCY = Histogram(
    "radflow_report_return_ack_latency_seconds",
    "From writing a message to reading its acknowledgement.",
    ["site"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
ALREADY_RETURNED = Counter(
    "radflow_report_return_already_returned_total",
    "Replayed reports recognised as acknowledged and not sent again.",
    ["site"],
)
RULES_GENERATION = Gauge(
    "radflow_report_return_rules_generation",
    "How many valid rule files were applied since start (1 after start; 0 without one).",
)
RULES_VALID = Gauge(
    "radflow_report_return_rules_valid",
    "1 if the rule file on disk is the one in use; 0 if its last change was rejected.",
)
RULES_RELOADS = Counter(
    "radflow_report_return_rules_reloads_total",
    "Rule file changes seen, by outcome (applied, rejected).",
    ["outcome"],
)
OUTCOMES = Counter(
    "radflow_report_return_outcomes_total",
    "Outcomes by site and channel (oru, fhir): returned, failed (on report.failed), or "
    "already_returned (a replay recognised and not sent again).",
    ["site", "channel", "outcome"],
)
FHIR_REQUESTS = Counter(
    "radflow_report_return_fhir_requests_total",
    "Requests to a site's FHIR server by interaction (create, update) and HTTP status "
    "('none' when no answer came: not reached, timeout, no token).",
    ["site", "interaction", "status"],
)
FHIR_LATENCY = Histogram(
    "radflow_report_return_fhir_latency_seconds",
    "From sending a DiagnosticReport to the FHIR server's successful answer.",
    ["site"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FHIR_TOKENS = Counter(
    "radflow_report_return_fhir_tokens_total",
    "OAuth2 access tokens fetched for a site's FHIR server (first use, renewal before "
    "expiry, or after a 401).",
    ["site"],
)
