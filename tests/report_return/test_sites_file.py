"""The sites file: the example is valid, defaults are what the docs say, and every
mistake is reported with its line, all at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from report_return.__main__ import main
from report_return.sites import (
    DEFAULT_ORDER_FIELDS,
    CorrectionStatus,
    FhirAuthKind,
    Output,
    SitesFileError,
    TextType,
    load_sites,
    load_sites_text,
)

EXAMPLE = Path(__file__).parents[2] / "services" / "report-return" / "examples" / "sites.yaml"


def test_the_example_sites_file_is_valid() -> None:
    sites = load_sites(EXAMPLE)
    assert set(sites) == {"north", "south", "east", "west"}
    south = sites["south"]
    assert south.tls is not None and str(south) == "mllps://ris.south.example:6661"
    assert south.text is TextType.TX and south.charset == "8859/1"
    assert south.order_fields["OBR-3"] == "accession_number"
    assert south.order_fields["OBR-18"] == "accession_number"


def test_host_and_port_are_all_a_site_needs() -> None:
    site = load_sites_text("sites:\n  a: {host: ris, port: 2575}\n")["a"]
    assert (site.hl7_version, site.encoding, site.text, site.processing_id) == (
        "2.5.1",
        "utf-8",
        TextType.FT,
        "P",
    )
    assert dict(site.order_fields) == dict(DEFAULT_ORDER_FIELDS)
    assert site.application_error_retries == 3 and site.ack_timeout_s == 30


BAD = """\
version: 2
sites:
  north:
    host: ris
    port: 70000
    hl7_version: "2.3"
    encoding: ebcdic
    text: RTF
    ack_timeout_s: soon
    sending_facility: "A|B"
    tls: {cert_file: /x.pem}
    order_fields: {OBR-99: accession_number, OBR-18: none}
    colour: blue
  south: {host: ris}
  "bad name": {host: x, port: 1}
"""


def test_every_problem_is_reported_with_its_line() -> None:
    with pytest.raises(SitesFileError) as info:
        load_sites_text(BAD, "sites.yaml")
    lines = "\n".join(info.value.lines)
    for expected in (
        "sites.yaml:1: unsupported version",
        "sites.yaml:5: port must be a whole number from 1 to 65535",
        "sites.yaml:6: hl7_version must be one of: 2.4, 2.5, 2.5.1, 2.6",
        "sites.yaml:7: encoding must be one of: utf-8, iso-8859-1, ascii",
        "sites.yaml:8: text must be one of: FT, TX",
        "sites.yaml:9: ack_timeout_s must be a number",
        "sites.yaml:10: sending_facility must not contain",
        "sites.yaml:11: tls of site 'north': cert_file and key_file go together",
        "sites.yaml:12: order_fields: 'OBR-99' is not a field",
        "sites.yaml:12: order_fields must send the accession_number somewhere",
        "sites.yaml:13: unknown key 'colour'",
        "sites.yaml:14: site 'south' needs port",
        "sites.yaml:15: site name 'bad name' must be",
    ):
        assert expected in lines, f"{expected!r} not in:\n{lines}"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", ":1: the sites file is empty"),
        ("sites: [\n", ":2: not valid YAML"),
        ("version: 1\n", ":1: no 'sites'"),
        ("sites: {}\n", ":1: no sites defined"),
    ],
)
def test_empty_or_broken_files_are_refused(text: str, problem: str) -> None:
    with pytest.raises(SitesFileError, match=problem):
        load_sites_text(text)


def test_check_and_preview_tools(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLE)]) == 0
    assert "4 site(s): OK" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD)
    assert main(["check", str(bad)]) == 1
    assert "problem(s)" in capsys.readouterr().err
    report = tmp_path / "report.json"
    report.write_text(
        '{"accession_number": "A1", "study_instance_uid": "1.2.3", "patient": {"identifiers": '
        '[{"id": "P1", "assigning_authority": "NORTH_MRN"}]}, "sections": [{"text": "x|y"}], '
        '"radiologist": {"name": {"family": "R"}}, "signed_at": "2026-11-23T10:00:00Z"}'
    )
    assert main(["preview", str(EXAMPLE), "north", str(report), "--status", "corrected"]) == 0
    out = capsys.readouterr().out
    assert "OBX|1|FT|" in out and "x\\F\\y" in out and "|C|" in out
    report.write_text(report.read_text().replace("NORTH_MRN", "1.2.840.99999.1"))
    assert main(["preview", str(EXAMPLE), "east", str(report), "--fhir"]) == 0
    resource = json.loads(capsys.readouterr().out)
    assert resource["resourceType"] == "DiagnosticReport" and resource["status"] == "final"
    assert resource["subject"]["identifier"]["system"] == "urn:oid:1.2.840.99999.1"
    assert main(["preview", str(EXAMPLE), "north", str(report), "--fhir"]) == 1
    assert "has no fhir: block" in capsys.readouterr().err


def test_fhir_sites_need_a_fhir_block_and_only_oru_sites_need_host_and_port() -> None:
    sites = load_sites(EXAMPLE)
    east, west = sites["east"], sites["west"]
    assert east.output is Output.BOTH and east.fhir is not None and east.port == 2575
    assert east.fhir.auth is not None and east.fhir.auth.kind is FhirAuthKind.OAUTH2
    assert east.fhir.correction_status is CorrectionStatus.CORRECTED
    assert west.output is Output.FHIR and west.fhir is not None and west.fhir.auth is not None
    assert west.fhir.auth.kind is FhirAuthKind.SMART_BACKEND
    assert west.fhir.auth.algorithm == "RS384" and west.fhir.timeout_s == 30
    assert str(west) == "fhir https://fhir.west.example/r4"
    assert sites["north"].output is Output.ORU and sites["north"].fhir is None


BAD_FHIR = """\
sites:
  a:
    output: fhir
    port: 2575
    fhir:
      base_url: ftp://ehr/fhir
      timeout_s: never
      report_identifier_system: "not a uri"
      correction_status: fixed
  b:
    output: both
    host: ris
    port: 1
    fhir:
      base_url: http://ehr.example/fhir
      auth:
        type: smart-backend
        token_url: http://auth.example/token
        client_id: c
        private_key: "-----BEGIN PRIVATE KEY-----"
        algorithm: RS256
  c: {output: fhir}
  d: {host: ris, port: 1, fhir: {base_url: "https://x"}}
  e: {output: hl7, host: ris, port: 1}
"""


def test_every_problem_of_a_fhir_block_is_reported_with_its_line() -> None:
    with pytest.raises(SitesFileError) as info:
        load_sites_text(BAD_FHIR, "sites.yaml")
    lines = "\n".join(info.value.lines)
    for expected in (
        "sites.yaml:4: site 'a': port is for MLLP, and output is fhir",
        "sites.yaml:6: base_url must be an http(s) URL",
        "sites.yaml:7: timeout_s must be a number",
        "sites.yaml:8: report_identifier_system must be an absolute URI",
        "sites.yaml:9: correction_status must be one of: corrected, amended",
        "sites.yaml:18: auth of fhir of site 'b': token_url sends the client's credentials "
        "over plain http://",
        "sites.yaml:20: auth of fhir of site 'b': secrets never go in the sites file",
        "sites.yaml:21: algorithm must be one of: RS384, ES384",
        "sites.yaml:17: auth of fhir of site 'b' (smart-backend) needs one of private_key_env",
        "sites.yaml:22: site 'c' has output fhir but no fhir: block",
        "sites.yaml:23: site 'd' has a fhir: block but output oru",
        "sites.yaml:24: output must be one of: oru, fhir, both",
    ):
        assert expected in lines, f"{expected!r} not in:\n{lines}"
