"""Destinations of every kind read from a rule file: STOW-RS, DIMSE and report-return."""

from __future__ import annotations

import pytest

from radflow_rules.destinations import DestinationKind, DimsePeer, Verification
from radflow_rules.loader import RuleFileError, load_text

RULES = """\
version: 1
destinations:
  cloud: {url: "https://pacs.example/dicomweb"}
  onprem:
    kind: dimse
    host: pacs.hospital.local
    port: 104
    ae_title: "PACS "
    calling_ae_title: TELERAD
    transfer_syntaxes: [1.2.840.10008.1.2.1]
  ris-north: {kind: report-return, site: north}
rules:
  - name: everything
    route: [cloud, onprem, ris-north]
default: {hold: unrouted}
"""


def test_dimse_destination_carries_its_peer_and_a_dicom_url() -> None:
    rules = load_text(RULES, "site.yaml")
    onprem = rules.destinations["onprem"]
    assert onprem.kind is DestinationKind.DIMSE
    assert onprem.dimse == DimsePeer("pacs.hospital.local", 104, "PACS", "TELERAD")
    assert onprem.url == "dicom://PACS@pacs.hospital.local:104"
    assert onprem.transfer_syntaxes == ("1.2.840.10008.1.2.1",)
    assert onprem.auth is None and onprem.tls is None


def test_destination_without_kind_is_stow_rs() -> None:
    cloud = load_text(RULES, "site.yaml").destinations["cloud"]
    assert cloud.kind is DestinationKind.STOW_RS
    assert cloud.dimse is None


def test_report_return_destination_names_its_site() -> None:
    ris = load_text(RULES, "site.yaml").destinations["ris-north"]
    assert ris.kind is DestinationKind.REPORT_RETURN
    assert ris.site == "north"
    assert ris.url == "report-return://north"


def test_calling_ae_title_defaults_to_radflow() -> None:
    text = RULES.replace("    calling_ae_title: TELERAD\n", "")
    assert load_text(text, "site.yaml").destinations["onprem"].dimse == DimsePeer(
        "pacs.hospital.local", 104, "PACS", "RADFLOW"
    )


def test_verification_is_off_unless_the_destination_asks_for_it() -> None:
    rules = load_text(RULES, "site.yaml")
    assert {d.verify for d in rules.destinations.values()} == {Verification.OFF}


def test_each_kind_of_destination_takes_its_own_verification() -> None:
    text = RULES.replace(
        'cloud: {url: "https://pacs.example/dicomweb"}',
        'cloud: {url: "https://pacs.example/dicomweb", verify: qido}',
    ).replace("    calling_ae_title: TELERAD\n", "    verify: storage-commitment\n")
    destinations = load_text(text, "site.yaml").destinations
    assert destinations["cloud"].verify is Verification.QIDO
    assert destinations["onprem"].verify is Verification.STORAGE_COMMITMENT
    # Verification is not part of what the destination is: its delivery markers stay.
    assert destinations["cloud"].identity == load_text(RULES).destinations["cloud"].identity


def test_a_verification_the_kind_cannot_do_is_refused_with_its_line() -> None:
    text = RULES.replace(
        'cloud: {url: "https://pacs.example/dicomweb"}',
        'cloud: {url: "https://pacs.example/dicomweb", verify: storage-commitment}',
    ).replace("    calling_ae_title: TELERAD\n", "    verify: qido\n")
    with pytest.raises(RuleFileError) as caught:
        load_text(text, "site.yaml")
    lines = caught.value.lines
    assert any(
        "site.yaml:3" in line
        and "verify 'storage-commitment' is for dimse destinations" in line
        and "expected one of: qido, off" in line
        for line in lines
    ), lines
    assert any(
        "site.yaml:9" in line and "verify 'qido' is for stow-rs destinations" in line
        for line in lines
    ), lines


def test_an_unknown_verification_and_one_on_a_report_return_destination_are_refused() -> None:
    text = RULES.replace(
        'cloud: {url: "https://pacs.example/dicomweb"}',
        'cloud: {url: "https://pacs.example/dicomweb", verify: yes}',
    ).replace(
        "{kind: report-return, site: north}", "{kind: report-return, site: north, verify: qido}"
    )
    with pytest.raises(RuleFileError) as caught:
        load_text(text, "site.yaml")
    lines = caught.value.lines
    assert any("unknown verify 'yes'" in line and "site.yaml:3" in line for line in lines), lines
    assert any("unknown key 'verify'" in line and "site.yaml:11" in line for line in lines), lines
    assert len(lines) == 2, lines
