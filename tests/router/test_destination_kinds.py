"""Destinations of every kind read from a rule file: STOW-RS, DIMSE and report-return."""

from __future__ import annotations

from radflow_rules.destinations import DestinationKind, DimsePeer
from radflow_rules.loader import load_text

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
