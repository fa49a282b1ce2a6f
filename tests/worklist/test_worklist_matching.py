"""Modality Worklist matching (PS3.4 K.6 / C.2.2.2), pure."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import SecretStr
from pydicom.dataset import Dataset

from support.worklist import SITES, Order
from worklist.mwl import answer_character_set, item_dataset, match
from worklist.orders import read_message
from worklist.sites import load_sites_text

NOW = datetime(2026, 12, 2, tzinfo=UTC)


def item(order: Order) -> Dataset:
    doc = read_message(order.er7().encode(), load_sites_text(SITES), SecretStr("k"), NOW)
    document = doc.changes[0].document
    assert document is not None
    return item_dataset(document)


def sps_query(**keys: str) -> Dataset:
    ds = Dataset()
    ds.AccessionNumber = ""
    sps = Dataset()
    for keyword, value in keys.items():
        setattr(sps, keyword, value)
    ds.ScheduledProcedureStepSequence = [sps]
    return ds


def test_time_ranges_match_on_the_scheduled_time() -> None:
    ten_thirty = item(Order("A", start="202612021030"))
    assert match(sps_query(ScheduledProcedureStepStartTime="1000-1100"), ten_thirty)
    assert match(sps_query(ScheduledProcedureStepStartTime="1100-"), ten_thirty) is None
    assert match(sps_query(ScheduledProcedureStepStartTime="-1030"), ten_thirty)


def test_universal_keys_are_returned_and_unknown_ones_empty() -> None:
    query = Dataset()
    query.PatientName = ""
    query.AdmissionID = ""  # not kept by the worklist
    query.ScheduledProcedureStepSequence = []
    answer = match(query, item(Order("A", patient_name="Doe^Jane")))
    assert answer is not None
    assert str(answer.PatientName) == "Doe^Jane"
    assert answer.AdmissionID in (None, "")
    (sps,) = answer.ScheduledProcedureStepSequence
    assert sps.Modality == "CT" and sps.ScheduledProcedureStepStatus == "SCHEDULED"
    assert set(answer.keys()) == set(query.keys())


def test_person_names_match_case_insensitively_but_ids_do_not() -> None:
    kept = item(Order("A", patient_name="Doe^Jane", patient_id="abc1"))
    by_name, by_id = Dataset(), Dataset()
    by_name.PatientName = "DOE^JANE"
    by_id.PatientID = "ABC1"
    assert match(by_name, kept) is not None
    assert match(by_id, kept) is None


def test_an_answer_that_does_not_fit_the_sites_character_set_is_sent_in_utf_8() -> None:
    answer = Dataset()
    answer.PatientName = "Ivanov^Ivan"
    assert answer_character_set("ISO_IR 100", answer) == "ISO_IR 100"
    answer.PatientName = "Иванов^Иван"
    assert answer_character_set("ISO_IR 100", answer) == "ISO_IR 192"
