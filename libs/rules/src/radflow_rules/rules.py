"""The rule model and its evaluation: pure, no I/O, importable without Kafka or S3.

A rule set is an ordered list of rules. Each rule has a condition tree (all / any /
not over attribute matchers, time windows and the STAT flag) and an action (route to
destinations, lane, wait for the study to be complete, stop or continue). Instances
that no rule routes get the default action: a named route or a hold with a reason,
never a silent drop. :func:`evaluate` also returns why each rule did or did not
match, which is what ``python -m router explain`` prints.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, time, timedelta
from enum import StrEnum
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

from radflow_core.events import Lane
from radflow_rules.deidentification import Deidentify, DeidProfile, for_route
from radflow_rules.destinations import Auth, DestinationKind, DimsePeer, Tls, Verification


class Level(StrEnum):
    STUDY = "study"
    SERIES = "series"


@dataclass(frozen=True)
class LatencyObjective:
    """A delivery latency objective for one destination and lane: ``percent`` of
    instances acknowledged by the destination within ``within_s`` of ingest receiving
    them. Written as a share within a threshold (not as a percentile) because that is
    what a burn-rate alert can compute exactly from counters: the forwarder counts each
    delivery as within or over the threshold, and the error budget is ``100 - percent``."""

    within_s: float
    """Seconds from ingest receiving the instance to the destination acknowledging it."""
    percent: float
    """Share of instances that must arrive within ``within_s``, above 0 and below 100."""

    @property
    def ratio(self) -> float:
        """``percent`` as a fraction (0.99 for 99)."""
        return self.percent / 100


@dataclass(frozen=True)
class Slo:
    """A destination's latency objectives, per lane; a lane without one is not measured
    against a target (its latency histogram is still recorded)."""

    routine: LatencyObjective | None = None
    stat: LatencyObjective | None = None

    def for_lane(self, lane: Lane) -> LatencyObjective | None:
        return self.stat if lane is Lane.STAT else self.routine

    def items(self) -> list[tuple[Lane, LatencyObjective]]:
        """The lanes that have an objective, with it."""
        return [(lane, o) for lane in Lane if (o := self.for_lane(lane)) is not None]


@dataclass(frozen=True)
class Destination:
    name: str
    url: str
    """Where it is: the STOW-RS base URL; ``dicom://AE@host:port`` for a DIMSE peer;
    ``report-return://site`` for a RIS."""
    auth: Auth | None
    """How to authenticate; secrets are references (environment variable or file)."""
    transfer_syntaxes: tuple[str, ...]
    """Accepted transfer syntaxes, preferred first; empty means any."""
    max_batch: int
    tls: Tls | None = None
    """CA, client certificate (and server name), for https and DICOM TLS destinations."""
    lane: Lane | None = None
    """The destination's own priority: ``stat`` sends everything routed to it in the
    STAT lane unless the rule says otherwise."""
    kind: DestinationKind = DestinationKind.STOW_RS
    dimse: DimsePeer | None = None
    """The peer, for ``kind: dimse``."""
    site: str | None = None
    """The RIS site, for ``kind: report-return``."""
    verify: Verification = Verification.OFF
    """Whether (and how) delivered instances are checked at the destination afterwards.
    Not part of :attr:`identity`: turning it on or off leaves the same destination."""
    slo: Slo = Slo()
    """Latency objectives per lane (``slo:`` in the rule file), which the forwarder
    counts deliveries against and exports for the burn-rate alerts."""
    deidentify: DeidProfile | None = None
    """A de-identification profile every instance routed here gets, whichever rule
    routes it (``deidentify:`` on the destination). Not part of :attr:`identity`."""

    @property
    def identity(self) -> str:
        """What the destination *is*, not what the rule file calls it: its delivery
        address. STOW-RS: the base URL with scheme and host in lower case, no user info,
        no default port, no trailing slash; DIMSE: ``dicom://<called AE>@<host>:<port>``;
        report-return: ``report-return://<site>``. Authentication, TLS, syntaxes, batch
        size, lane and our calling AE title are not part of it: changing them leaves the
        same destination, while a new URL or peer under the same name is another one
        (delivery markers are kept per identity, so it receives everything again)."""
        if self.dimse is not None:
            peer = self.dimse
            return f"dicom://{peer.ae_title.strip()}@{peer.host.lower()}:{peer.port}"
        if self.site is not None:
            return f"report-return://{self.site}"
        url = urlsplit(self.url.strip())
        scheme, host = url.scheme.lower(), (url.hostname or "").lower()
        try:
            port = url.port
        except ValueError:
            port = None
        if ":" in host:
            host = f"[{host}]"
        if port is not None and port != {"http": 80, "https": 443}.get(scheme):
            host = f"{host}:{port}"
        query = f"?{url.query}" if url.query else ""
        return f"{scheme}://{host}{url.path.rstrip('/')}{query}"


@dataclass(frozen=True)
class Instance:
    """What rules can see of one instance: attribute name → value, the STAT flag."""

    attributes: Mapping[str, str | None]
    stat: bool = False

    def get(self, name: str) -> str | None:
        return self.attributes.get(name)


@dataclass(frozen=True)
class Result:
    matched: bool
    why: str


class Condition:
    def test(self, instance: Instance, at: datetime) -> Result:
        raise NotImplementedError


@dataclass(frozen=True)
class Equals(Condition):
    attribute: str
    values: tuple[str, ...]

    def test(self, instance: Instance, at: datetime) -> Result:
        value = instance.get(self.attribute)
        ok = value is not None and value.strip() in self.values
        want = self.values[0] if len(self.values) == 1 else list(self.values)
        return Result(ok, f"{self.attribute}={value!r} {'in' if ok else 'not in'} {want!r}")


@dataclass(frozen=True)
class Matches(Condition):
    attribute: str
    pattern: re.Pattern[str]

    def test(self, instance: Instance, at: datetime) -> Result:
        value = instance.get(self.attribute)
        ok = value is not None and self.pattern.search(value) is not None
        verb = "matches" if ok else "does not match"
        return Result(ok, f"{self.attribute}={value!r} {verb} /{self.pattern.pattern}/")


@dataclass(frozen=True)
class Exists(Condition):
    attribute: str
    present: bool

    def test(self, instance: Instance, at: datetime) -> Result:
        value = instance.get(self.attribute)
        exists = value is not None and value != ""
        return Result(
            exists == self.present, f"{self.attribute} {'present' if exists else 'absent'}"
        )


@dataclass(frozen=True)
class IsStat(Condition):
    wanted: bool

    def test(self, instance: Instance, at: datetime) -> Result:
        return Result(instance.stat == self.wanted, f"STAT={instance.stat}")


DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@dataclass(frozen=True)
class TimeWindow(Condition):
    """Local time of day in [start, end) in ``zone``; wraps midnight when end <= start.

    ``days`` are the days a window *starts* on: for 18:00-07:00 on Friday, Saturday
    03:00 is inside (it belongs to Friday's night).
    """

    start: time
    end: time
    zone: ZoneInfo
    days: frozenset[int]

    def test(self, instance: Instance, at: datetime) -> Result:
        local = at.astimezone(self.zone)
        now = local.time().replace(tzinfo=None)
        overnight = self.end <= self.start
        if not overnight:
            inside, start_day = self.start <= now < self.end, local.weekday()
        elif now >= self.start:
            inside, start_day = True, local.weekday()
        else:
            inside, start_day = now < self.end, (local - timedelta(days=1)).weekday()
        ok = inside and start_day in self.days
        window = f"{self.start:%H:%M}-{self.end:%H:%M} {self.zone.key}"
        return Result(ok, f"local {local:%a %H:%M} {'inside' if ok else 'outside'} {window}")


@dataclass(frozen=True)
class All(Condition):
    parts: tuple[Condition, ...]

    def test(self, instance: Instance, at: datetime) -> Result:
        results = [p.test(instance, at) for p in self.parts]
        failed = [r for r in results if not r.matched]
        if failed:
            return Result(False, failed[0].why)
        return Result(True, "; ".join(r.why for r in results) or "always")


@dataclass(frozen=True)
class Any_(Condition):
    parts: tuple[Condition, ...]

    def test(self, instance: Instance, at: datetime) -> Result:
        results = [p.test(instance, at) for p in self.parts]
        hit = next((r for r in results if r.matched), None)
        if hit:
            return Result(True, hit.why)
        return Result(False, "none of: " + "; ".join(r.why for r in results))


@dataclass(frozen=True)
class Not(Condition):
    part: Condition

    def test(self, instance: Instance, at: datetime) -> Result:
        result = self.part.test(instance, at)
        return Result(not result.matched, f"not ({result.why})")


@dataclass(frozen=True)
class StudyComplete:
    quiet_seconds: int
    level: Level


class PreviewKind(StrEnum):
    FIRST = "first"
    KEY_FRAMES = "key-frames"
    EVERY = "every"


@dataclass(frozen=True)
class PreviewSelection:
    """Which images of a series get a lossy preview (``preview:`` on a rule).

    Decided from the instance alone (its Instance Number and Number of Frames), so
    every transcode replica and the router agree without sharing state. An *image* is
    a single-frame instance or one frame of a multi-frame instance.

    - ``first``: frame 1 of the instance numbered 1 (or 0, for modalities that count
      from zero);
    - ``key-frames``: as ``first`` for single-frame instances; the first, middle and
      last frame of every multi-frame instance;
    - ``every: N``: single-frame instances numbered 1, 1+N, 1+2N, ...; frames 1, 1+N,
      ... of every multi-frame instance.

    An instance without an Instance Number cannot be placed in its series: it gets a
    preview of its first frame (too many previews rather than none).
    """

    kind: PreviewKind = PreviewKind.FIRST
    every: int = 1

    def frames(self, instance_number: int | None, frame_count: int) -> tuple[int, ...]:
        """1-based frames of this instance to preview (empty: none)."""
        count = max(frame_count, 1)
        if instance_number is None:
            return (1,)
        first_of_series = instance_number in (0, 1)
        if count > 1 and self.kind is PreviewKind.KEY_FRAMES:
            return tuple(sorted({1, (count + 1) // 2, count}))
        if count > 1 and self.kind is PreviewKind.EVERY:
            return tuple(range(1, count + 1, self.every))
        if self.kind is PreviewKind.EVERY:
            return (1,) if first_of_series or (instance_number - 1) % self.every == 0 else ()
        return (1,) if first_of_series else ()

    def __str__(self) -> str:
        return f"every {self.every}" if self.kind is PreviewKind.EVERY else self.kind.value


@dataclass(frozen=True)
class Rule:
    name: str
    when: Condition
    route: tuple[str, ...]
    lane: Lane | None
    wait: StudyComplete | None
    stop: bool
    line: int
    deidentify: DeidProfile | None = None
    """The de-identification profile applied before delivery to this rule's
    destinations (``deidentify:``)."""
    accept_burned_in: bool = False
    """``accept_burned_in: true``: de-identified instances with burned-in annotation
    may go (the rule's author has checked the pixel data is clean)."""
    preview: PreviewSelection | None = None
    """Send a lossy preview of the selected images to the rule's destinations, in the
    STAT lane, ahead of the full series (which still follows as the rule says)."""


@dataclass(frozen=True)
class Default:
    route: tuple[str, ...]
    hold: str | None


@dataclass(frozen=True)
class StatPolicy:
    from_priority: bool
    calling_aes: frozenset[str]
    identities: frozenset[str] = frozenset()
    """Authenticated senders (``apikey:…``, ``cert:…``, ``jwt:…``) whose instances are
    STAT."""

    def is_stat(self, attributes: Mapping[str, str | None], dimse_priority: str | None) -> bool:
        if self.from_priority and (
            dimse_priority == "high"
            or (attributes.get("RequestedProcedurePriority") or "").upper() == "STAT"
        ):
            return True
        return (attributes.get("calling_ae") or "") in self.calling_aes or (
            attributes.get("sender_identity") or ""
        ) in self.identities


@dataclass(frozen=True)
class RuleSet:
    destinations: Mapping[str, Destination]
    rules: tuple[Rule, ...]
    default: Default
    stat: StatPolicy
    warnings: tuple[str, ...] = ()
    digest: str = ""
    """First 12 hex digits of the rule file's sha256: which file made a decision."""
    attributes: frozenset[str] = frozenset()
    """Every attribute a condition reads; tells whether the dataset header is needed."""
    profiles: Mapping[str, DeidProfile] = field(default_factory=dict)
    """The de-identification profiles (``deidentification:``), by name."""


@dataclass(frozen=True)
class Route:
    destination: str
    lane: Lane
    wait: StudyComplete | None
    rules: tuple[str, ...]
    deidentify: Deidentify | None = None
    """De-identification before delivery: the stricter of what every rule routing here
    and the destination ask for; one de-identifying rule is enough."""
    previews: tuple[PreviewSelection, ...] = ()
    """The preview selections of the rules that routed here (none: no previews)."""

    def preview_frames(self, instance_number: int | None, frame_count: int) -> tuple[int, ...]:
        """Frames of the instance whose preview this destination wants."""
        wanted: set[int] = set()
        for selection in self.previews:
            wanted.update(selection.frames(instance_number, frame_count))
        return tuple(sorted(wanted))


@dataclass(frozen=True)
class Decision:
    routes: tuple[Route, ...]
    hold: str | None
    trace: tuple[tuple[str, Result], ...] = field(default=())
    """(rule name, result) for every rule evaluated, in order."""


def evaluate(rules: RuleSet, instance: Instance, at: datetime) -> Decision:
    """Which destinations an instance goes to, in which lane, and why."""
    trace: list[tuple[str, Result]] = []
    routes: dict[str, Route] = {}
    for rule in rules.rules:
        result = rule.when.test(instance, at)
        trace.append((rule.name, result))
        if not result.matched:
            continue
        for name in rule.route:
            destination = rules.destinations[name]
            lane = _lane(rule.lane, instance, destination)
            deid = for_route(rule.deidentify, destination.deidentify, rule.accept_burned_in)
            previous = routes.get(name)
            previews = (rule.preview,) if rule.preview is not None else ()
            if previous is None:
                routes[name] = Route(name, lane, rule.wait, (rule.name,), deid, previews)
            else:  # several rules to one destination: one request, STAT wins, first wait
                # wins, de-identification wins (the stricter of two), previews add up
                best = Lane.STAT if Lane.STAT in (previous.lane, lane) else Lane.ROUTINE
                both = previous.deidentify
                if deid is not None:
                    both = deid.combine(previous.deidentify)
                routes[name] = Route(
                    name,
                    best,
                    previous.wait or rule.wait,
                    (*previous.rules, rule.name),
                    both,
                    (*previous.previews, *previews),
                )
        if rule.stop:
            break
    if routes:
        return Decision(tuple(routes.values()), None, tuple(trace))
    default = rules.default
    if default.route:
        defaults = tuple(
            Route(
                n,
                _lane(None, instance, rules.destinations[n]),
                None,
                ("default",),
                for_route(None, rules.destinations[n].deidentify, False),
            )
            for n in default.route
        )
        return Decision(defaults, None, tuple(trace))
    return Decision((), default.hold or "no rule matched", tuple(trace))


def _lane(chosen: Lane | None, instance: Instance, destination: Destination) -> Lane:
    """The rule's lane if it names one; else STAT for a STAT instance; else the
    destination's own priority."""
    if chosen is not None:
        return chosen
    if instance.stat:
        return Lane.STAT
    return destination.lane or Lane.ROUTINE
