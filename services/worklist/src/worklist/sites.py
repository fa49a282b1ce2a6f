"""The worklist's sites file: which HL7 sender is which site, and which modalities
(calling AE titles) belong to it and may see which sites' items.

Read with the rule file's YAML node reader (radflow_rules.yaml_reader), so every
problem is reported at once with its line, and nothing is used before all is checked.

```yaml
version: 1
sites:
  hospital-a:
    sending_facility: HOSP_A      # MSH-4.1 (required)
    sending_applications: [RIS]   # MSH-3.1; absent: any application of that facility
    accession_issuer: HOSP_A      # Issuer of Accession Number (0008,0051); optional
    hl7_encoding: utf-8           # when MSH-18 is empty: utf-8 | iso-8859-1 | ascii
    character_set: ISO_IR 192     # (0008,0005) of the worklist answers
    modalities: [CT_A1, MR_A1]    # calling AE titles of the site's modalities
    sees: [hospital-b]            # federation: other sites' items these modalities see
```
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from yaml.nodes import Node

from radflow_rules.yaml_reader import Problem, YamlFileError, YamlReader, compose, read_text

HL7_ENCODINGS: Mapping[str, str] = MappingProxyType(
    {"utf-8": "utf-8", "iso-8859-1": "latin-1", "ascii": "ascii"}
)
"""Sites-file encoding → Python codec (the default for messages without MSH-18)."""
CHARACTER_SETS: Mapping[str, str] = MappingProxyType(
    {
        "ISO_IR 6": "ascii",
        "ISO_IR 100": "latin-1",
        "ISO_IR 101": "iso8859-2",
        "ISO_IR 109": "iso8859-3",
        "ISO_IR 110": "iso8859-4",
        "ISO_IR 144": "iso8859-5",
        "ISO_IR 127": "iso8859-6",
        "ISO_IR 126": "iso8859-7",
        "ISO_IR 138": "iso8859-8",
        "ISO_IR 148": "iso8859-9",
        "ISO_IR 192": "utf-8",
    }
)
"""DICOM Specific Character Sets (single-byte, without code extensions, and UTF-8) the
answers can be written in → the Python codec that checks a value fits."""
_SITE_KEYS = {
    "sending_facility",
    "sending_applications",
    "accession_issuer",
    "hl7_encoding",
    "character_set",
    "modalities",
    "sees",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HD = re.compile(r"^[^|^~\\&\r\n]{1,180}$")
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
"""An AE title: 1-16 characters of the default repertoire, no backslash."""


@dataclass(frozen=True)
class Site:
    """One ordering site."""

    name: str
    sending_facility: str
    sending_applications: frozenset[str] = frozenset()
    """Empty: any MSH-3 of the facility."""
    accession_issuer: str | None = None
    hl7_encoding: str = "utf-8"
    character_set: str = "ISO_IR 192"
    modalities: frozenset[str] = frozenset()
    sees: frozenset[str] = frozenset()
    """Other sites whose items this site's modalities are shown (federation)."""

    @property
    def hl7_codec(self) -> str:
        return HL7_ENCODINGS[self.hl7_encoding]

    @property
    def visible(self) -> frozenset[str]:
        """The sites whose items this site's modalities see: its own and ``sees``."""
        return self.sees | {self.name}


@dataclass(frozen=True)
class Sites:
    """Every site, and the two look-ups the worklist makes."""

    by_name: Mapping[str, Site]

    def sender(self, facility: str, application: str) -> Site | None:
        """The site that sent a message with this MSH-4.1 and MSH-3.1."""
        for site in self.by_name.values():
            if site.sending_facility == facility and (
                not site.sending_applications or application in site.sending_applications
            ):
                return site
        return None

    def modality(self, calling_ae: str) -> Site | None:
        """The site a modality (calling AE title) belongs to."""
        for site in self.by_name.values():
            if calling_ae in site.modalities:
                return site
        return None


class SitesFileError(YamlFileError):
    """A sites file that cannot be used; lists every problem found, with its line."""

    reason = "invalid_sites_file"


class _Reader(YamlReader):
    def names(self, node: Node, what: str, pattern: re.Pattern[str]) -> frozenset[str]:
        out = set()
        for item in self.sequence(node, what):
            text = self.scalar(item, what)
            if text is None:
                continue
            if not pattern.match(text):
                self.fail(item, f"{what}: {text!r} is not a valid value")
            out.add(text)
        return frozenset(out)

    def sites(self, root: Node) -> Sites | None:
        top = self.mapping(root, "the sites file")
        if top is None:
            return None
        self.unknown_keys(top, {"version", "sites"}, "the sites file")
        if "version" in top and self.scalar(top["version"], "version") != "1":
            self.fail(top["version"], "unsupported version (expected 1)")
        if "sites" not in top:
            self.fail(root, "no 'sites' (expected at least one named site)")
            return None
        nodes = self.mapping(top["sites"], "sites") or {}
        out: dict[str, Site] = {}
        for name, node in nodes.items():
            if not _NAME.match(name):
                self.fail(node, f"site name {name!r} must be letters, digits, '.', '_', '-'")
                continue
            site = self.site(name, node)
            if site is not None:
                out[name] = site
        if not nodes and not self.problems:
            self.fail(top["sites"], "no sites defined")
        self.cross_check(out, nodes)
        return None if self.problems else Sites(MappingProxyType(out))

    def site(self, name: str, node: Node) -> Site | None:
        what = f"site {name!r}"
        fields = self.mapping(node, what)
        if fields is None:
            return None
        self.unknown_keys(fields, _SITE_KEYS, what)
        if "sending_facility" not in fields:
            self.fail(node, f"{what} needs sending_facility (MSH-4 of its orders)")
            return None
        facility = self.scalar(fields["sending_facility"], "sending_facility") or ""
        if not _HD.match(facility):
            self.fail(
                fields["sending_facility"],
                f"{what}: sending_facility must be 1-180 "
                "characters without | ^ ~ \\ & or line breaks",
            )
        values: dict[str, object] = {"name": name, "sending_facility": facility}
        if "sending_applications" in fields:
            values["sending_applications"] = self.names(
                fields["sending_applications"], "sending_applications", _HD
            )
        if "accession_issuer" in fields:
            issuer = self.scalar(fields["accession_issuer"], "accession_issuer") or ""
            if not 0 < len(issuer) <= 64 or "\\" in issuer:
                self.fail(fields["accession_issuer"], "accession_issuer must be 1-64 characters")
            values["accession_issuer"] = issuer
        for key, allowed in (("hl7_encoding", HL7_ENCODINGS), ("character_set", CHARACTER_SETS)):
            if key in fields:
                text = self.scalar(fields[key], key)
                if text not in allowed:
                    self.fail(
                        fields[key], f"{key} must be one of: {', '.join(allowed)} (got {text!r})"
                    )
                values[key] = text
        if "modalities" in fields:
            values["modalities"] = self.names(fields["modalities"], "modalities", _AE)
        if "sees" in fields:
            values["sees"] = self.names(fields["sees"], "sees", _NAME)
        return Site(**values)  # type: ignore[arg-type]

    def cross_check(self, sites: dict[str, Site], nodes: dict[str, Node]) -> None:
        """Every AE title in one site only; every sender pair once; ``sees`` known."""
        owner: dict[str, str] = {}
        senders: dict[tuple[str, str], str] = {}
        for site in sites.values():
            node = nodes[site.name]
            for ae in sorted(site.modalities):
                if ae in owner:
                    self.fail(node, f"modality {ae!r} is in sites {owner[ae]!r} and {site.name!r}")
                owner[ae] = site.name
            for app in sorted(site.sending_applications) or ["*"]:
                pair = (site.sending_facility, app)
                overlapping = [
                    other
                    for (facility, other_app), other in senders.items()
                    if facility == pair[0] and ("*" in (app, other_app) or other_app == app)
                ]
                if overlapping:
                    self.fail(
                        node,
                        f"sites {overlapping[0]!r} and {site.name!r} both take orders from "
                        f"facility {site.sending_facility!r} application {app!r}",
                    )
                senders[pair] = site.name
            for other in sorted(site.sees - set(sites)):
                self.fail(node, f"site {site.name!r} sees {other!r}, which is not a site")


def load_sites_text(text: str, source: str = "<sites>") -> Sites:
    """Parse and validate a sites file's text.

    Raises:
        SitesFileError: with every problem and its line.
    """
    root = compose(text, source, SitesFileError, "the sites file")
    reader = _Reader(source)
    sites = reader.sites(root)
    if sites is None:
        raise SitesFileError(source, reader.problems or [Problem(1, "invalid sites file")])
    return sites


def load_sites(path: Path) -> Sites:
    """Read and validate a sites file.

    Raises:
        SitesFileError: with every problem and its line (one, if it cannot be read).
    """
    return load_sites_text(read_text(path, SitesFileError), str(path))
