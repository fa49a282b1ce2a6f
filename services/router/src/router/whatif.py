"""The rule what-if: what a new rule file would have decided for instances the router
already decided on, set against what it actually requested.

Pure, like the rules themselves: each :class:`Case` arrives with its rule view, the
time to evaluate it at and its actual outcome already found (:mod:`router.replay`
reads them from the topics and the blob store), so the comparison is tested without
a broker. Destinations are compared by name, as the rule file names them. A held
instance has no destination; a route that waits for its study to be complete counts
as a request to its destination (where it goes is the decision; when it leaves is
not compared).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from radflow_core.events import Lane
from radflow_rules.rules import Decision, Instance, RuleSet, evaluate

HELD = "(held)"
"""The row that counts held instances in the per-destination tables; its "rule" is the
hold reason."""


@dataclass(frozen=True)
class RouteTaken:
    """One destination of an outcome."""

    lane: Lane
    rules: tuple[str, ...]
    """The rules that sent the instance there (``default`` for the default route)."""
    waits: bool = False
    """The request waited (or would wait) for its study or series to be complete."""
    deidentify: str | None = None
    """The de-identification profile the delivery applied (or would apply), if any."""


@dataclass(frozen=True)
class Outcome:
    """Where an instance went, or would go: its destinations, or a hold."""

    routes: Mapping[str, RouteTaken]
    hold: str | None = None

    @property
    def destinations(self) -> frozenset[str]:
        return frozenset(self.routes)

    @classmethod
    def of(cls, decision: Decision) -> Outcome:
        return cls(
            {
                r.destination: RouteTaken(
                    r.lane,
                    r.rules,
                    r.wait is not None,
                    r.deidentify.profile.name if r.deidentify is not None else None,
                )
                for r in decision.routes
            },
            decision.hold,
        )

    def describe(self) -> str:
        if not self.routes:
            return f"held: {self.hold}"
        return ", ".join(
            f"{name} by {'+'.join(route.rules)}" for name, route in sorted(self.routes.items())
        )

    def to_json(self) -> dict[str, object]:
        return {
            "destinations": {
                name: {"lane": r.lane.value, "rules": list(r.rules), "waits": r.waits}
                for name, r in sorted(self.routes.items())
            },
            "hold": self.hold,
        }


@dataclass(frozen=True)
class Case:
    """One normalized instance of the window."""

    sop_instance_uid: str
    study_instance_uid: str
    modality: str | None
    at: datetime
    """When to evaluate the new rules: when the router decided on it (its time-of-day
    windows see that moment), or when it was normalized if no decision was found."""
    actual: Outcome | None
    """What the router decided; None when no decision is on the topics (yet)."""
    instance: Instance | None
    """What the new rules see; None when it could not be built (``problem`` says why)."""
    problem: str | None = None


@dataclass
class Tally:
    """One destination (or the held row): instances routed there, then and now."""

    requested: int = 0
    """Instances the router actually requested for it (or held)."""
    would: int = 0
    """Instances the new rules would request for it (or hold)."""
    kept: int = 0
    added: int = 0
    removed: int = 0
    lane_changed: int = 0
    """Kept instances whose lane (STAT or routine) would change."""
    deidentification_changed: int = 0
    """Kept instances whose de-identification would change (start, stop, or another
    profile): the destination would receive them again, as other bytes."""


@dataclass
class RuleTally:
    requested: int = 0
    would: int = 0


@dataclass(frozen=True)
class Change:
    """An instance whose destinations the new rules change."""

    case: Case
    before: Outcome
    after: Outcome

    @property
    def added(self) -> tuple[str, ...]:
        return tuple(sorted(self.after.destinations - self.before.destinations))

    @property
    def removed(self) -> tuple[str, ...]:
        return tuple(sorted(self.before.destinations - self.after.destinations))

    def to_json(self) -> dict[str, object]:
        case = self.case
        return {
            "sop_instance_uid": case.sop_instance_uid,
            "study_instance_uid": case.study_instance_uid,
            "modality": case.modality,
            "at": case.at.isoformat(),
            "added": list(self.added),
            "removed": list(self.removed),
            "before": self.before.to_json(),
            "after": self.after.to_json(),
        }


@dataclass
class WhatIf:
    """The comparison over every case of the window."""

    instances: int = 0
    compared: int = 0
    undecided: list[Case] = field(default_factory=list)
    """Cases the router has not decided on (behind, or its input dead-lettered)."""
    unevaluated: list[Case] = field(default_factory=list)
    destinations: dict[str, Tally] = field(default_factory=dict)
    by_rule: dict[tuple[str, str], RuleTally] = field(default_factory=dict)
    """(destination or HELD, rule or hold reason) → instances, then and now."""
    changes: list[Change] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "instances": self.instances,
            "compared": self.compared,
            "changed": len(self.changes),
            "undecided": [c.sop_instance_uid for c in self.undecided],
            "unevaluated": [
                {"sop_instance_uid": c.sop_instance_uid, "problem": c.problem}
                for c in self.unevaluated
            ],
            "destinations": {
                name: vars(tally) for name, tally in sorted(self.destinations.items())
            },
            "rules": [
                {"destination": dest, "rule": rule, **vars(tally)}
                for (dest, rule), tally in sorted(self.by_rule.items())
            ],
            "changes": [c.to_json() for c in self.changes],
        }


def compare(rules: RuleSet, cases: Iterable[Case]) -> WhatIf:
    """Evaluate ``rules`` on every case at its own time and set the result against
    what the router decided."""
    report = WhatIf()
    for case in sorted(cases, key=lambda c: (c.at, c.sop_instance_uid)):
        report.instances += 1
        if case.instance is None:
            report.unevaluated.append(case)
            continue
        if case.actual is None:
            report.undecided.append(case)
            continue
        report.compared += 1
        after = Outcome.of(evaluate(rules, case.instance, case.at))
        _count(report, case.actual, after)
        if case.actual.destinations != after.destinations:
            report.changes.append(Change(case, case.actual, after))
    return report


def _count(report: WhatIf, before: Outcome, after: Outcome) -> None:
    def tally(name: str) -> Tally:
        return report.destinations.setdefault(name, Tally())

    def rule(name: str, by: str) -> RuleTally:
        return report.by_rule.setdefault((name, by), RuleTally())

    for name, route in before.routes.items():
        tally(name).requested += 1
        for by in route.rules:
            rule(name, by).requested += 1
    for name, route in after.routes.items():
        tally(name).would += 1
        for by in route.rules:
            rule(name, by).would += 1
    for name in before.destinations | after.destinations:
        if name not in after.routes:
            tally(name).removed += 1
        elif name not in before.routes:
            tally(name).added += 1
        else:
            tally(name).kept += 1
            if before.routes[name].lane != after.routes[name].lane:
                tally(name).lane_changed += 1
            if before.routes[name].deidentify != after.routes[name].deidentify:
                tally(name).deidentification_changed += 1
    if before.hold is not None and not before.routes:
        tally(HELD).requested += 1
        rule(HELD, before.hold).requested += 1
    if after.hold is not None and not after.routes:
        tally(HELD).would += 1
        rule(HELD, after.hold).would += 1
    was_held, now_held = not before.routes, not after.routes
    if was_held and now_held:
        tally(HELD).kept += 1
    elif now_held:
        tally(HELD).added += 1
    elif was_held:
        tally(HELD).removed += 1


def render(report: WhatIf, heading: str) -> str:
    """The readable report: totals per destination, per destination and rule, then
    every instance whose destinations change."""
    lines = [
        heading,
        f"  instances normalized in the window: {report.instances}; compared: "
        f"{report.compared}; not decided by the router yet: {len(report.undecided)}; "
        f"not evaluated: {len(report.unevaluated)}",
        "",
    ]
    dest_rows = [
        [
            name,
            t.requested,
            t.would,
            t.kept,
            t.added,
            t.removed,
            "-" if name == HELD else t.lane_changed,
            "-" if name == HELD else t.deidentification_changed,
        ]
        for name, t in sorted(report.destinations.items())
    ]
    lines += _table(
        [
            "destination",
            "requested",
            "would",
            "kept",
            "added",
            "removed",
            "lane changed",
            "de-identification changed",
        ],
        dest_rows,
    )
    lines.append("")
    rule_rows = [
        [dest, rule, t.requested, t.would, t.would - t.requested]
        for (dest, rule), t in sorted(report.by_rule.items())
    ]
    lines += _table(
        ["destination", "rule (or hold reason)", "requested", "would", "delta"], rule_rows
    )
    lines.append("")
    if not report.changes:
        lines.append("No instance changes destination.")
    else:
        lines.append(f"{len(report.changes)} instance(s) change destination:")
        change_rows = [
            [
                c.case.sop_instance_uid,
                c.case.study_instance_uid,
                c.case.modality or "",
                f"{c.case.at:%Y-%m-%d %H:%M:%S%z}",
                " ".join([*(f"+{d}" for d in c.added), *(f"-{d}" for d in c.removed)]),
                c.after.describe(),
            ]
            for c in report.changes
        ]
        lines += _table(
            ["sop_instance_uid", "study_instance_uid", "modality", "at", "change", "now"],
            change_rows,
        )
    for case in report.unevaluated:
        lines.append(f"not evaluated: {case.sop_instance_uid}: {case.problem}")
    return "\n".join(lines)


def _table(header: list[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [header, *([str(v) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
