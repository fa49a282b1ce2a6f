"""What a DICOM file looks like to the rules, and a readable account of a decision."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from router.rules import Decision, Instance, StatPolicy


def attributes_of(ds: Dataset, calling_ae: str | None) -> dict[str, str | None]:
    """Event-level names plus every top-level text attribute by keyword.

    Patient demographics (group 0010) are left out: rules route on the study, not on
    who the patient is, and explain output must be safe to paste into a ticket.
    """
    values: dict[str, str | None] = {}
    for elem in ds:
        if elem.tag.group == 0x0010 or not elem.keyword or elem.VR in ("SQ", "OB", "OW", "UN"):
            continue
        values[elem.keyword] = None if elem.value is None else str(elem.value)
    values.update(
        {
            "modality": values.get("Modality"),
            "body_part_examined": values.get("BodyPartExamined"),
            "sop_class_uid": values.get("SOPClassUID"),
            "calling_ae": calling_ae,
            "called_ae": None,
        }
    )
    return values


def instance_from_file(
    path: Path, stat: StatPolicy, calling_ae: str | None, dimse_priority: str | None
) -> Instance:
    ds = dcmread(path, stop_before_pixels=True)
    attributes = attributes_of(ds, calling_ae)
    return Instance(attributes, stat.is_stat(attributes, dimse_priority))


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
        lines.append(
            f"  -> {route.destination} [{route.lane.value}{wait}] by {', '.join(route.rules)}"
        )
    if decision.hold:
        lines.append(f"  -> HOLD: {decision.hold}")
    return "\n".join(lines)
