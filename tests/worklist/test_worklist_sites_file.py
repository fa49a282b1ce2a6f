"""The worklist's sites file: every problem with its line, before anything is used."""

from __future__ import annotations

import pytest

from support.worklist import SITES
from worklist.sites import SitesFileError, load_sites_text


def test_the_example_sites_file_maps_senders_and_modalities() -> None:
    sites = load_sites_text(SITES)
    a = sites.sender("HOSP_A", "RIS_A")
    assert a is not None and a.name == "hospital-a"
    assert sites.sender("HOSP_A", "OTHER") is None  # only the listed application
    b = sites.sender("HOSP_B", "ANYTHING")
    assert b is not None and b.name == "hospital-b"  # no list: any application
    reading = sites.modality("READ_ALL")
    assert reading is not None
    assert reading.visible == {"reading-room", "hospital-a", "hospital-b"}
    assert sites.modality("STRANGER") is None


def test_every_problem_is_reported_with_its_line() -> None:
    text = """\
version: 1
sites:
  a:
    sending_facility: HOSP
    character_set: ISO_IR 999
    modalities: [CT1]
  b:
    sending_facility: HOSP
    modalities: [CT1]
    sees: [nowhere]
  c:
    modalities: [MR1]
"""
    with pytest.raises(SitesFileError) as caught:
        load_sites_text(text, "sites.yaml")
    lines = caught.value.lines
    assert any(line.startswith("sites.yaml:5: character_set must be one of") for line in lines)
    assert any(line.startswith("sites.yaml:12: site 'c' needs sending_facility") for line in lines)
    assert any("sites.yaml:8:" in line and "modality 'CT1'" in line for line in lines)
    assert any("sites.yaml:8:" in line and "both take orders" in line for line in lines)
    assert any("sites.yaml:8:" in line and "sees 'nowhere'" in line for line in lines)
