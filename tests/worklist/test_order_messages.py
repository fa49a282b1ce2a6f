"""Reading HL7 orders and writing their acknowledgements (pure: no network)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time

import hl7
import pytest
from pydantic import SecretStr

from radflow_core.events import OrderPriority
from radflow_core.orders import order_ref
from support.worklist import SITES, Order
from worklist.ack import build_ack
from worklist.orders import AckCode, Action, Refused, read_header, read_message
from worklist.sites import load_sites_text

KEY = SecretStr("test-key")
NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
SITES_ = load_sites_text(SITES)

OMI = "\r".join(
    [
        "MSH|^~\\&|RIS_A|HOSP_A|RADFLOW|RADFLOW|20261202101500||OMI^O23^OMI_O23|OMI1|P|2.5.1",
        "PID|1||MRN7^^^HOSP_A^MR~NHS9^^^NHS^NH||Doe^John^Q||19800215|M",
        "ORC|NW|PO1|FO1||SC",
        "TQ1|1||||||20261203083000||S",
        "OBR|1|PO1|FO1|MRBRAIN^MR brain^L",
        "IPC|ACC77^HOSP_A|RP77|1.2.3.4.5|SPS-A|MR|PROT1^Brain protocol^L|MR3T|ROOM2|MR_A",
        "IPC|ACC77^HOSP_A|RP77|1.2.3.4.5|SPS-B|MR|PROT2^Spine^L|MR3T|ROOM2|MR_A",
    ]
)


def test_an_omi_with_two_ipc_segments_is_two_steps_of_one_order() -> None:
    intake = read_message(OMI.encode(), SITES_, KEY, NOW)
    assert intake.site.name == "hospital-a"
    assert [c.step_id for c in intake.changes] == ["SPS-A", "SPS-B"]
    first = intake.changes[0]
    assert first.action is Action.UPSERT
    assert first.order_ref == order_ref("ACC77", "HOSP_A", KEY)
    doc = first.document
    assert doc is not None
    assert doc.accession_number == "ACC77" and doc.requested_procedure_id == "RP77"
    assert doc.study_instance_uid == "1.2.3.4.5"
    assert doc.priority is OrderPriority.STAT
    assert doc.patient.identifiers[1].id == "NHS9"
    assert doc.patient.birth_date == date(1980, 2, 15)
    assert doc.step.start_date == date(2026, 12, 3) and doc.step.start_time == time(8, 30)
    assert doc.step.station_ae == "MR_A" and doc.step.location == "ROOM2"
    assert doc.step.protocol is not None and doc.step.protocol.code == "PROT1"


def test_an_order_without_a_study_uid_gets_the_same_derived_uid_every_time() -> None:
    one = read_message(Order("ACC1").er7().encode(), SITES_, KEY, NOW).changes[0].document
    two = read_message(Order("ACC1").er7().encode(), SITES_, KEY, NOW).changes[0].document
    assert one is not None and two is not None
    assert one.study_instance_uid == two.study_instance_uid
    assert one.study_instance_uid.startswith("2.25.")


def test_a_cancel_without_step_ids_removes_every_step_of_the_order() -> None:
    order = Order("ACC1", control="CA", step_id="")
    (change,) = read_message(order.er7().encode(), SITES_, KEY, NOW).changes
    assert change.action is Action.REMOVE and change.step_id is None


@pytest.mark.parametrize(
    ("order", "ack", "code", "where"),
    [
        (Order("ACC1", control="ZZ"), AckCode.AE, 103, "ORC^1^1"),
        (Order("ACC1", start="2026-12-01"), AckCode.AE, 102, "OBR^1^36"),
        (Order("ACC12345678901234"), AckCode.AE, 102, "OBR^1^18"),
        (Order("ACC1", patient_id=""), AckCode.AE, 101, "PID^1^3"),
        (Order("ACC1", message_type="ORM^O02"), AckCode.AR, 201, "MSH^1^9"),
        (Order("ACC1", charset="ISO IR87"), AckCode.AR, 103, "MSH^1^18"),
    ],
)
def test_a_bad_order_is_refused_with_its_code_and_field(
    order: Order, ack: AckCode, code: int, where: str
) -> None:
    with pytest.raises(Refused) as caught:
        read_message(order.er7().encode(), SITES_, KEY, NOW)
    assert (caught.value.ack, caught.value.hl7_error, caught.value.location) == (ack, code, where)


def test_the_ack_names_the_message_and_the_error_in_v2_5_and_v2_3_layouts() -> None:
    message = Order("").er7().encode()
    header = read_header(message)
    refused = Refused(AckCode.AE, 101, "accession number missing", "OBR^1^18")
    ack = hl7.parse(build_ack(header, AckCode.AE, refused, NOW).decode())
    assert str(ack.segment("MSH")[9]) == "ACK^O01^ACK"
    assert str(ack.segment("MSH")[5]) == "RIS_A"  # the sender is the receiver
    assert [str(f) for f in ack.segment("MSA")[1:4]] == [
        "AE",
        "MSG0001",
        "accession number missing",
    ]
    assert str(ack.segment("ERR")[2]) == "OBR^1^18"
    assert str(ack.segment("ERR")[3]) == "101^Required field missing^HL70357"
    old = read_header(message.replace(b"|2.5.1", b"|2.3"))
    legacy = hl7.parse(build_ack(old, AckCode.AE, refused, NOW).decode())
    assert str(legacy.segment("ERR")[1]) == "OBR^1^18^101&Required field missing&HL70357"
