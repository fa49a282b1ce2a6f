"""The sites file: for each RIS, where its MLLP listener is, how its HL7 is spelled, and
which identifier goes in which field.

Read like the rule file (with the same YAML node reader, radflow_rules.yaml_reader), so
every problem is reported at once with its line, and nothing is used before everything
is checked.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType

from yaml.nodes import Node

from radflow_rules.destinations import Tls
from radflow_rules.yaml_reader import Problem, YamlFileError, YamlReader, compose, read_text


class TextType(StrEnum):
    """How the report's text goes into OBX-5 (see docs/hl7-interface.md)."""

    FT = "FT"
    """One OBX per section, formatted text, line breaks as the escape ``\\.br\\``."""
    TX = "TX"
    """One OBX per line of text, plain text (for RIS that do not render FT)."""


ENCODINGS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "utf-8": ("utf-8", "UNICODE UTF-8"),
        "iso-8859-1": ("latin-1", "8859/1"),
        "ascii": ("ascii", ""),
    }
)
"""Site encoding → (Python codec, MSH-18 character set; empty means ASCII)."""
VERSIONS = ("2.4", "2.5", "2.5.1", "2.6")
"""HL7 versions whose ORU^R01 we build (fields used are the same in each)."""
ORDER_FIELDS = ("ORC-2", "ORC-3", "OBR-2", "OBR-3", "OBR-18", "OBR-19", "OBR-20")
"""Fields an order identifier can be mapped to."""
ORDER_VALUES = ("placer_order_number", "filler_order_number", "accession_number", "none")
"""What can go in them (``none`` leaves the field empty)."""
DEFAULT_ORDER_FIELDS: Mapping[str, str] = MappingProxyType(
    {
        "ORC-2": "placer_order_number",
        "OBR-2": "placer_order_number",
        "ORC-3": "filler_order_number",
        "OBR-3": "filler_order_number",
        "OBR-18": "accession_number",
    }
)
_SITE_KEYS = {
    "host",
    "port",
    "tls",
    "sending_application",
    "sending_facility",
    "receiving_application",
    "receiving_facility",
    "hl7_version",
    "encoding",
    "processing_id",
    "text",
    "ack_timeout_s",
    "connect_timeout_s",
    "application_error_retries",
    "patient_identifier",
    "order_fields",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HD = re.compile(r"^[^|^~\\&\r\n]{0,180}$")
"""An application or facility name: no HL7 delimiters."""


@dataclass(frozen=True)
class PatientIdRule:
    """Which of the report's patient identifiers goes to PID-3, and how it is labelled."""

    assigning_authority: str | None = None
    """Take the identifier from this authority (an identifier without one counts as
    from it); unset: the report's first identifier, with its own authority."""
    type_code: str = "MR"
    """CX-5 when the identifier has none."""


@dataclass(frozen=True)
class Site:
    """One RIS: its MLLP peer and how it wants its HL7."""

    name: str
    host: str
    port: int
    tls: Tls | None = None
    sending_application: str = "RADFLOW"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    hl7_version: str = "2.5.1"
    encoding: str = "utf-8"
    processing_id: str = "P"
    text: TextType = TextType.FT
    ack_timeout_s: float = 30.0
    """Longest wait for the ACK after the message is written."""
    connect_timeout_s: float = 10.0
    """Longest wait for the TCP (and TLS) connection."""
    application_error_retries: int = 3
    """How often an AE answer is retried before the report goes to report.failed."""
    patient_identifier: PatientIdRule = field(default_factory=PatientIdRule)
    order_fields: Mapping[str, str] = field(default_factory=lambda: DEFAULT_ORDER_FIELDS)
    """HL7 field (e.g. OBR-18) → which identifier goes there."""

    @property
    def codec(self) -> str:
        """The Python codec of the site's encoding."""
        return ENCODINGS[self.encoding][0]

    @property
    def charset(self) -> str:
        """MSH-18 for the site's encoding (empty for ASCII)."""
        return ENCODINGS[self.encoding][1]

    def __str__(self) -> str:
        scheme = "mllps" if self.tls else "mllp"
        return f"{scheme}://{self.host}:{self.port}"


class SitesFileError(YamlFileError):
    """A sites file that cannot be used; lists every problem found, with its line."""

    reason = "invalid_sites_file"


class _SitesReader(YamlReader):
    def number(
        self, node: Node, what: str, *, integer: bool, low: float, high: float
    ) -> float | None:
        text = self.scalar(node, what) or ""
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            kind = "a whole number" if integer else "a number"
            self.fail(node, f"{what} must be {kind} from {low:g} to {high:g} (got {text!r})")
            return None
        return value

    def choice(self, node: Node, what: str, allowed: tuple[str, ...]) -> str | None:
        text = self.scalar(node, what)
        if text not in allowed:
            self.fail(node, f"{what} must be one of: {', '.join(allowed)} (got {text!r})")
            return None
        return text

    def sites(self, root: Node) -> dict[str, Site] | None:
        top = self.mapping(root, "the sites file")
        if top is None:
            return None
        self.unknown_keys(top, {"version", "sites"}, "the sites file")
        if "version" in top and self.scalar(top["version"], "version") != "1":
            self.fail(top["version"], "unsupported version (expected 1)")
        if "sites" not in top:
            self.fail(root, "no 'sites' (expected at least one named site)")
            return None
        out: dict[str, Site] = {}
        for name, node in (self.mapping(top["sites"], "sites") or {}).items():
            if not _NAME.match(name):
                self.fail(node, f"site name {name!r} must be letters, digits, '.', '_', '-'")
                continue
            site = self.site(name, node)
            if site is not None:
                out[name] = site
        if not out and not self.problems:
            self.fail(top["sites"], "no sites defined")
        return None if self.problems else out

    def site(self, name: str, node: Node) -> Site | None:
        what = f"site {name!r}"
        fields = self.mapping(node, what)
        if fields is None:
            return None
        self.unknown_keys(fields, _SITE_KEYS, what)
        missing = [key for key in ("host", "port") if key not in fields]
        if missing:
            self.fail(node, f"{what} needs {' and '.join(missing)} (the RIS's MLLP listener)")
            return None
        values: dict[str, object] = {"name": name}
        values["host"] = self.scalar(fields["host"], "host") or ""
        if not values["host"]:
            self.fail(fields["host"], f"{what}: host is empty")
        values["port"] = self.number(fields["port"], "port", integer=True, low=1, high=65535)
        for key in (
            "sending_application",
            "sending_facility",
            "receiving_application",
            "receiving_facility",
        ):
            if key in fields:
                text = self.scalar(fields[key], key) or ""
                if not _HD.match(text):
                    self.fail(fields[key], f"{key} must not contain | ^ ~ \\ & or line breaks")
                values[key] = text
        if "hl7_version" in fields:
            values["hl7_version"] = self.choice(fields["hl7_version"], "hl7_version", VERSIONS)
        if "encoding" in fields:
            values["encoding"] = self.choice(fields["encoding"], "encoding", tuple(ENCODINGS))
        if "processing_id" in fields:
            values["processing_id"] = self.choice(
                fields["processing_id"], "processing_id", ("P", "T", "D")
            )
        if "text" in fields:
            text_type = self.choice(fields["text"], "text", tuple(t.value for t in TextType))
            values["text"] = TextType(text_type) if text_type else None
        for key, high in (("ack_timeout_s", 3600.0), ("connect_timeout_s", 600.0)):
            if key in fields:
                values[key] = self.number(fields[key], key, integer=False, low=0.001, high=high)
        if "application_error_retries" in fields:
            values["application_error_retries"] = self.number(
                fields["application_error_retries"],
                "application_error_retries",
                integer=True,
                low=0,
                high=100,
            )
        if "tls" in fields:
            values["tls"] = self.tls(fields["tls"], f"tls of {what}")
        if "patient_identifier" in fields:
            values["patient_identifier"] = self.patient_id_rule(fields["patient_identifier"])
        if "order_fields" in fields:
            values["order_fields"] = self.order_fields(fields["order_fields"])
        if any(value is None for key, value in values.items() if key != "tls"):
            return None
        return Site(**values)  # type: ignore[arg-type]

    def patient_id_rule(self, node: Node) -> PatientIdRule | None:
        fields = self.mapping(node, "patient_identifier")
        if fields is None:
            return None
        self.unknown_keys(fields, {"assigning_authority", "type_code"}, "patient_identifier")
        authority = (
            self.scalar(fields["assigning_authority"], "assigning_authority")
            if "assigning_authority" in fields
            else None
        )
        type_code = self.scalar(fields["type_code"], "type_code") if "type_code" in fields else "MR"
        for key, value in (("assigning_authority", authority), ("type_code", type_code)):
            if value is not None and not _HD.match(value):
                self.fail(fields[key], f"{key} must not contain | ^ ~ \\ & or line breaks")
        return PatientIdRule(authority or None, type_code or "MR")

    def order_fields(self, node: Node) -> Mapping[str, str] | None:
        fields = self.mapping(node, "order_fields")
        if fields is None:
            return None
        mapping = dict(DEFAULT_ORDER_FIELDS)
        for key, value in fields.items():
            if key not in ORDER_FIELDS:
                self.fail(
                    value,
                    f"order_fields: {key!r} is not a field identifiers can go to (expected one "
                    f"of: {', '.join(ORDER_FIELDS)})",
                )
                continue
            chosen = self.choice(value, f"order_fields {key}", ORDER_VALUES)
            if chosen is not None:
                mapping[key] = chosen
        if "accession_number" not in mapping.values():
            self.fail(node, "order_fields must send the accession_number somewhere")
        return MappingProxyType({k: v for k, v in mapping.items() if v != "none"})


def load_sites_text(text: str, source: str = "<sites>") -> dict[str, Site]:
    """Parse and validate a sites file's text.

    Raises:
        SitesFileError: with every problem and its line.
    """
    root = compose(text, source, SitesFileError, "the sites file")
    reader = _SitesReader(source)
    sites = reader.sites(root)
    if sites is None:
        raise SitesFileError(source, reader.problems or [Problem(1, "invalid sites file")])
    return sites


def load_sites(path: Path) -> dict[str, Site]:
    """Read and validate a sites file.

    Raises:
        SitesFileError: with every problem and its line (one, if it cannot be read).
    """
    return load_sites_text(read_text(path, SitesFileError), str(path))
