"""The sites file: for each site, whether it takes HL7 ORU over MLLP, a FHIR R4
DiagnosticReport, or both; where its MLLP listener and FHIR server are, how its HL7 is
spelled, and which identifier goes in which field.

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

from radflow_core.oauth2 import ASSERTION_ALGORITHMS
from radflow_rules.destinations import SecretRef, Tls, is_private_channel
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
    "output",
    "fhir",
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
_FHIR_KEYS = {
    "base_url",
    "auth",
    "tls",
    "timeout_s",
    "report_identifier_system",
    "patient_identifier_system",
    "encounter_identifier_system",
    "performer_identifier_system",
    "correction_status",
}
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HD = re.compile(r"^[^|^~\\&\r\n]{0,180}$")
"""An application or facility name: no HL7 delimiters."""


class Output(StrEnum):
    """What a site is sent for each report."""

    ORU = "oru"
    """HL7 v2 ORU^R01 over MLLP (the default)."""
    FHIR = "fhir"
    """A FHIR R4 DiagnosticReport on the site's FHIR server."""
    BOTH = "both"
    """Both, each delivered (and reported) on its own."""

    @property
    def oru(self) -> bool:
        return self is not Output.FHIR

    @property
    def fhir(self) -> bool:
        return self is not Output.ORU


class FhirAuthKind(StrEnum):
    OAUTH2 = "oauth2"
    """OAuth2 client credentials with a client secret (HTTP Basic to the token URL)."""
    SMART_BACKEND = "smart-backend"
    """SMART Backend Services: client credentials with a signed JWT assertion."""


class CorrectionStatus(StrEnum):
    """DiagnosticReport.status of a report sent again after a final one."""

    CORRECTED = "corrected"
    AMENDED = "amended"


@dataclass(frozen=True)
class FhirAuth:
    kind: FhirAuthKind
    token_url: str
    client_id: str
    scope: str | None = None
    client_secret: SecretRef | None = None
    """oauth2: the client secret (from an environment variable or a mounted file)."""
    private_key: SecretRef | None = None
    """smart-backend: the PEM private key that signs the client assertion."""
    algorithm: str = "RS384"
    """smart-backend: RS384 or ES384."""
    key_id: str | None = None
    """smart-backend: the ``kid`` the authorization server knows the key by."""
    jwks_url: str | None = None
    """smart-backend: our JWKS URL, sent as ``jku`` when the server wants it."""


@dataclass(frozen=True)
class FhirEndpoint:
    """A site's FHIR R4 server and how its DiagnosticReports are spelled."""

    base_url: str
    """The FHIR base, e.g. https://ehr.example.org/fhir/R4 (no trailing slash)."""
    auth: FhirAuth | None = None
    tls: Tls | None = None
    timeout_s: float = 30.0
    """Longest wait for one request's answer (connect included)."""
    report_identifier_system: str = "urn:radflow:report-id"
    """DiagnosticReport.identifier system of the platform's report id (the key of the
    conditional create and update); set it to the reporting platform's own URI or OID."""
    patient_identifier_system: str | None = None
    """Identifier.system of the patient (subject); unset: ``urn:oid:<authority>`` when
    the identifier's assigning authority is an OID, the authority itself when it is a
    URI, else none (the authority goes to assigner.display)."""
    encounter_identifier_system: str | None = None
    """Identifier.system of the visit number (encounter)."""
    performer_identifier_system: str | None = None
    """Identifier.system of the radiologist's id (resultsInterpreter, performer)."""
    correction_status: CorrectionStatus = CorrectionStatus.CORRECTED
    """Status of a report sent after a final one: corrected (HL7 C) or amended."""

    def __str__(self) -> str:
        return self.base_url


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
    host: str = ""
    """The RIS's MLLP listener (sites with output oru or both)."""
    port: int = 0
    output: Output = Output.ORU
    fhir: FhirEndpoint | None = None
    """The FHIR server (sites with output fhir or both)."""
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
        mllp = f"{scheme}://{self.host}:{self.port}"
        if self.fhir is None:
            return mllp
        return f"{mllp} + fhir {self.fhir}" if self.output.oru else f"fhir {self.fhir}"


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
        values: dict[str, object] = {"name": name}
        output = Output.ORU
        if "output" in fields:
            chosen = self.choice(fields["output"], "output", tuple(o.value for o in Output))
            if chosen is None:
                return None
            output = Output(chosen)
        values["output"] = output
        if output.fhir:
            if "fhir" not in fields:
                self.fail(node, f"{what} has output {output.value} but no fhir: block")
                return None
            values["fhir"] = self.fhir(fields["fhir"], what)
        elif "fhir" in fields:
            self.fail(fields["fhir"], f"{what} has a fhir: block but output oru (set output)")
        if output.oru:
            missing = [key for key in ("host", "port") if key not in fields]
            if missing:
                self.fail(node, f"{what} needs {' and '.join(missing)} (the RIS's MLLP listener)")
                return None
        for key in ("host", "port"):
            if not output.oru and key in fields:
                self.fail(fields[key], f"{what}: {key} is for MLLP, and output is fhir")
        if "host" in fields:
            values["host"] = self.scalar(fields["host"], "host") or ""
            if not values["host"]:
                self.fail(fields["host"], f"{what}: host is empty")
        if "port" in fields:
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

    def url(self, node: Node, what: str) -> str | None:
        text = (self.scalar(node, what) or "").rstrip("/")
        if not text.startswith(("http://", "https://")) or "?" in text or "#" in text:
            self.fail(node, f"{what} must be an http(s) URL without query (got {text!r})")
            return None
        return text

    def uri(self, node: Node, what: str) -> str | None:
        text = self.scalar(node, what) or ""
        if not _URI.match(text):
            self.fail(node, f"{what} must be an absolute URI, e.g. urn:oid:1.2.3 (got {text!r})")
            return None
        return text

    def fhir(self, node: Node, site: str) -> FhirEndpoint | None:
        what = f"fhir of {site}"
        fields = self.mapping(node, what)
        if fields is None:
            return None
        self.unknown_keys(fields, _FHIR_KEYS, what)
        if "base_url" not in fields:
            self.fail(node, f"{what} needs base_url (the FHIR server's base)")
            return None
        values: dict[str, object] = {"base_url": self.url(fields["base_url"], "base_url")}
        if "auth" in fields:
            values["auth"] = self.fhir_auth(fields["auth"], what)
        if "tls" in fields:
            values["tls"] = self.tls(fields["tls"], f"tls of {what}")
            base = values["base_url"]
            if isinstance(base, str) and not base.startswith("https://"):
                self.fail(fields["tls"], f"{what} has tls but an http:// base_url")
        base = values["base_url"]
        if (
            values.get("auth") is not None
            and isinstance(base, str)
            and not is_private_channel(base)
        ):
            self.fail(
                fields["base_url"],
                f"{what} sends bearer tokens over plain http:// (use https://)",
            )
        if "timeout_s" in fields:
            values["timeout_s"] = self.number(
                fields["timeout_s"], "timeout_s", integer=False, low=0.001, high=3600
            )
        for key in (
            "report_identifier_system",
            "patient_identifier_system",
            "encounter_identifier_system",
            "performer_identifier_system",
        ):
            if key in fields:
                values[key] = self.uri(fields[key], key)
        if "correction_status" in fields:
            chosen = self.choice(
                fields["correction_status"],
                "correction_status",
                tuple(c.value for c in CorrectionStatus),
            )
            values["correction_status"] = CorrectionStatus(chosen) if chosen else None
        if any(value is None for key, value in values.items() if key not in ("auth", "tls")):
            return None
        if "auth" in fields and values["auth"] is None:
            return None
        return FhirEndpoint(**values)  # type: ignore[arg-type]

    def fhir_auth(self, node: Node, what: str) -> FhirAuth | None:
        what = f"auth of {what}"
        fields = self.mapping(node, what)
        if fields is None:
            return None
        kinds = tuple(k.value for k in FhirAuthKind)
        if "type" not in fields:
            self.fail(node, f"{what} needs type: {' or '.join(kinds)}")
            return None
        chosen = self.choice(fields["type"], "type", kinds)
        if chosen is None:
            return None
        kind = FhirAuthKind(chosen)
        secret = "client_secret" if kind is FhirAuthKind.OAUTH2 else "private_key"
        plain = {"token_url", "client_id", "scope"}
        if kind is FhirAuthKind.SMART_BACKEND:
            plain |= {"algorithm", "key_id", "jwks_url"}
        if secret in fields:
            self.fail(
                fields[secret],
                f"{what}: secrets never go in the sites file; use {secret}_env "
                f"(an environment variable) or {secret}_file (a mounted secret)",
            )
        self.unknown_keys(
            {k: v for k, v in fields.items() if k != secret},
            {"type", *plain, f"{secret}_env", f"{secret}_file"},
            what,
        )
        values: dict[str, object] = {"kind": kind}
        for key in ("token_url", "client_id"):
            if key not in fields:
                self.fail(node, f"{what} ({kind.value}) needs {key}")
                return None
        values["token_url"] = self.url(fields["token_url"], "token_url")
        token_url = values["token_url"]
        if isinstance(token_url, str) and not is_private_channel(token_url):
            self.fail(
                fields["token_url"],
                f"{what}: token_url sends the client's credentials over plain http:// "
                "(use https://)",
            )
        values["client_id"] = self.scalar(fields["client_id"], "client_id") or None
        for key in ("scope", "key_id", "jwks_url"):
            if key in fields:
                values[key] = self.scalar(fields[key], key) or None
        if "algorithm" in fields:
            values["algorithm"] = self.choice(
                fields["algorithm"], "algorithm", ASSERTION_ALGORITHMS
            )
        env, file = fields.get(f"{secret}_env"), fields.get(f"{secret}_file")
        if (env is None) == (file is None):
            self.fail(node, f"{what} ({kind.value}) needs one of {secret}_env or {secret}_file")
            return None
        if env is not None:
            values[secret] = SecretRef(env=self.scalar(env, f"{secret}_env"))
        elif file is not None:
            values[secret] = SecretRef(file=Path(self.scalar(file, f"{secret}_file") or ""))
        if any(value is None for key, value in values.items()):
            return None
        return FhirAuth(**values)  # type: ignore[arg-type]

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
