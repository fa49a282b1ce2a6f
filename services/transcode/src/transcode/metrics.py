"""Transcode metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INSTANCES = Counter(
    "radflow_transcode_instances_total",
    "Instances handled, by outcome (decode status or failure reason) and target syntax.",
    ["outcome", "target"],
)
BYTES = Counter(
    "radflow_transcode_bytes_total", "Bytes read (original) and written (canonical).", ["direction"]
)
RATIO = Histogram(
    "radflow_transcode_compression_ratio",
    "Original size / canonical size, per re-encoded instance.",
    buckets=(0.5, 0.8, 1, 1.25, 1.5, 2, 2.5, 3, 4, 6, 10),
)
CODEC_SECONDS = Histogram(
    "radflow_transcode_codec_seconds",
    "Codec time per instance, by stage (decode, encode, verify).",
    ["stage"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
IN_FLIGHT = Gauge(
    "radflow_transcode_in_flight",
    "Instances being normalized now (at most RADFLOW_TRANSCODE_CONCURRENCY).",
)
PREVIEWS = Counter(
    "radflow_transcode_previews_total",
    "Lossy preview instances, by outcome: made, or the reason none could be made.",
    ["outcome"],
)
PREVIEW_BYTES = Counter(
    "radflow_transcode_preview_bytes_total", "Bytes of preview instances stored."
)
PREVIEW_RATIO = Histogram(
    "radflow_transcode_preview_compression_ratio",
    "Lossy Image Compression Ratio of each preview (uncompressed frame / JPEG).",
    buckets=(2, 4, 6, 8, 10, 15, 20, 30, 50, 100),
)
RULES_GENERATION = Gauge(
    "radflow_transcode_rules_generation",
    "Rule-file versions applied since start (transcode reads its preview options).",
)
RULES_VALID = Gauge(
    "radflow_transcode_rules_valid",
    "1 while the rule file in force is the file on disk (or none is configured); 0 after "
    "a rejected change or while no valid file was seen (no previews are made then).",
)
RULES_RELOADS = Counter(
    "radflow_transcode_rules_reloads_total", "Rule-file changes, by outcome.", ["outcome"]
)
