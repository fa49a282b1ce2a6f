"""The event contract: typed, closed, versioned, free of demographics, published as
JSON Schema that cannot drift from the models."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from radflow_core.errors import EventDecodeError
from radflow_core.events import (
    BlobRef,
    DecodeStatus,
    InstanceNormalized,
    InstanceReceived,
    Protocol,
    RoutingAttributes,
    Sender,
    decode,
    encode,
    wrap,
)
from radflow_core.schema import PUBLISHED, file_name, render

DOCS = Path(__file__).parents[2] / "docs" / "events"


def received(**overrides: object) -> InstanceReceived:
    fields: dict[str, object] = {
        "sop_instance_uid": "1.2.3.4",
        "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
        "study_instance_uid": "1.2.3",
        "series_instance_uid": "1.2.3.1",
        "modality": "CT",
        "transfer_syntax_uid": "1.2.840.10008.1.2.1",
        "sender": Sender(protocol=Protocol.DIMSE, calling_ae="CT1", called_ae="RADFLOW"),
        "received_at": datetime(2026, 11, 23, 12, 0, tzinfo=UTC),
        "blob": BlobRef(bucket="radflow", key="original/x/y.dcm", size=10, sha256="a" * 64),
    }
    fields.update(overrides)
    return InstanceReceived.model_validate(fields)


def test_envelope_round_trips_as_cloudevents_json() -> None:
    envelope = wrap(received(), "ingest")
    raw = encode(envelope)
    parsed = json.loads(raw)
    assert parsed["specversion"] == "1.0"
    assert parsed["type"] == "dicom.instance.received"
    assert parsed["dataschema"] == "radflow:dicom.instance.received:v2"
    assert parsed["source"].startswith("/radflow/ingest/")
    assert decode(raw, InstanceReceived) == envelope


def test_unknown_fields_are_rejected() -> None:
    parsed = json.loads(encode(wrap(received(), "ingest")))
    parsed["data"]["patient_name"] = "DOE^JOHN"
    with pytest.raises(EventDecodeError) as info:
        decode(json.dumps(parsed).encode(), InstanceReceived)
    assert "DOE" not in str(info.value)  # the error names fields, never values


@pytest.mark.parametrize("bad", ["1.02.3", "1.2.abc", "", "1" * 65])
def test_invalid_uids_cannot_be_put_in_an_event(bad: str) -> None:
    with pytest.raises(ValueError, match="study_instance_uid"):
        received(study_instance_uid=bad)


def test_wrong_schema_version_is_rejected() -> None:
    parsed = json.loads(encode(wrap(received(), "ingest")))
    parsed["dataschema"] = "radflow:dicom.instance.received:v3"
    with pytest.raises(EventDecodeError, match="dataschema"):
        decode(json.dumps(parsed).encode(), InstanceReceived)


def test_a_v1_received_event_is_read_as_v2_without_an_order_reference() -> None:
    parsed = json.loads(encode(wrap(received(order_ref="b" * 64), "ingest")))
    assert parsed["data"]["order_ref"] == "b" * 64
    del parsed["data"]["order_ref"]
    parsed["dataschema"] = "radflow:dicom.instance.received:v1"
    assert decode(json.dumps(parsed).encode(), InstanceReceived).data.order_ref is None


def normalized(**overrides: object) -> InstanceNormalized:
    base = received()
    return InstanceNormalized(
        **base.identity(),
        original=base.blob,
        original_transfer_syntax_uid=base.transfer_syntax_uid,
        canonical=base.blob,
        canonical_transfer_syntax_uid=base.transfer_syntax_uid,
        decode_status=DecodeStatus.ALREADY_CANONICAL,
        normalized_at=datetime(2026, 11, 23, 12, 0, 1, tzinfo=UTC),
        **overrides,  # type: ignore[arg-type]
    )


def test_a_v1_normalized_event_is_read_as_v3_without_routing_attributes() -> None:
    v3 = encode(
        wrap(normalized(routing=RoutingAttributes(requested_procedure_priority="STAT")), "t")
    )
    assert json.loads(v3)["dataschema"] == "radflow:dicom.instance.normalized:v3"
    assert decode(v3, InstanceNormalized).data.routing == RoutingAttributes(
        requested_procedure_priority="STAT"
    )
    parsed = json.loads(encode(wrap(normalized(), "t")))
    del parsed["data"]["routing"]
    del parsed["data"]["order_ref"]
    parsed["dataschema"] = "radflow:dicom.instance.normalized:v1"
    assert decode(json.dumps(parsed).encode(), InstanceNormalized).data.routing is None
    parsed["dataschema"] = "radflow:dicom.instance.normalized:v2"
    assert decode(json.dumps(parsed).encode(), InstanceNormalized).data.order_ref is None
    parsed["dataschema"] = "radflow:dicom.instance.normalized:v4"
    with pytest.raises(EventDecodeError, match="dataschema"):
        decode(json.dumps(parsed).encode(), InstanceNormalized)


def test_routing_attributes_name_only_coded_and_device_values() -> None:
    for name in RoutingAttributes.model_fields:
        assert not any(
            word in name for word in ("patient", "description", "institution", "station")
        ), name
    assert set(RoutingAttributes.KEYWORDS.values()) == set(RoutingAttributes.model_fields)


def test_events_have_no_demographic_fields() -> None:
    for model in PUBLISHED:
        text = render(model).lower()
        for word in ("patient", "birth", "sex", "accession"):
            assert f'"{word}' not in text, f"{model.__name__} exposes {word}"


def test_published_schemas_match_the_models() -> None:
    for model in PUBLISHED:
        path = DOCS / file_name(model)
        assert path.exists(), f"run `make schemas`: {path} missing"
        assert path.read_text() == render(model), f"run `make schemas`: {path} is stale"
