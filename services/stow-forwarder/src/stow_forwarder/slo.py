"""Deliveries counted against each destination's latency objectives, and the
objectives exported for Prometheus.

Each instance of a destination and lane with an objective is counted once at its
outcome: within or over the threshold when the destination acknowledges it, failed
when it goes to ``dicom.forward.failed`` (it was not delivered in time either). The
burn-rate alerts divide the misses by the total over a window, which is exact; the
latency histogram's buckets would need interpolation and a bucket at each threshold.
A request replayed after a failure and then delivered counts again, as over: both
were misses a reader waited for. Requests recognised as already delivered are not
counted again.

The thresholds and objectives are gauges so that the alert rules read them instead of
repeating the rule file's numbers; a destination whose objective is removed loses its
gauges, and its burn rate then has no budget to divide by and stops alerting.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

from radflow_core.events import Lane
from radflow_rules.rules import Destination
from stow_forwarder.metrics import SLO_DELIVERIES, SLO_OBJECTIVE, SLO_TARGET


class Outcome(StrEnum):
    WITHIN = "within"
    OVER = "over"
    FAILED = "failed"


def count_delivery(destination: Destination, lane: Lane, latency_s: float) -> None:
    """Count one acknowledged instance against its lane's objective, if it has one."""
    objective = destination.slo.for_lane(lane)
    if objective is None:
        return
    outcome = Outcome.WITHIN if latency_s <= objective.within_s else Outcome.OVER
    SLO_DELIVERIES.labels(destination.name, lane.value, outcome.value).inc()


def count_failure(destination: Destination, lane: Lane) -> None:
    """Count one instance that went to dicom.forward.failed, if its lane has an objective."""
    if destination.slo.for_lane(lane) is not None:
        SLO_DELIVERIES.labels(destination.name, lane.value, Outcome.FAILED.value).inc()


class ObjectiveGauges:
    """The exported thresholds and objectives, kept equal to the running destinations'."""

    def __init__(self) -> None:
        self._exported: set[tuple[str, str]] = set()

    def publish(self, destinations: Iterable[Destination]) -> None:
        """Export exactly these destinations' objectives. Their outcome counters are
        created at 0 too, so a window's first miss is an increase Prometheus sees (a
        series born at 1 is not one) and the dashboard shows 0, not "No data"."""
        wanted = {
            (d.name, lane.value): objective
            for d in destinations
            for lane, objective in d.slo.items()
        }
        for name, lane in self._exported - wanted.keys():
            SLO_TARGET.remove(name, lane)
            SLO_OBJECTIVE.remove(name, lane)
        for (name, lane), objective in wanted.items():
            SLO_TARGET.labels(name, lane).set(objective.within_s)
            SLO_OBJECTIVE.labels(name, lane).set(objective.ratio)
            for outcome in Outcome:
                SLO_DELIVERIES.labels(name, lane, outcome.value)
        self._exported = set(wanted)
