"""De-identification profiles of the rule file and how routes combine them.

A profile is the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile
plus a set of its options, named in the rule file's ``deidentification:`` map. A rule
names one (``deidentify: <profile>``), and a destination may require one (a research
destination never receives identities, whichever rule routes there).

When one instance reaches one destination with several de-identifications asked for
(two rules, or a rule and the destination's requirement), the stricter combination is
applied: the options that retain something are kept only if every profile retains it,
the options that clean something apply if any profile cleans it, and burned-in
annotation is accepted only if every de-identifying rule accepts it. A route that does
not de-identify never weakens one that does: de-identification wins.
"""

from __future__ import annotations

from dataclasses import dataclass

from radflow_core.events import Deidentification, DeidOption

RETAINING = frozenset(
    {
        DeidOption.RETAIN_LONGITUDINAL_MODIFIED_DATES,
        DeidOption.RETAIN_PATIENT_CHARACTERISTICS,
        DeidOption.RETAIN_DEVICE_IDENTITY,
        DeidOption.RETAIN_UIDS,
    }
)
"""Options that let more through than the Basic Profile; the others remove more."""


@dataclass(frozen=True)
class DeidProfile:
    """A named profile from the rule file's ``deidentification:`` map."""

    name: str
    options: frozenset[DeidOption] = frozenset()
    line: int = 0
    """Where the rule file defines it."""


def stricter(a: DeidProfile, b: DeidProfile) -> DeidProfile:
    """The combination of two profiles that is at least as strict as each."""
    if a.name == b.name and a.options == b.options:
        return a
    retained = a.options & b.options & RETAINING
    cleaned = (a.options | b.options) - RETAINING
    names = sorted(set(a.name.split("+")) | set(b.name.split("+")))
    return DeidProfile("+".join(names), retained | cleaned)


@dataclass(frozen=True)
class Deidentify:
    """The de-identification of one route: the profile, and whether an instance with
    burned-in annotation may go (``accept_burned_in: true`` on every de-identifying
    rule of the route)."""

    profile: DeidProfile
    accept_burned_in: bool = False

    def combine(self, other: Deidentify | None) -> Deidentify:
        if other is None:
            return self
        return Deidentify(
            stricter(self.profile, other.profile),
            self.accept_burned_in and other.accept_burned_in,
        )

    def event(self) -> Deidentification:
        """What the forward request carries."""
        return Deidentification(
            profile=self.profile.name,
            options=tuple(sorted(self.profile.options)),
            accept_burned_in=self.accept_burned_in,
        )


def for_route(
    rule_profile: DeidProfile | None, required: DeidProfile | None, accept_burned_in: bool
) -> Deidentify | None:
    """One rule's de-identification toward one destination: its own profile combined
    with what the destination requires; None when neither asks for one."""
    if rule_profile is None and required is None:
        return None
    if rule_profile is None:
        assert required is not None
        return Deidentify(required, accept_burned_in)
    profile = rule_profile if required is None else stricter(rule_profile, required)
    return Deidentify(profile, accept_burned_in)


def enforced(
    requested: Deidentification | None, required: DeidProfile | None
) -> Deidentification | None:
    """What the forwarder applies: the request's de-identification, made at least as
    strict as the destination's own requirement in the forwarder's rule file.

    The router already combines them; this is the last line, for a request routed by
    an older rule file (or an older router, v1) before the destination required a
    profile: a research destination never receives identities whatever the request
    says."""
    if required is None:
        return requested
    if requested is None:
        return Deidentify(required).event()
    carried = DeidProfile(requested.profile, frozenset(requested.options))
    return Deidentify(stricter(carried, required), requested.accept_burned_in).event()
