"""What rules see of an instance's order: the open worklist item its accession number
matched (radflow_core.order_table), as attributes named like the rule file's other
event attributes. An instance without a known order has none of them (``exists: false``
matches it), and is STAT only by the ``stat:`` policy.
"""

from __future__ import annotations

from radflow_core.events import OrderPriority, WorklistItem

ORDER_ATTRIBUTES = (
    "order_site",
    "order_priority",
    "order_procedure_code",
    "order_procedure_scheme",
    "order_procedure_meaning",
)
"""Rule attributes of the matched order: the ordering site (as the worklist's sites
file names it), its priority (stat, asap, routine) and the ordered procedure's code,
coding scheme and meaning."""


def order_attributes(order: WorklistItem | None) -> dict[str, str | None]:
    """The :data:`ORDER_ATTRIBUTES` of ``order`` (all None without one)."""
    if order is None:
        return dict.fromkeys(ORDER_ATTRIBUTES)
    procedure = order.procedure
    return {
        "order_site": order.site,
        "order_priority": order.priority.value,
        "order_procedure_code": procedure.code if procedure else None,
        "order_procedure_scheme": procedure.scheme if procedure else None,
        "order_procedure_meaning": procedure.meaning if procedure else None,
    }


def is_stat_order(order: WorklistItem | None) -> bool:
    """A STAT order makes its instances STAT, like the ``stat:`` policy does."""
    return order is not None and order.priority is OrderPriority.STAT
