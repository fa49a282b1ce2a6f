"""Router metrics (Prometheus)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

RULE_MATCHES = Counter(
    "radflow_router_rule_matches_total", "Instances each rule matched.", ["rule"]
)
REQUESTS = Counter(
    "radflow_router_forward_requests_total",
    "Forward requests emitted, by destination, lane and whether they waited for the study.",
    ["destination", "lane", "waited"],
)
HELD = Counter("radflow_router_held_total", "Instances held by the default action.")
PENDING_GROUPS = Gauge(
    "radflow_router_pending_studies",
    "Studies (or series) waiting for their quiet period, per destination group, by the "
    "lane they arrived in.",
    ["lane"],
)
PENDING_INSTANCES = Gauge(
    "radflow_router_pending_instances",
    "Forward requests held until their study is complete, by the lane they arrived in.",
    ["lane"],
)
RELEASED = Counter(
    "radflow_router_released_total", "Studies (or series) released after their quiet period."
)
ORDER_MATCHES = Counter(
    "radflow_router_order_matches_total",
    "Instances whose order reference matched an open order of worklist.items when "
    "routed, by the lane they arrived in.",
    ["lane"],
)
ORDER_ITEMS = Gauge(
    "radflow_router_order_items",
    "Open worklist items (scheduled procedure steps) known to the order lookup.",
)
ORDER_TABLE_LOADED = Gauge(
    "radflow_router_order_table_loaded",
    "1 once worklist.items was read to its end; 0 before and while it cannot be read "
    "(instances are then routed with the orders known so far: none at start).",
)
RULES_GENERATION = Gauge(
    "radflow_router_rules_generation",
    "How many valid rule files were loaded since start (1 after start).",
)
RULES_VALID = Gauge(
    "radflow_router_rules_valid",
    "1 if the rule file on disk is the one in use; 0 if its last change was rejected.",
)
RULES_RELOADS = Counter(
    "radflow_router_rules_reloads_total",
    "Rule file changes seen, by outcome (applied, rejected).",
    ["outcome"],
)


for _lane in ("stat", "routine"):
    ORDER_MATCHES.labels(_lane)  # from 0, so that increase() counts the first match
PREVIEWS = Counter(
    "radflow_router_previews_total",
    "Lossy previews read from dicom.instance.preview, by outcome: routed (to at least "
    "one destination) or unwanted (no rule in force asks for this preview).",
    ["outcome"],
)
