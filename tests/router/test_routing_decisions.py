"""What the router decides beyond rule matching: which attributes it can see, which
variant each destination gets, which lane, and the idempotency key."""

from __future__ import annotations

import io
from datetime import UTC, datetime

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from radflow_core.events import (
    BlobRef,
    DecodeStatus,
    InstanceNormalized,
    Lane,
    OrderPriority,
    OrderProcedure,
    Protocol,
    RoutingAttributes,
    Sender,
    WorklistItem,
)
from radflow_core.instance_header import routing_attributes
from radflow_rules.loader import load_text
from radflow_rules.rules import Instance, evaluate
from router.attributes import (
    UnreadableHeader,
    event_view,
    header_attributes,
    needs_header,
    parse_header,
)
from router.routing import forward_request, idempotency_key, variant_for
from support.dicom import PHI_ID, PHI_NAME, make_instance

JPEG_LS = "1.2.840.10008.1.2.4.80"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _blob(tag: str) -> BlobRef:
    return BlobRef(bucket="b", key=f"{tag}/k.dcm", size=10, sha256=tag * 64)


def _event(original_ts: str = EXPLICIT_LE) -> InstanceNormalized:
    now = datetime.now(UTC)
    return InstanceNormalized(
        sop_instance_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        study_instance_uid=generate_uid(),
        series_instance_uid=generate_uid(),
        modality="CT",
        sender=Sender(protocol=Protocol.DIMSE, calling_ae="CT1"),
        received_at=now,
        original=_blob("a"),
        original_transfer_syntax_uid=original_ts,
        canonical=_blob("b"),
        canonical_transfer_syntax_uid=JPEG_LS,
        decode_status=DecodeStatus.VERIFIED,
        normalized_at=now,
    )


RULES = f"""
version: 1
destinations:
  any: {{url: "https://any.example"}}
  ls: {{url: "https://ls.example", transfer_syntaxes: [{JPEG_LS}]}}
  le: {{url: "https://le.example", transfer_syntaxes: [{EXPLICIT_LE}]}}
  lossy: {{url: "https://lossy.example", transfer_syntaxes: [{JPEG_BASELINE}]}}
  urgent: {{url: "https://urgent.example", priority: stat}}
rules:
  - name: all
    route: [any, ls, le, lossy, urgent]
default: {{hold: x}}
"""


@pytest.fixture(scope="module")
def rules():
    return load_text(RULES, "rules.yaml")


def test_each_destination_gets_the_variant_it_accepts_converting_only_when_needed(rules):
    event = _event()
    chosen = {name: variant_for(event, d) for name, d in rules.destinations.items()}
    assert chosen["any"] == (event.canonical, JPEG_LS, JPEG_LS)
    assert chosen["ls"] == (event.canonical, JPEG_LS, JPEG_LS)
    assert chosen["le"] == (event.original, EXPLICIT_LE, EXPLICIT_LE)  # no conversion
    assert chosen["lossy"] == (event.canonical, JPEG_LS, JPEG_BASELINE)  # forwarder converts


def test_a_stat_destination_gets_the_stat_lane_unless_the_rule_says_otherwise(rules):
    routine = evaluate(rules, Instance({}, stat=False), datetime.now(UTC))
    lanes = {r.destination: r.lane for r in routine.routes}
    assert lanes == {n: Lane.ROUTINE for n in ("any", "ls", "le", "lossy")} | {"urgent": Lane.STAT}
    stat = evaluate(rules, Instance({}, stat=True), datetime.now(UTC))
    assert {r.lane for r in stat.routes} == {Lane.STAT}
    pinned = load_text(
        RULES.replace("route: [any, ls, le, lossy, urgent]", "route: [urgent]\n    lane: routine")
    )
    (route,) = evaluate(pinned, Instance({}, stat=True), datetime.now(UTC)).routes
    assert route.lane is Lane.ROUTINE


def test_the_idempotency_key_depends_on_instance_bytes_and_destination_only(rules):
    event = _event()
    (route, *_) = evaluate(rules, Instance({}), datetime.now(UTC)).routes
    first = forward_request(event, rules, route, datetime.now(UTC))
    again = forward_request(event, rules, route, datetime(2030, 1, 1, tzinfo=UTC))
    assert first.idempotency_key == again.idempotency_key
    assert first.idempotency_key == idempotency_key(
        event.sop_instance_uid, event.original.sha256, route.destination
    )
    other_bytes = event.model_copy(update={"original": _blob("c")})
    assert forward_request(other_bytes, rules, route, datetime.now(UTC)).idempotency_key != (
        first.idempotency_key
    )
    assert first.rules == ("all",) and first.rules_digest == rules.digest


def test_header_attributes_leave_out_demographics_and_find_the_requested_priority(tmp_path):
    item = Dataset()
    item.RequestedProcedurePriority = "STAT"
    path = make_instance(
        tmp_path / "x.dcm",
        extra={"StudyDescription": "CT HEAD", "RequestAttributesSequence": [item]},
    )
    with path.open("rb") as file:
        attributes = header_attributes(parse_header(file))
    assert attributes["StudyDescription"] == "CT HEAD"
    assert attributes["RequestedProcedurePriority"] == "STAT"
    assert "PixelData" not in attributes
    assert not {"PatientName", "PatientID", "PatientBirthDate"} & set(attributes)
    assert PHI_NAME not in repr(attributes) and PHI_ID not in repr(attributes)


def test_an_unparsable_header_is_a_non_retriable_error():
    with pytest.raises(UnreadableHeader) as info:
        parse_header(io.BytesIO(b"DICM" * 10))
    assert not info.value.retriable


def test_the_header_is_read_only_when_a_rule_or_the_stat_policy_needs_it():
    head = 'version: 1\ndestinations: {p: {url: "https://p"}}\ndefault: {hold: x}\n'
    event_only = (
        "stat: {from_priority: false}\nrules:\n  - name: a\n    when: {modality: CT}\n"
        "    route: [p]\n"
    )
    assert not needs_header(load_text(head + event_only))
    assert needs_header(load_text(head + event_only.replace("false", "true")))
    assert needs_header(load_text(head + event_only.replace("modality", "StudyDescription")))


def test_a_v2_event_carries_what_the_stat_policy_and_common_rules_read():
    head = 'version: 1\ndestinations: {p: {url: "https://p"}}\ndefault: {hold: x}\n'
    rules = (
        "stat: {from_priority: true}\nrules:\n  - name: a\n"
        "    when: {all: [{Manufacturer: ACME}, {SeriesInstanceUID: {exists: true}}]}\n"
        "    route: [p]\n"
    )
    v1 = _event()
    v2 = v1.model_copy(
        update={
            "routing": RoutingAttributes(requested_procedure_priority="STAT", manufacturer="ACME")
        }
    )
    assert not needs_header(load_text(head + rules), v2)
    assert needs_header(load_text(head + rules), v1)
    assert needs_header(load_text(head + rules.replace("Manufacturer", "StudyDescription")), v2)
    view = event_view(load_text(head + rules), v2, None)
    assert view.stat
    assert view.get("Manufacturer") == "ACME"
    assert view.get("SeriesInstanceUID") == v2.series_instance_uid


def test_the_event_and_the_header_give_rules_the_same_text():
    ds = Dataset()
    ds.Manufacturer = "ACME Medical "
    ds.ManufacturerModelName = "Scanner 9"
    ds.RequestAttributesSequence = [Dataset()]
    ds.RequestAttributesSequence[0].RequestedProcedurePriority = "STAT"
    carried = routing_attributes(ds)
    header = header_attributes(ds)
    for keyword in ("Manufacturer", "ManufacturerModelName", "RequestedProcedurePriority"):
        assert carried[keyword] == header[keyword], keyword
    assert set(carried) == {"Manufacturer", "ManufacturerModelName", "RequestedProcedurePriority"}


ORDER_RULES = """
version: 1
destinations:
  neuro: {url: "https://neuro.example"}
  any: {url: "https://any.example"}
stat: {from_priority: false}
rules:
  - name: head
    when: {order_procedure_code: CTHEAD, order_priority: [stat, asap]}
    route: [neuro]
  - name: rest
    route: [any]
default: {hold: x}
"""


def _order(priority: OrderPriority, code: str = "CTHEAD") -> WorklistItem:
    return WorklistItem(
        site="site-a",
        order_ref="c" * 64,
        step_id="1",
        priority=priority,
        procedure=OrderProcedure(code=code, scheme="L", meaning="CT head"),
        document=_blob("d"),
        updated_at=datetime.now(UTC),
    )


def test_the_order_is_seen_by_rules_and_a_stat_order_makes_the_instance_stat() -> None:
    rules = load_text(ORDER_RULES, "rules.yaml")
    assert not needs_header(rules, _event()), "order attributes come from no header"
    now = datetime.now(UTC)

    stat = event_view(rules, _event(), None, _order(OrderPriority.STAT))
    assert stat.stat
    assert (stat.get("order_site"), stat.get("order_procedure_meaning")) == ("site-a", "CT head")
    assert {(r.destination, r.lane) for r in evaluate(rules, stat, now).routes} == {
        ("neuro", Lane.STAT)
    }
    routine = event_view(rules, _event(), None, _order(OrderPriority.ROUTINE))
    assert not routine.stat
    assert {r.destination for r in evaluate(rules, routine, now).routes} == {"any"}
    none = event_view(rules, _event(), None, None)
    assert not none.stat and none.get("order_site") is None
