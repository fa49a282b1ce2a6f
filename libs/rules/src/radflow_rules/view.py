"""What an instance looks like to the rules, from its header and the routing fields its
events carry: shared by the router (every instance) and transcode (which instances
get a lossy preview), so both see the same instance the same way."""

from __future__ import annotations

from pydicom.dataset import Dataset

from radflow_core.events import InstanceIdentity, WorklistItem
from radflow_core.instance_header import ATTRIBUTE_TEXT_LIMIT, requested_procedure_priority
from radflow_rules.orders import is_stat_order, order_attributes
from radflow_rules.rules import Instance, RuleSet

_SKIPPED_VR = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_MAX_VALUE = ATTRIBUTE_TEXT_LIMIT


def header_attributes(ds: Dataset) -> dict[str, str | None]:
    """Every top-level text attribute by keyword, and the requested procedure priority.

    Patient demographics (group 0010) are left out: rules route on the study, not on
    who the patient is, and explain output must be safe to paste into a ticket.
    """
    values: dict[str, str | None] = {}
    for elem in ds:
        if elem.tag.group == 0x0010 or not elem.keyword or elem.VR in _SKIPPED_VR:
            continue
        try:
            value = elem.value
        except Exception:  # noqa: BLE001 - one undecodable value does not stop routing
            value = None
        values[elem.keyword] = None if value is None else str(value)[:_MAX_VALUE]
    if not values.get("RequestedProcedurePriority"):
        values["RequestedProcedurePriority"] = requested_procedure_priority(ds)
    return values


def instance_view(
    rules: RuleSet,
    header: dict[str, str | None],
    *,
    modality: str | None,
    body_part_examined: str | None,
    sop_class_uid: str | None,
    calling_ae: str | None,
    called_ae: str | None,
    sender_identity: str | None,
    dimse_priority: str | None,
    order: WorklistItem | None = None,
) -> Instance:
    """Header attributes overlaid with the event's fields (what ingest validated and
    who the sender authenticated as) and the instance's order, if one is known. A STAT
    order makes the instance STAT, as the ``stat:`` policy does."""
    attributes = dict(header)
    attributes.update(order_attributes(order))
    attributes.update(
        {
            "modality": modality,
            "body_part_examined": body_part_examined,
            "sop_class_uid": sop_class_uid,
            "calling_ae": calling_ae,
            "called_ae": called_ae,
            "sender_identity": sender_identity,
        }
    )
    stat = rules.stat.is_stat(attributes, dimse_priority) or is_stat_order(order)
    return Instance(attributes, stat)


def event_instance(
    rules: RuleSet,
    event: InstanceIdentity,
    attributes: dict[str, str | None],
    order: WorklistItem | None = None,
) -> Instance:
    """``attributes`` (the header's, the routing attributes an event carries) overlaid
    with what the event itself says of the instance and its sender: how the router
    sees a normalized event and transcode a received one."""
    attributes = dict(attributes)
    attributes.update(
        {
            "Modality": event.modality,
            "BodyPartExamined": event.body_part_examined,
            "SOPClassUID": event.sop_class_uid,
            "SOPInstanceUID": event.sop_instance_uid,
            "StudyInstanceUID": event.study_instance_uid,
            "SeriesInstanceUID": event.series_instance_uid,
        }
    )
    return instance_view(
        rules,
        attributes,
        modality=event.modality,
        body_part_examined=event.body_part_examined,
        sop_class_uid=event.sop_class_uid,
        calling_ae=event.sender.calling_ae,
        called_ae=event.sender.called_ae,
        sender_identity=event.sender.identity,
        dimse_priority=event.priority.value,
        order=order,
    )
