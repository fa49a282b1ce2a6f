"""What a DICOM file looks like to the rules, and a readable account of a decision."""

from __future__ import annotations

from pathlib import Path

from radflow_rules.rules import Decision, Instance, RuleSet
from router.attributes import file_view, parse_header


def instance_from_file(
    path: Path,
    rules: RuleSet,
    calling_ae: str | None,
    dimse_priority: str | None,
    sender_identity: str | None = None,
) -> Instance:
    with path.open("rb") as file:
        ds = parse_header(file)
    return file_view(
        rules,
        ds,
        calling_ae=calling_ae,
        called_ae=None,
        dimse_priority=dimse_priority,
        sender_identity=sender_identity,
    )


def describe(name: str, decision: Decision) -> str:
    lines = [name]
    for rule, result in decision.trace:
        lines.append(f"  {'MATCH' if result.matched else 'no   '} {rule}: {result.why}")
    for route in decision.routes:
        wait = (
            f", wait for {route.wait.level.value} complete ({route.wait.quiet_seconds}s quiet)"
            if route.wait
            else ""
        )
        deid = ""
        if route.deidentify is not None:
            profile = route.deidentify.profile
            options = ", ".join(sorted(profile.options)) or "basic profile only"
            burned = ", burned-in accepted" if route.deidentify.accept_burned_in else ""
            deid = f", de-identified: {profile.name} ({options}{burned})"
        preview = (
            f" + lossy preview ({', '.join(str(p) for p in route.previews)}) ahead, stat"
            if route.previews
            else ""
        )
        lines.append(
            f"  -> {route.destination} [{route.lane.value}{wait}{deid}]{preview} "
            f"by {', '.join(route.rules)}"
        )
    if decision.hold:
        lines.append(f"  -> HOLD: {decision.hold}")
    return "\n".join(lines)
