"""Reading a rule file: YAML in, a validated :class:`RuleSet` out, or every problem
with its line and what was expected.

The YAML is walked as a node tree (not loaded into dicts) so each error can name the
line it stands on. Everything is checked before anything is used: unknown
destinations, bad regular expressions, unknown time zones, malformed windows, unknown
attributes or tags, typos in keys. Rules that can never match are warned about.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from datetime import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydicom.datadict import keyword_dict, keyword_for_tag
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from radflow_core.events import DeidOption, Lane
from radflow_core.uids import is_valid_uid
from radflow_rules import yaml_reader
from radflow_rules.deidentification import DeidProfile
from radflow_rules.destinations import (
    AUTH_FIELDS,
    VERIFICATION_KINDS,
    Auth,
    AuthKind,
    DestinationKind,
    DimsePeer,
    SecretRef,
    Verification,
    is_private_channel,
)
from radflow_rules.orders import ORDER_ATTRIBUTES
from radflow_rules.rules import (
    DAYS,
    All,
    Any_,
    Condition,
    Default,
    Destination,
    Equals,
    Exists,
    IsStat,
    LatencyObjective,
    Level,
    Matches,
    Not,
    PreviewKind,
    PreviewSelection,
    Rule,
    RuleSet,
    Slo,
    StatPolicy,
    StudyComplete,
    TimeWindow,
)
from radflow_rules.yaml_reader import Problem, YamlFileError, YamlReader, compose

EVENT_ATTRIBUTES = {
    "modality": "modality",
    "body_part_examined": "body_part_examined",
    "sop_class_uid": "sop_class_uid",
    "calling_ae": "calling_ae",
    "called_ae": "called_ae",
    "sender_identity": "sender_identity",
    "study_description": "StudyDescription",
    "institution": "InstitutionName",
    **{name: name for name in ORDER_ATTRIBUTES},
}
"""Attribute names a rule may use besides DICOM keywords and (gggg,eeee) tags (the
``order_*`` ones: the instance's order, :mod:`radflow_rules.orders`)."""
_TAG = re.compile(r"^\(([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})\)$")
_WINDOW = re.compile(r"^(\d\d):(\d\d)-(\d\d):(\d\d)$")
_RULE_KEYS = {"name", "when", "route", "lane", "wait_for_study_complete", "continue", "preview"}
_DEID_RULE_KEYS = {"deidentify", "accept_burned_in"}
_TOP_KEYS = {"version", "timezone", "destinations", "rules", "default", "stat", "deidentification"}
_COMMON_DEST_KEYS = {"kind", "transfer_syntaxes", "max_batch", "priority"}
_DEST_KEYS = {
    DestinationKind.STOW_RS: _COMMON_DEST_KEYS
    | {"url", "auth", "tls", "slo", "verify", "deidentify"},
    DestinationKind.DIMSE: _COMMON_DEST_KEYS
    | {"host", "port", "ae_title", "calling_ae_title", "tls", "slo", "verify", "deidentify"},
    DestinationKind.REPORT_RETURN: _COMMON_DEST_KEYS | {"site"},
}
"""Keys each kind of destination takes (``tls`` on a DIMSE peer: DICOM TLS; ``slo``
only where the forwarder delivers, which is what measures it)."""
_SLO_KEYS = {"within_s", "percent"}
RESERVED_NAMES = frozenset({"unknown-destinations"})
"""Destination names the forwarder uses for consumer groups of its own."""
IDENTITY_KINDS = ("jwt:", "apikey:", "cert:")
"""How an authenticated sender's identity starts (radflow_core.events.Sender.identity)."""
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


class RuleFileError(YamlFileError):
    """A rule file that cannot be used; lists every problem found, with its line."""

    reason = "invalid_rule_file"


class _RuleReader(YamlReader):
    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.zone = ZoneInfo("UTC")
        self.attributes: set[str] = set()
        self.rule_attributes: set[str] = set()
        """The attributes the condition of the rule being read uses."""
        self.profiles: dict[str, DeidProfile] = {}

    def zone_of(self, node: Node) -> ZoneInfo | None:
        name = self.scalar(node, "timezone")
        if name is None:
            return None
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            self.fail(
                node,
                f"unknown time zone {name!r} (expected an IANA name such as "
                "Europe/Zurich or America/New_York)",
            )
            return None

    # The file.

    def ruleset(self, root: Node) -> RuleSet | None:
        top = self.mapping(root, "the rule file")
        if top is None:
            return None
        self.unknown_keys(top, _TOP_KEYS, "the rule file")
        if "version" in top and self.scalar(top["version"], "version") != "1":
            self.fail(top["version"], "unsupported version (expected 1)")
        if "timezone" in top:
            self.zone = self.zone_of(top["timezone"]) or self.zone
        if "deidentification" in top:
            self.profiles = self.deid_profiles(top["deidentification"])
        destinations = self.destinations(top.get("destinations"), root)
        stat = self.stat_policy(top.get("stat"))
        rules: list[Rule] = []
        seen: dict[str, int] = {}
        if "rules" not in top:
            self.fail(root, "no 'rules' list (expected at least one rule)")
        else:
            for node in self.sequence(top["rules"], "rules"):
                rule = self.rule(node, destinations)
                if rule is None:
                    continue
                if rule.name in seen:
                    self.fail(
                        node, f"rule name {rule.name!r} already used on line {seen[rule.name]}"
                    )
                seen[rule.name] = rule.line
                rules.append(rule)
        default = self.default(top.get("default"), root, destinations)
        self.check_reachability(rules, top.get("rules"))
        if self.problems or default is None:
            return None
        return RuleSet(
            destinations,
            tuple(rules),
            default,
            stat,
            tuple(self.warnings),
            attributes=frozenset(self.attributes),
            profiles=dict(self.profiles),
        )

    def destinations(self, node: Node | None, root: Node) -> dict[str, Destination]:
        if node is None:
            self.fail(root, "no 'destinations' (expected at least one named destination)")
            return {}
        items = self.mapping(node, "destinations") or {}
        out: dict[str, Destination] = {}
        for name, value in items.items():
            fields = self.mapping(value, f"destination {name!r}")
            if fields is None:
                continue
            what = f"destination {name!r}"
            if name in RESERVED_NAMES:
                self.fail(
                    value,
                    f"{what}: the name is reserved (the forwarder's consumer groups for "
                    "requests no destination takes use it); choose another",
                )
                continue
            kind_text = self.scalar(fields["kind"], "kind") if "kind" in fields else "stow-rs"
            if kind_text not in {k.value for k in DestinationKind}:
                self.fail(
                    fields["kind"],
                    f"{what} has kind {kind_text!r} (expected one of: "
                    f"{', '.join(k.value for k in DestinationKind)})",
                )
                continue
            kind = DestinationKind(kind_text)
            self.unknown_keys(fields, _DEST_KEYS[kind], f"{what} ({kind.value})")
            syntaxes: list[str] = []
            if "transfer_syntaxes" in fields:
                for item in self.sequence(fields["transfer_syntaxes"], "transfer_syntaxes"):
                    syntax = self.scalar(item, "transfer syntax")
                    if syntax is not None and not is_valid_uid(syntax):
                        self.fail(item, f"{syntax!r} is not a transfer syntax UID")
                    elif syntax is not None:
                        syntaxes.append(syntax)
            max_batch = 50
            if "max_batch" in fields:
                text = self.scalar(fields["max_batch"], "max_batch") or ""
                if not text.isdigit() or int(text) < 1:
                    self.fail(fields["max_batch"], "max_batch must be a whole number >= 1")
                else:
                    max_batch = int(text)
            lane = None
            if "priority" in fields:
                priority = self.scalar(fields["priority"], "priority")
                if priority not in ("routine", "stat"):
                    self.fail(fields["priority"], "priority must be routine or stat")
                else:
                    lane = Lane(priority)
            common: dict[str, Any] = {"lane": lane, "kind": kind}
            if "verify" in fields and "verify" in _DEST_KEYS[kind]:
                verify = self.verification(fields["verify"], kind, what)
                if verify is not None:
                    common["verify"] = verify
            url: str | None
            if kind is DestinationKind.DIMSE:
                peer = self.dimse_peer(fields, value, what)
                if peer is None:
                    continue
                common["dimse"] = peer
                url = str(peer)
                auth = None
                tls = (
                    self.tls(fields["tls"], f"tls of {what}", server_name=True)
                    if "tls" in fields
                    else None
                )
            elif kind is DestinationKind.REPORT_RETURN:
                site = self.scalar(fields["site"], "site") if "site" in fields else None
                if not site:
                    self.fail(value, f"{what} needs site: the RIS site report-return sends to")
                    continue
                common["site"] = site
                url = f"report-return://{site}"
                auth, tls = None, None
            else:
                url = self.scalar(fields["url"], "url") if "url" in fields else None
                if not url or not url.startswith(("http://", "https://")):
                    self.fail(
                        fields.get("url", value),
                        f"{what} needs a url starting with http:// or https://",
                    )
                    continue
                auth = self.auth(fields["auth"], name) if "auth" in fields else None
                tls = self.tls(fields["tls"], f"tls of {what}") if "tls" in fields else None
                if tls is not None and not url.startswith("https://"):
                    self.fail(fields["tls"], f"{what} has tls but an http:// url")
                if auth is not None and not is_private_channel(url):
                    self.fail(
                        fields["url"],
                        f"{what} sends {auth.kind.value} credentials over plain http:// "
                        "(use https://)",
                    )
            if "slo" in fields:
                common["slo"] = self.slo(fields["slo"], what)
            if "deidentify" in fields:
                common["deidentify"] = self.profile_named(fields["deidentify"], what)
            out[name] = Destination(name, url, auth, tuple(syntaxes), max_batch, tls=tls, **common)
        return out

    def verification(self, node: Node, kind: DestinationKind, what: str) -> Verification | None:
        text = self.scalar(node, "verify")
        fits = [v for v, k in VERIFICATION_KINDS.items() if k is kind]
        expected = ", ".join([*(v.value for v in fits), Verification.OFF.value])
        if text not in {v.value for v in Verification}:
            self.fail(node, f"{what}: unknown verify {text!r} (expected one of: {expected})")
            return None
        verify = Verification(text)
        if verify is not Verification.OFF and VERIFICATION_KINDS[verify] is not kind:
            self.fail(
                node,
                f"{what}: verify {verify.value!r} is for {VERIFICATION_KINDS[verify].value} "
                f"destinations, this one is {kind.value} (expected one of: {expected})",
            )
            return None
        return verify

    def slo(self, node: Node, what: str) -> Slo:
        """``slo: {stat: {within_s: 60, percent: 99}, routine: {...}}``: per lane, the
        share of instances that must be acknowledged within so many seconds."""
        lanes = self.mapping(node, f"slo of {what}") or {}
        self.unknown_keys(lanes, {lane.value for lane in Lane}, f"slo of {what}")
        objectives: dict[str, LatencyObjective] = {}
        for lane in Lane:
            if lane.value in lanes:
                objective = self.objective(lanes[lane.value], f"slo.{lane.value} of {what}")
                if objective is not None:
                    objectives[lane.value] = objective
        if not lanes and isinstance(node, MappingNode):
            self.fail(node, f"slo of {what} names no lane (expected routine and/or stat)")
        return Slo(**objectives)

    def objective(self, node: Node, what: str) -> LatencyObjective | None:
        fields = self.mapping(node, what)
        if fields is None:
            return None
        self.unknown_keys(fields, _SLO_KEYS, what)
        missing = sorted(_SLO_KEYS - set(fields))
        if missing:
            self.fail(
                node,
                f"{what} needs {' and '.join(missing)} (e.g. within_s: 300, percent: 99: "
                "99% of instances delivered within 300 s)",
            )
            return None
        within = self.number(fields["within_s"], f"{what}: within_s")
        if within is not None and within <= 0:
            self.fail(fields["within_s"], f"{what}: within_s must be more than 0 seconds")
            within = None
        percent = self.number(fields["percent"], f"{what}: percent")
        if percent is not None and not 0 < percent < 100:
            self.fail(
                fields["percent"],
                f"{what}: percent must be above 0 and below 100 (100 leaves no error "
                "budget to burn; 99.9 is three nines)",
            )
            percent = None
        if within is None or percent is None:
            return None
        return LatencyObjective(within, percent)

    def number(self, node: Node, what: str) -> float | None:
        text = self.scalar(node, what)
        if text is None:
            return None
        try:
            value = float(text)
        except ValueError:
            self.fail(node, f"{what} must be a number (got {text!r})")
            return None
        if not math.isfinite(value):
            self.fail(node, f"{what} must be a finite number (got {text!r})")
            return None
        return value

    def dimse_peer(self, fields: dict[str, Node], node: Node, what: str) -> DimsePeer | None:
        missing = [key for key in ("host", "port", "ae_title") if key not in fields]
        if missing:
            self.fail(node, f"{what} (dimse) needs {', '.join(missing)}")
            return None
        problems = len(self.problems)
        host = self.scalar(fields["host"], "host") or ""
        if not host:
            self.fail(fields["host"], f"{what}: host is empty")
        port_text = self.scalar(fields["port"], "port") or ""
        port = int(port_text) if port_text.isdigit() else 0
        if not 1 <= port <= 65535:
            self.fail(fields["port"], f"{what}: port must be a number from 1 to 65535")
        titles = {}
        for key in ("ae_title", "calling_ae_title"):
            if key not in fields:
                continue
            title = self.scalar(fields[key], key) or ""
            if not _AE_TITLE.match(title) or not title.strip():
                self.fail(
                    fields[key],
                    f"{what}: {key} {title!r} is not an AE title (1 to 16 characters, "
                    "no backslash or control characters)",
                )
            titles[key] = title.strip()
        if len(self.problems) > problems:
            return None
        return DimsePeer(host, port, **titles)

    def auth(self, node: Node, destination: str) -> Auth | None:
        what = f"auth of destination {destination!r}"
        fields = self.mapping(node, what)
        if fields is None:
            return None
        kind_text = self.scalar(fields["type"], "type") if "type" in fields else None
        if kind_text not in {k.value for k in AuthKind}:
            self.fail(
                fields.get("type", node),
                f"{what} needs type: basic, bearer or oauth2 (got {kind_text!r})",
            )
            return None
        kind = AuthKind(kind_text)
        plain, secret = AUTH_FIELDS[kind]
        allowed = (
            {"type", "scope"} | plain | {f"{s}_env" for s in secret} | {f"{s}_file" for s in secret}
        )
        for name in secret & set(fields):
            self.fail(
                fields[name],
                f"{what}: secrets never go in the rule file; use {name}_env "
                f"(an environment variable) or {name}_file (a mounted secret)",
            )
        self.unknown_keys({k: v for k, v in fields.items() if k not in secret}, allowed, what)
        values: dict[str, Any] = {}
        for name in sorted(plain):
            if name not in fields:
                self.fail(node, f"{what} ({kind.value}) needs {name}")
            else:
                values[name] = self.scalar(fields[name], name)
        for name in sorted(secret):
            env, file = fields.get(f"{name}_env"), fields.get(f"{name}_file")
            if (env is None) == (file is None):
                self.fail(node, f"{what} ({kind.value}) needs one of {name}_env or {name}_file")
                continue
            if env is not None:
                values[name] = SecretRef(env=self.scalar(env, f"{name}_env"))
            elif file is not None:
                values[name] = SecretRef(file=Path(self.scalar(file, f"{name}_file") or ""))
        if "scope" in fields:
            values["scope"] = self.scalar(fields["scope"], "scope")
        token_url = values.get("token_url")
        if token_url is not None and not str(token_url).startswith(("http://", "https://")):
            self.fail(fields["token_url"], f"{what}: token_url must be an http(s) URL")
        elif token_url is not None and not is_private_channel(str(token_url)):
            self.fail(
                fields["token_url"],
                f"{what}: token_url sends the client secret over plain http:// (use https://)",
            )
        return Auth(kind, **values)

    def stat_policy(self, node: Node | None) -> StatPolicy:
        if node is None:
            return StatPolicy(from_priority=True, calling_aes=frozenset())
        fields = self.mapping(node, "stat") or {}
        self.unknown_keys(fields, {"from_priority", "calling_aes", "identities"}, "stat")
        from_priority = True
        if "from_priority" in fields:
            from_priority = self.boolean(fields["from_priority"], "from_priority")
        aes = (
            frozenset(
                s
                for s in (
                    self.scalar(n, "AE title")
                    for n in self.sequence(fields.get("calling_aes", node), "calling_aes")
                )
                if s
            )
            if "calling_aes" in fields
            else frozenset()
        )
        identities = (
            frozenset(
                s
                for s in (
                    self.identity(n, "stat identities")
                    for n in self.sequence(fields.get("identities", node), "identities")
                )
                if s
            )
            if "identities" in fields
            else frozenset()
        )
        return StatPolicy(from_priority, aes, identities)

    def identity(self, node: Node, what: str) -> str | None:
        """A sender identity as ingest records it (``apikey:site-a``, ``cert:CN``,
        ``jwt:<issuer>#<subject>``); anything else is a line error."""
        text = self.scalar(node, what)
        if text is not None and (
            not text.startswith(IDENTITY_KINDS) or text.endswith(IDENTITY_KINDS)
        ):
            self.fail(
                node,
                f"{what}: {text!r} is not a sender identity (expected apikey:<name>, "
                "cert:<common name> or jwt:<issuer>#<subject>)",
            )
            return None
        return text

    def rule(self, node: Node, destinations: dict[str, Destination]) -> Rule | None:
        fields = self.mapping(node, "a rule")
        if fields is None:
            return None
        self.unknown_keys(fields, _RULE_KEYS | _DEID_RULE_KEYS, "a rule")
        name = self.scalar(fields["name"], "name") if "name" in fields else None
        if not name:
            self.fail(node, "a rule needs a name")
            return None
        when: Condition = All(())
        self.rule_attributes = set()
        if "when" in fields:
            when = self.condition(fields["when"]) or All(())
        route = self.route(fields.get("route"), node, destinations, f"rule {name!r}")
        if "route" not in fields or not self.sequence(fields["route"], "route"):
            self.fail(node, f"rule {name!r} routes nowhere (expected route: [destination, ...])")
        lane = None
        if "lane" in fields:
            text = self.scalar(fields["lane"], "lane")
            if text not in ("routine", "stat"):
                self.fail(fields["lane"], "lane must be routine or stat")
            else:
                lane = Lane(text)
        wait = (
            self.wait(fields["wait_for_study_complete"])
            if "wait_for_study_complete" in fields
            else None
        )
        stop = True
        if "continue" in fields:
            stop = not self.boolean(fields["continue"], "continue")
        preview = self.preview(fields["preview"], name) if "preview" in fields else None
        reports = [d for d in route if destinations[d].kind is DestinationKind.REPORT_RETURN]
        if preview is not None and reports:
            self.fail(
                fields["preview"],
                f"rule {name!r} asks for previews but routes to {', '.join(reports)} "
                "(report-return takes Structured Reports, not images)",
            )
        on_orders = sorted(self.rule_attributes & set(ORDER_ATTRIBUTES))
        if preview is not None and on_orders:
            # Transcode decides which previews to make and has no order table: such a
            # rule would silently never get one.
            self.fail(
                fields["preview"],
                f"rule {name!r} asks for previews but its condition reads the order "
                f"({', '.join(on_orders)}), which previews are not matched with; "
                "select the study by its own attributes",
            )
        rule = Rule(
            name, when, tuple(route), lane, wait, stop, node.start_mark.line + 1, preview=preview
        )
        return self.rule_deidentification(rule, fields, destinations)

    def rule_deidentification(
        self, rule: Rule, fields: dict[str, Node], destinations: dict[str, Destination]
    ) -> Rule:
        """``deidentify: <profile>`` and ``accept_burned_in: true`` of a rule."""
        what = f"rule {rule.name!r}"
        profile = self.profile_named(fields["deidentify"], what) if "deidentify" in fields else None
        accept = False
        if "accept_burned_in" in fields:
            accept = self.boolean(fields["accept_burned_in"], "accept_burned_in")
            required = any(
                destinations[d].deidentify is not None for d in rule.route if d in destinations
            )
            if accept and "deidentify" not in fields and not required:
                self.fail(
                    fields["accept_burned_in"],
                    f"{what}: accept_burned_in applies to de-identified routes, and this "
                    "rule de-identifies nothing (add deidentify: <profile>)",
                )
        if profile is not None:
            for name in rule.route:
                destination = destinations.get(name)
                if destination is not None and destination.kind is DestinationKind.REPORT_RETURN:
                    self.fail(
                        fields["deidentify"],
                        f"{what}: destination {name!r} is a RIS (kind report-return), which "
                        "receives HL7 reports and cannot be de-identified; route it from a "
                        "rule of its own",
                    )
        return dataclasses.replace(rule, deidentify=profile, accept_burned_in=accept)

    def deid_profiles(self, node: Node) -> dict[str, DeidProfile]:
        """``deidentification: {name: {options: [...]}}``: the named profiles."""
        profiles: dict[str, DeidProfile] = {}
        known = ", ".join(o.value for o in DeidOption)
        for name, value in (self.mapping(node, "deidentification") or {}).items():
            what = f"de-identification profile {name!r}"
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or "+" in name:
                self.fail(value, f"{what}: a name is letters, digits, '.', '_' or '-'")
                continue
            fields = self.mapping(value, what) if not _empty(value) else {}
            if fields is None:
                continue
            self.unknown_keys(fields, {"options"}, what)
            options: set[DeidOption] = set()
            if "options" in fields:
                for item in self.sequence(fields["options"], f"options of {what}"):
                    text = self.scalar(item, "option")
                    if text not in {o.value for o in DeidOption}:
                        self.fail(
                            item, f"{what}: unknown option {text!r} (expected one of: {known})"
                        )
                    else:
                        options.add(DeidOption(text))
            profiles[name] = DeidProfile(name, frozenset(options), value.start_mark.line + 1)
        return profiles

    def profile_named(self, node: Node, what: str) -> DeidProfile | None:
        name = self.scalar(node, "deidentify")
        if name is None:
            return None
        if name not in self.profiles:
            self.fail(
                node,
                f"{what}: unknown de-identification profile {name!r} (expected one of: "
                f"{', '.join(sorted(self.profiles)) or 'none defined under deidentification:'})",
            )
            return None
        return self.profiles[name]

    def preview(self, node: Node, rule: str) -> PreviewSelection | None:
        """``preview: first``, ``preview: key-frames`` or ``preview: {every: N}``."""
        expected = "expected preview: first, preview: key-frames or preview: {every: N}"
        if isinstance(node, MappingNode):
            fields = self.mapping(node, f"preview of rule {rule!r}") or {}
            self.unknown_keys(fields, {"every"}, f"preview of rule {rule!r}")
            if "every" not in fields:
                self.fail(node, f"preview of rule {rule!r} names no selection ({expected})")
                return None
            text = self.scalar(fields["every"], "every") or ""
            if not text.isdigit() or int(text) < 1:
                self.fail(
                    fields["every"],
                    f"preview of rule {rule!r}: every must be a whole number >= 1 (got {text!r})",
                )
                return None
            return PreviewSelection(PreviewKind.EVERY, int(text))
        kind = self.scalar(node, "preview")
        if kind not in (PreviewKind.FIRST.value, PreviewKind.KEY_FRAMES.value):
            if kind is not None:
                self.fail(node, f"rule {rule!r}: unknown preview {kind!r} ({expected})")
            return None
        return PreviewSelection(PreviewKind(kind))

    def route(
        self, node: Node | None, owner: Node, destinations: dict[str, Destination], what: str
    ) -> list[str]:
        if node is None:
            return []
        names = []
        for item in self.sequence(node, f"route of {what}"):
            name = self.scalar(item, "destination")
            if name is None:
                continue
            if name not in destinations:
                self.fail(
                    item,
                    f"unknown destination {name!r} in {what} (expected one of: "
                    f"{', '.join(sorted(destinations)) or 'none defined'})",
                )
                continue
            names.append(name)
        return names

    def wait(self, node: Node) -> StudyComplete | None:
        fields = self.mapping(node, "wait_for_study_complete") or {}
        self.unknown_keys(fields, {"quiet_seconds", "level"}, "wait_for_study_complete")
        text = (
            self.scalar(fields["quiet_seconds"], "quiet_seconds")
            if "quiet_seconds" in fields
            else None
        )
        if text is None or not text.isdigit() or int(text) < 1:
            self.fail(
                fields.get("quiet_seconds", node),
                "quiet_seconds must be a whole number of seconds >= 1",
            )
            return None
        level = Level.STUDY
        if "level" in fields:
            value = self.scalar(fields["level"], "level")
            if value not in ("study", "series"):
                self.fail(fields["level"], "level must be study or series")
            else:
                level = Level(value)
        return StudyComplete(int(text), level)

    def default(
        self, node: Node | None, root: Node, destinations: dict[str, Destination]
    ) -> Default | None:
        if node is None:
            self.fail(
                root,
                "no 'default' (expected default: {route: [...]} or "
                "default: {hold: reason}); unmatched instances are never dropped",
            )
            return None
        fields = self.mapping(node, "default") or {}
        self.unknown_keys(fields, {"route", "hold"}, "default")
        route = self.route(fields.get("route"), node, destinations, "default")
        hold = self.scalar(fields["hold"], "hold") if "hold" in fields else None
        if "route" not in fields and not hold:
            self.fail(node, "default needs a route or a hold reason")
            return None
        return Default(tuple(route), hold)

    # Conditions.

    def condition(self, node: Node) -> Condition | None:
        if isinstance(node, SequenceNode):  # a list means all of them
            listed = [self.condition(n) for n in node.value]
            return All(tuple(p for p in listed if p is not None))
        fields = self.mapping(node, "a condition")
        if not fields:
            if fields is not None:
                self.fail(node, "empty condition")
            return None
        parts: list[Condition] = []
        for key, value in fields.items():
            part = self.one_condition(key, value)
            if part is not None:
                parts.append(part)
        return parts[0] if len(parts) == 1 else All(tuple(parts))

    def one_condition(self, key: str, value: Node) -> Condition | None:
        if key in ("all", "any"):
            items = self.sequence(value, key)
            if not items:
                self.fail(value, f"'{key}' needs at least one condition")
                return None
            parts = tuple(p for p in (self.condition(n) for n in items) if p is not None)
            return All(parts) if key == "all" else Any_(parts)
        if key == "not":
            part = self.condition(value)
            return Not(part) if part is not None else None
        if key == "stat":
            return IsStat(self.boolean(value, "stat"))
        if key == "time":
            return self.window(value)
        attribute = self.attribute(key, value)
        if attribute is None:
            return None
        self.attributes.add(attribute)
        self.rule_attributes.add(attribute)
        return self.matcher(attribute, value)

    def attribute(self, key: str, node: Node) -> str | None:
        if key in EVENT_ATTRIBUTES:
            return EVENT_ATTRIBUTES[key]
        if key in keyword_dict:
            return key
        tag = _TAG.match(key)
        if tag:
            value = int(tag.group(1) + tag.group(2), 16)
            return keyword_for_tag(value) or f"({tag.group(1)},{tag.group(2)})".upper()
        self.fail(
            node,
            f"unknown attribute {key!r} (expected one of "
            f"{', '.join(sorted(EVENT_ATTRIBUTES))}, a DICOM keyword such as "
            "StudyDescription, or a tag such as (0008,1030))",
        )
        return None

    def matcher(self, attribute: str, node: Node) -> Condition | None:
        if attribute == "sender_identity" and isinstance(node, ScalarNode | SequenceNode):
            listed = node.value if isinstance(node, SequenceNode) else [node]
            values = tuple(s for s in (self.identity(n, "sender_identity") for n in listed) if s)
            return Equals(attribute, values)
        if isinstance(node, ScalarNode):
            return Equals(attribute, (str(node.value),))
        if isinstance(node, SequenceNode):
            values = tuple(str(n.value) for n in node.value if isinstance(n, ScalarNode))
            return Equals(attribute, values)
        fields = self.mapping(node, f"condition on {attribute}") or {}
        self.unknown_keys(fields, {"equals", "in", "regex", "exists"}, f"condition on {attribute}")
        if len(fields) != 1:
            self.fail(
                node, f"condition on {attribute} needs exactly one of equals, in, regex, exists"
            )
            return None
        ((op, value),) = fields.items()
        scalar = self.scalar if attribute != "sender_identity" else self.identity
        if op == "equals":
            text = scalar(value, "equals")
            return Equals(attribute, (text,)) if text is not None else None
        if op == "in":
            values = tuple(s for s in (scalar(n, "in") for n in self.sequence(value, "in")) if s)
            return Equals(attribute, values)
        if op == "regex":
            text = self.scalar(value, "regex") or ""
            try:
                return Matches(attribute, re.compile(text))
            except re.error as exc:
                self.fail(value, f"invalid regular expression /{text}/: {exc.msg}")
                return None
        if op == "exists":
            return Exists(attribute, self.boolean(value, "exists"))
        return None

    def window(self, node: Node) -> Condition | None:
        fields = self.mapping(node, "time") or {}
        self.unknown_keys(fields, {"between", "days", "timezone"}, "time")
        text = self.scalar(fields["between"], "between") if "between" in fields else None
        match = _WINDOW.match(text or "")
        if not match:
            self.fail(
                fields.get("between", node),
                f"time window {text!r} is not HH:MM-HH:MM (e.g. 18:00-07:00)",
            )
            return None
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2):
            self.fail(fields["between"], f"time window {text!r} has an impossible time")
            return None
        zone = self.zone_of(fields["timezone"]) if "timezone" in fields else self.zone
        if zone is None:
            return None
        days = frozenset(range(7))
        if "days" in fields:
            names = [self.scalar(n, "day") or "" for n in self.sequence(fields["days"], "days")]
            bad = [n for n in names if n.lower()[:3] not in DAYS]
            if bad:
                self.fail(fields["days"], f"unknown day(s) {bad} (expected mon, tue, ... sun)")
                return None
            days = frozenset(DAYS.index(n.lower()[:3]) for n in names)
        end = time(0, 0) if h2 == 24 else time(h2, m2)
        return TimeWindow(time(h1, m1), end, zone, days)

    def check_reachability(self, rules: list[Rule], node: Node | None) -> None:
        for index, rule in enumerate(rules):
            unconditional = isinstance(rule.when, All) and not rule.when.parts
            if unconditional and rule.stop and index + 1 < len(rules):
                later = rules[index + 1]
                self.warnings.append(
                    f"{self.source}:{later.line}: rule {later.name!r} is unreachable: rule "
                    f"{rule.name!r} (line {rule.line}) matches everything and stops"
                )
        for i, rule in enumerate(rules):
            for other in rules[i + 1 :]:
                if rule.when == other.when and rule.stop:
                    self.warnings.append(
                        f"{self.source}:{other.line}: rule {other.name!r} has the same "
                        f"conditions as {rule.name!r} (line {rule.line}), which stops first"
                    )


def _empty(node: Node) -> bool:
    """A profile written as ``name:`` or ``name: {}`` (the Basic Profile alone)."""
    return (isinstance(node, ScalarNode) and node.value in ("", "~", "null")) or (
        isinstance(node, MappingNode) and not node.value
    )


def load_text(text: str, source: str = "<rules>") -> RuleSet:
    """Parse and validate a rule file's text.

    Raises:
        RuleFileError: with every problem and its line.
    """
    root = compose(text, source, RuleFileError, "the rule file")
    reader = _RuleReader(source)
    rules = reader.ruleset(root)
    if rules is None:
        raise RuleFileError(source, reader.problems or [Problem(1, "invalid rule file")])
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    return dataclasses.replace(rules, digest=digest)


def read_text(path: Path) -> str:
    """A rule file's text.

    Raises:
        RuleFileError: it cannot be read as UTF-8 (the error type, as its one problem).
    """
    return yaml_reader.read_text(path, RuleFileError)


def load_file(path: Path) -> RuleSet:
    return load_text(read_text(path), str(path))
