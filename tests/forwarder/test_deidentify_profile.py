"""The PS3.15 Annex E profile on a rich synthetic dataset: what must go goes, what an
option retains stays, pseudonyms and remapped UIDs are consistent."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr._concepts_dict import concepts
from pydicom.uid import generate_uid

from radflow_core.events import Deidentification, DeidOption
from stow_forwarder.__main__ import main as stow_forwarder
from stow_forwarder.confidentiality_table import ROWS
from stow_forwarder.deidentify import (
    OPTION_CODES,
    PSEUDONYMOUS,
    BurnedInAnnotation,
    DeidentificationError,
    Deidentifier,
    table,
)
from stow_forwarder.pseudonyms import Pseudonyms
from support.deid import CT, every_element, leftovers, rich

SC = "1.2.840.10008.5.1.4.1.1.7"
KEY = Pseudonyms(b"test-key-not-for-production")


def deidentify(ds: Dataset, *options: DeidOption, profile: str = "research") -> Dataset:
    request = Deidentification(profile=profile, options=tuple(sorted(options)))
    return Deidentifier(request, KEY).dataset(ds)


def listed_tags() -> set[int]:
    return {int(tag, 16) for tag, *_ in ROWS if "x" not in tag}


def test_no_attribute_the_basic_profile_removes_or_replaces_keeps_its_value() -> None:
    original = rich()
    before = {int(e.tag): e.value for e in every_element(original.copy())}
    ds = deidentify(original)
    assert leftovers(ds) == []
    actions, _ = table(frozenset())
    for element in every_element(ds):
        tag = int(element.tag)
        action = actions.get(tag)
        assert not element.tag.is_private
        assert (element.tag.group & 0xFF00) not in (0x5000, 0x6000)
        if action is None or action.code == "K":
            continue
        assert action.code != "X", f"{element.keyword} should have been removed"
        if action.code == "Z" and element.keyword not in PSEUDONYMOUS:
            assert not element.value, element.keyword
        if element.VR != "SQ" and element.value and tag in before:
            assert element.value != before[tag], f"{element.keyword} kept its value"
    assert ds.InstitutionName == "ANONYMIZED" and ds.StationName == "ANONYMIZED"  # X/Z/D: D
    assert (
        "ReferringPhysicianName" in ds
        and not ds.ReferringPhysicianName
        and "InstitutionAddress" not in ds
    )
    assert ds.OperatorsName == "ANONYMIZED" and ds.DeviceSerialNumber == "ANONYMIZED"
    assert ds.PatientName != "Doe^Jane" and ds.PatientID != "PID-12345"
    assert str(ds.PatientName) == ds.PatientID and ds.PatientID.startswith("RF-")
    assert not ds.PatientBirthDate and not ds.AccessionNumber
    assert "StudyDescription" not in ds and "ImageComments" not in ds
    assert "PatientSex" in ds and not ds.PatientSex  # Z without the option
    assert "PatientAge" not in ds
    assert ds.PixelData == b"\x01\x00\x02\x00\x03\x00\x04\x00"


def test_the_result_declares_what_was_applied_with_cid_7050_codes() -> None:
    ds = deidentify(rich(), DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES)
    assert ds.PatientIdentityRemoved == "YES"
    codes = [(i.CodeValue, i.CodingSchemeDesignator) for i in ds.DeidentificationMethodCodeSequence]
    assert codes == [("113100", "DCM"), ("113107", "DCM")]
    assert ds.DeidentificationMethod[0] == "Basic Application Confidentiality Profile"
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    cid = {
        code: meaning
        for entries in concepts["DCM"].values()
        for code, (meaning, _) in entries.items()
    }
    for value, meaning in OPTION_CODES.values():
        assert cid[value] == meaning


def test_uids_and_references_are_remapped_consistently() -> None:
    original = rich()
    sop, series, study = (
        original.SOPInstanceUID,
        original.SeriesInstanceUID,
        original.StudyInstanceUID,
    )
    source = original.SourceImageSequence[0].ReferencedSOPInstanceUID
    frame = original.FrameOfReferenceUID
    ds = deidentify(original)
    assert ds.SOPInstanceUID == KEY.uid(sop) != sop
    assert ds.SOPInstanceUID.startswith("2.25.") and len(ds.SOPInstanceUID) <= 64
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in ds.file_meta
    assert ds.StudyInstanceUID == KEY.uid(study)
    assert ds.SeriesInstanceUID == KEY.uid(series)
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == KEY.uid(source)
    assert ds.SourceImageSequence[0].ReferencedSOPClassUID == CT  # a class, not an instance
    referenced = ds.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == ds.SeriesInstanceUID
    assert referenced.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    # nested identifying attributes go too
    assert not any(e.keyword == "RequestingPhysician" for e in every_element(ds))
    uids = [e.value for e in every_element(ds) if e.VR == "UI"]
    originals = {sop, series, study, source, frame}
    assert not originals & set(uids)


def test_the_same_patient_gets_the_same_pseudonym_and_date_offset_across_studies() -> None:
    first = deidentify(rich("PID-1"), DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES)
    second = deidentify(rich("PID-1"), DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES)
    other = deidentify(rich("PID-2"), DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES)
    assert first.PatientID == second.PatientID != other.PatientID
    assert first.StudyInstanceUID != second.StudyInstanceUID
    assert first.StudyDate == second.StudyDate
    shared_study = generate_uid()
    a, b = deidentify(rich(study=shared_study)), deidentify(rich(study=shared_study))
    assert a.StudyInstanceUID == b.StudyInstanceUID


def test_dates_shift_by_whole_days_per_patient_with_the_modified_dates_option() -> None:
    ds = deidentify(rich(), DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES)
    days = KEY.days_back("id\x1fHOSP\x1fPID-12345")
    assert 1 <= days <= 3650
    expected = (dt.date(2024, 3, 15) - dt.timedelta(days=days)).strftime("%Y%m%d")
    assert ds.StudyDate == ds.SeriesDate == ds.ContentDate == expected
    assert ds.AcquisitionDateTime == expected + "101500"
    assert ds.StudyTime == "101500"
    assert not ds.PatientBirthDate  # not a longitudinal date: still emptied
    without = deidentify(rich())
    assert not without.StudyDate and without.LongitudinalTemporalInformationModified == "REMOVED"


def test_options_retain_what_they_name_and_nothing_else() -> None:
    ds = deidentify(
        rich(),
        DeidOption.RETAIN_PATIENT_CHARACTERISTICS,
        DeidOption.RETAIN_DEVICE_IDENTITY,
    )
    assert ds.PatientSex == "F" and ds.PatientAge == "054Y" and ds.PatientWeight == "61"
    assert ds.DeviceSerialNumber == "SN-998877" and ds.StationName == "CT01"
    assert ds.PatientID != "PID-12345" and ds.InstitutionName == "ANONYMIZED"
    original = rich()
    kept = deidentify(original.copy(), DeidOption.RETAIN_UIDS)
    assert kept.SOPInstanceUID == original.SOPInstanceUID
    assert kept.StudyInstanceUID == original.StudyInstanceUID
    clean = deidentify(rich(), DeidOption.CLEAN_DESCRIPTORS)
    assert "StudyDescription" not in clean and "SeriesDescription" not in clean


def test_burned_in_annotation_is_refused_unless_the_route_accepts_it(tmp_path: Path) -> None:
    ds = rich()
    ds.BurnedInAnnotation = "YES"
    source = tmp_path / "in.dcm"
    ds.save_as(source, enforce_file_format=True)
    refuse = Deidentifier(Deidentification(profile="research"), KEY)
    with pytest.raises(BurnedInAnnotation, match=r"\(0028,0301\) is YES"):
        refuse.file(source, tmp_path / "out.dcm")
    screen = rich()
    del screen.BurnedInAnnotation
    screen.SOPClassUID = SC
    screen.Modality = "OT"
    screen.save_as(source, enforce_file_format=True)
    with pytest.raises(BurnedInAnnotation, match="absent on a secondary capture"):
        refuse.file(source, tmp_path / "out.dcm")
    accept = Deidentifier(Deidentification(profile="research", accept_burned_in=True), KEY)
    accept.file(source, tmp_path / "out.dcm")
    assert pydicom.dcmread(tmp_path / "out.dcm").PatientIdentityRemoved == "YES"


def test_the_table_is_the_standards_full_list() -> None:
    assert len(ROWS) >= 600
    tags = listed_tags()
    for keyword_tag in (0x00100010, 0x00100020, 0x00080018, 0x00081155, 0x00200052, 0x00081030):
        assert keyword_tag in tags


def test_an_instance_that_cannot_be_read_is_refused_with_its_reason(tmp_path: Path) -> None:
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" * 10)
    deidentifier = Deidentifier(Deidentification(profile="research"), KEY)
    with pytest.raises(DeidentificationError) as caught:
        deidentifier.file(broken, tmp_path / "out.dcm")
    assert caught.value.reason == "cannot_deidentify" and not caught.value.retriable


def test_the_scan_finds_what_the_profile_must_remove() -> None:
    """The check the pipeline test relies on is not vacuous."""
    found = leftovers(rich())
    assert any("PatientBirthDate" in f for f in found)
    assert any("InstitutionAddress" in f for f in found)
    assert any("private" in f for f in found)


def test_check_config_needs_the_pseudonym_key_when_the_rule_file_has_profiles(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "version: 1\ndeidentification:\n  basic:\ndestinations:\n"
        "  r: {url: 'https://r.example', deidentify: basic}\n"
        "rules:\n  - name: all\n    route: [r]\ndefault: {hold: x}\n"
    )
    monkeypatch.setenv("RADFLOW_FORWARDER_RULES_FILE", str(rules))
    monkeypatch.delenv("RADFLOW_DEID_KEY", raising=False)
    assert stow_forwarder(["--check-config"]) == 2
    assert "RADFLOW_DEID_KEY or RADFLOW_DEID_KEY_FILE" in capsys.readouterr().err
    key = tmp_path / "key"
    key.write_text("a-long-random-key\n")
    monkeypatch.setenv("RADFLOW_DEID_KEY_FILE", str(key))
    assert stow_forwarder(["--check-config"]) == 0, capsys.readouterr().err
