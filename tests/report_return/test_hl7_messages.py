"""The ORU^R01 and the ACK as pure logic: escaping checked against python-hl7 (another
parser), the fields each site setting moves, control IDs, result status, and every kind
of answer a RIS gives."""

from __future__ import annotations

from datetime import UTC, datetime

import hl7
import pytest

from radflow_core.events import AckError, ReportStatus
from report_return.hl7 import (
    build_oru,
    control_id,
    escape,
    escape_formatted,
    parse_ack,
    unescape,
)
from report_return.report import (
    EmptyReport,
    MissingAccessionNumber,
    MissingPatientIdentifier,
    ReportError,
    UnencodableText,
    document_from,
)
from report_return.sites import PatientIdRule, Site, TextType
from support.reports import document

NOW = datetime(2026, 11, 23, 19, 30, 2, tzinfo=UTC)
EVERYTHING = "a|b^c&d~e\\f \\F\\ \\.br\\ \\X0D\\ end"


def build(site: Site | None = None, status: ReportStatus = ReportStatus.FINAL, **doc: object):
    oru = build_oru(
        document_from(document(**doc)), status, site or Site("north", "h", 1), "CID", NOW
    )
    return oru, hl7.parse(oru.er7)


def text_of(message: hl7.Message, segment: str, number: int) -> str:
    return str(message.unescape(str(message.segment(segment)[number])))


@pytest.mark.parametrize("text", [EVERYTHING, "\\", "\\\\E\\", "~~~", "", "plain"])
def test_escaping_round_trips_through_another_parser(text: str) -> None:
    _, message = build(sections=[{"heading": "H", "text": text}], accession_number=text or "A")
    assert text_of(message, "OBX", 5) == text
    assert unescape(escape(text)) == text


def test_ft_joins_lines_with_br_and_tx_sends_one_obx_per_line() -> None:
    text = "one\r\ntwo\rthree\n\n  five"
    assert escape_formatted(text) == "one\\.br\\two\\.br\\three\\.br\\\\.br\\  five"
    _, ft = build(sections=[{"text": text}], impression=None)
    assert len(ft.segments("OBX")) == 1
    assert text_of(ft, "OBX", 5).replace("\r", "\n") == "one\ntwo\nthree\n\n  five"
    _, tx = build(
        Site("north", "h", 1, text=TextType.TX), sections=[{"text": text}], impression=None
    )
    obx = tx.segments("OBX")
    assert [str(tx.unescape(str(s[5]))) for s in obx] == ["one", "two", "three", "", "  five"]
    assert {str(s[4]) for s in obx} == {"1"} and {str(s[2]) for s in obx} == {"TX"}


def test_line_breaks_and_control_characters_never_reach_a_single_value_field() -> None:
    assert escape("a\r\nb\x0bc\x1cd\te") == "a b c d\te"


def test_control_ids_are_stable_per_delivery_and_fit_msh_10() -> None:
    first = control_id("north", "report\nR1\n1")
    assert first == control_id("north", "report\nR1\n1")
    assert len(first) == 20 and first.isalnum()
    assert first != control_id("north", "report\nR1\n2")
    assert first != control_id("south", "report\nR1\n1")


@pytest.mark.parametrize(
    ("status", "letter"),
    [(ReportStatus.FINAL, "F"), (ReportStatus.CORRECTED, "C"), (ReportStatus.PRELIMINARY, "P")],
)
def test_result_status_goes_to_obr_25_and_every_obx_11(status: ReportStatus, letter: str) -> None:
    _, message = build(status=status)
    assert str(message.segment("OBR")[25]) == letter
    assert {str(s[11]) for s in message.segments("OBX")} == {letter}


def test_header_and_identifiers_follow_the_site_settings() -> None:
    site = Site(
        "south",
        "h",
        1,
        sending_application="RADFLOW",
        sending_facility="TELE",
        receiving_application="RADIS",
        receiving_facility="SOUTH",
        hl7_version="2.4",
        encoding="iso-8859-1",
        processing_id="T",
        patient_identifier=PatientIdRule("SOUTH", "PI"),
        order_fields={"ORC-3": "accession_number", "OBR-3": "accession_number"},
    )
    doc = document()
    doc["patient"]["identifiers"] = [
        {"id": "N-1", "assigning_authority": "NORTH"},
        {"id": "S-2", "assigning_authority": "SOUTH"},
    ]
    oru, message = build(site, **doc)
    msh = message.segment("MSH")
    assert [str(msh[i]) for i in (3, 4, 5, 6, 9, 10, 11, 12, 18)] == [
        "RADFLOW", "TELE", "RADIS", "SOUTH", "ORU^R01^ORU_R01", "CID", "T", "2.4", "8859/1",
    ]  # fmt: skip
    assert str(message.segment("PID")[3]) == "S-2^^^SOUTH^PI"
    assert str(message.segment("ORC")[3]) == str(message.segment("OBR")[3]) == "ACC-1001"
    assert str(message.segment("ORC")[2]) == "" and str(message.segment("OBR")[18]) == ""
    assert oru.payload == oru.er7.encode("latin-1")


def test_a_site_without_the_reports_patient_authority_gets_no_message() -> None:
    site = Site("south", "h", 1, patient_identifier=PatientIdRule("SOUTH"))
    with pytest.raises(MissingPatientIdentifier, match="SOUTH"):
        build(site)


def test_text_the_site_encoding_cannot_carry_is_refused() -> None:
    site = Site("ascii", "h", 1, encoding="ascii")
    with pytest.raises(UnencodableText):
        build(site, impression="Zürich")


def test_obr_and_obx_carry_procedure_radiologist_and_times() -> None:
    _, message = build()
    obr = message.segment("OBR")
    assert str(obr[4]) == "CTCHEST^CT Chest w/o contrast^L"
    assert str(obr[22]) == "20261123193002+0000"
    assert str(obr[32]) == "R-17&Reader&Rita"
    obx = message.segments("OBX")
    assert [str(s[3]) for s in obx] == ["^Findings", "19005-8^Impression^LN"]
    assert {str(s[16]) for s in obx} == {"R-17^Reader^Rita"}


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"accession_number": ""}, MissingAccessionNumber),
        ({"patient": {"identifiers": [{"id": ""}]}}, MissingPatientIdentifier),
        ({"patient": None}, MissingPatientIdentifier),
        ({"sections": []}, EmptyReport),
        ({"sections": [{"text": "  "}], "impression": ""}, EmptyReport),
        ({"radiologist": {}}, ReportError),
    ],
)
def test_documents_that_cannot_be_returned_say_why(change: dict, error: type) -> None:
    with pytest.raises(error) as info:
        document_from(document(**change))
    assert "SENTINEL" not in str(info.value)


def ack(code: str, control: str = "CID", extra: str = "") -> bytes:
    return (
        f"MSH|^~\\&|RIS|H|RADFLOW|T|20261123||ACK^R01^ACK|A1|P|2.5.1\rMSA|{code}|{control}|"
        f"Said \\F\\ this\r{extra}"
    ).encode()


@pytest.mark.parametrize(("code", "read"), [("AA", "AA"), ("AE", "AE"), ("AR", "AR"), ("CA", "AA")])
def test_ack_codes_are_read(code: str, read: str) -> None:
    answer = parse_ack(ack(code), "utf-8", "CID")
    assert answer.code == read and answer.problem == ""


def test_err_segments_keep_their_codes_and_drop_the_ris_s_words() -> None:
    err = (
        "ERR||OBR^1^18|103^Table value not found for DOE^JOHN^HL70357|E||||"
        "Accession ACC-SENTINEL of DOE^JOHN unknown\r"
        "ERR||PID^1^3~PV1^1^2|DOE-SENTINEL^x|severe\r"
        "ERR|PID^1^3^204&Unknown key identifier&HL70357\r"
        "ERR||DOE^1^3|207|W\r"
    )
    answer = parse_ack(ack("AR", extra=err), "utf-8", "CID")
    assert answer.code == "AR"
    assert answer.errors == (
        AckError(hl7_error_code="103", severity="E", location="OBR^1^18"),
        AckError(hl7_error_code=None, severity=None, location="PID^1^3"),
        AckError(hl7_error_code="204", severity=None, location="PID^1^3"),
        AckError(hl7_error_code="207", severity="W", location=None),
    )
    assert "SENTINEL" not in repr(answer) and "Said" not in repr(answer)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not an HL7"),
        (b"hello", "not an HL7"),
        (b"MSH|^~\\&|RIS|H|||2026||ACK|1|P|2.5.1\r", "no MSA"),
        (ack("XX"), "not an acknowledgement code"),
        (ack("AA", control="OTHER-SENTINEL"), "does not acknowledge our control ID 'CID'"),
    ],
)
def test_answers_that_are_not_an_ack_of_our_message_are_invalid(data: bytes, why: str) -> None:
    answer = parse_ack(data, "utf-8", "CID")
    assert answer.code is None and why in answer.problem and "SENTINEL" not in answer.problem
