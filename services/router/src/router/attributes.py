"""What an instance looks like to the rules: the event's routing fields (and, from a
v2 normalized event, the header attributes rules read most), plus the dataset
header's attributes when a rule needs one the event does not carry.

The same function serves the running router (header read from S3) and ``explain``
(header read from a local file), so an engineer's dry run sees exactly what the
service sees.
"""

from __future__ import annotations

from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset

from radflow_core.errors import PipelineError
from radflow_core.events import (
    InstanceIdentity,
    InstanceNormalized,
    InstancePreview,
    RoutingAttributes,
    WorklistItem,
)
from radflow_core.instance_header import ROUTING_KEYWORDS
from radflow_rules.orders import ORDER_ATTRIBUTES
from radflow_rules.rules import Instance, RuleSet
from radflow_rules.view import event_instance, header_attributes, instance_view

EVENT_FIELDS = frozenset(
    {
        "modality",
        "body_part_examined",
        "sop_class_uid",
        "calling_ae",
        "called_ae",
        "sender_identity",
        "Modality",
        "BodyPartExamined",
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        *ORDER_ATTRIBUTES,
    }
)
"""Attributes every normalized event carries (v1 too), and the order's (from the order
table, not the header); rules on these need no header."""
ROUTING_FIELDS = EVENT_FIELDS | frozenset(ROUTING_KEYWORDS)
"""Attributes a v2 normalized event carries (``routing``)."""


class UnreadableHeader(PipelineError):
    """The stored instance's header cannot be parsed (it passed ingest, so this means
    a damaged blob or a parser limit); retrying will not help."""

    reason = "unreadable_header"


def needs_header(rules: RuleSet, event: InstanceNormalized | InstancePreview | None = None) -> bool:
    """True when a condition reads an attribute the event does not carry, or (v1
    event, or no event: ``explain``) the STAT policy looks at Requested Procedure
    Priority."""
    if event is not None and event.routing is not None:
        return not rules.attributes <= ROUTING_FIELDS
    return rules.stat.from_priority or not rules.attributes <= EVENT_FIELDS


def parse_header(file: BinaryIO) -> Dataset:
    """The dataset up to (not including) its pixel data.

    Raises:
        UnreadableHeader: with the parser's error type only (its messages can quote
            values).
    """
    try:
        ds = dcmread(file, stop_before_pixels=True)
        for _ in ds:  # decode every top-level element now, while the file is open
            pass
    except PipelineError:
        raise
    except RecursionError:
        raise UnreadableHeader("sequences nested too deeply") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure means unreadable
        raise UnreadableHeader(f"header cannot be parsed ({type(exc).__name__})") from None
    return ds


def event_view(
    rules: RuleSet,
    event: InstanceIdentity,
    header: Dataset | None,
    order: WorklistItem | None = None,
    routing: RoutingAttributes | None = None,
) -> Instance:
    """The running router's view of one normalized event: the header's attributes
    when it was read, overlaid with what the event carries (``routing``: the event's
    own, else the one given) and its order."""
    attributes = header_attributes(header) if header is not None else {}
    routing = getattr(event, "routing", None) or routing
    if routing is not None:
        attributes.update(routing.by_keyword())
    return event_instance(rules, event, attributes, order)


def file_view(
    rules: RuleSet,
    ds: Dataset,
    *,
    calling_ae: str | None,
    called_ae: str | None,
    dimse_priority: str | None,
    sender_identity: str | None = None,
) -> Instance:
    """``explain``'s view of a local file, as the router would see it after ingest."""
    header = header_attributes(ds)
    return instance_view(
        rules,
        header,
        modality=header.get("Modality"),
        body_part_examined=header.get("BodyPartExamined"),
        sop_class_uid=header.get("SOPClassUID"),
        calling_ae=calling_ae,
        called_ae=called_ae,
        sender_identity=sender_identity,
        dimse_priority=dimse_priority,
    )
