"""The ledger's engine: per study and destination, what was routed and what became of
each instance. Pure: no broker, no clock of its own (every call that needs the time is
given it), so it is tested without Kafka.

An *entry* is one forward request (one instance to one destination, named by its
idempotency key) and the facts seen about it: routed (``dicom.forward.requested``),
delivered (``.completed``), verified (``.verified``), failed (``.failed``). Facts only
accumulate, so the topics may be read in any order and any record twice: a completion
read before its request still counts, and applying the same event again changes nothing.

Status of an entry, from its facts: the later of its last failure and its last success
wins (a failure replayed and then delivered is delivered; a delivery the destination
later turned out not to hold, reported as a failure, is failed); a success is
``verified`` once verified, else ``delivered``; with neither it is ``pending``.

An instance has *reached* its destination when it is verified, or delivered where the
destination has no verification: the forwarder says so in each completion
(``verification``), and ``RADFLOW_LEDGER_VERIFY_DESTINATIONS`` can name more (a check
made outside radflow that publishes ``dicom.forward.verified``). It is *overdue* when
it has not reached, has not failed, and was routed longer ago than the overdue
threshold.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from pydantic import AwareDatetime, BaseModel, ConfigDict

from radflow_core.events import (
    DestinationTally,
    ForwardCompleted,
    ForwardFailed,
    ForwardRequested,
    ForwardVerified,
    StudyDelivered,
)

Fact = ForwardRequested | ForwardCompleted | ForwardVerified | ForwardFailed


class Status(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    VERIFIED = "verified"
    FAILED = "failed"


class Entry(BaseModel):
    """One forward request and what is known of it; one changelog record."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    destination: str
    idempotency_key: str
    lane: str
    routed_at: AwareDatetime | None = None
    """When the router decided (None while only outcomes were seen)."""
    delivered_at: AwareDatetime | None = None
    """The destination's last acknowledgement."""
    verified_at: AwareDatetime | None = None
    """The destination's last confirmation that it holds the instance."""
    failed_at: AwareDatetime | None = None
    """The last time delivery was given up (or verification found it missing)."""
    failure: str | None = None
    """The reason of that failure (``rejected``, ``retries_exhausted``, ...)."""
    verification: bool = False
    """A completion said the destination is asked afterwards: acknowledged is not
    enough, the instance reaches it when verified."""
    seen_at: AwareDatetime
    """When the ledger last changed this entry (its clock): for the quiet period and
    for forgetting old studies."""
    preview: bool = False
    """The request was for a lossy preview (``preview_of``): delivered and tracked like
    any request, but not a diagnostic instance, so not part of the study's delivery."""

    @property
    def status(self) -> Status:
        success = max((t for t in (self.delivered_at, self.verified_at) if t), default=None)
        if self.failed_at is not None and (success is None or self.failed_at > success):
            return Status.FAILED
        if self.verified_at is not None:
            return Status.VERIFIED
        if self.delivered_at is not None:
            return Status.DELIVERED
        return Status.PENDING

    def reached(self, verify: bool) -> bool:
        """Whether the instance is where it should be (verified, when ``verify`` or when
        its completion announced a verification)."""
        status = self.status
        awaits = verify or self.verification
        return status is Status.VERIFIED or (status is Status.DELIVERED and not awaits)

    def reached_at(self) -> datetime | None:
        return self.verified_at or self.delivered_at

    def overdue(self, verify: bool, now: datetime, after: timedelta) -> bool:
        return (
            self.status is not Status.FAILED
            and not self.reached(verify)
            and self.routed_at is not None
            and now - self.routed_at > after
        )

    def merge(self, fact: Fact, now: datetime) -> Entry:
        """This entry with ``fact`` added (itself when the fact adds nothing)."""
        changes: dict[str, object] = {}
        if isinstance(fact, ForwardRequested):
            if self.routed_at is None or fact.routed_at < self.routed_at:
                changes["routed_at"] = fact.routed_at
            if fact.preview_of is not None and not self.preview:
                changes["preview"] = True
        elif isinstance(fact, ForwardCompleted):
            if self.delivered_at is None or fact.delivered_at > self.delivered_at:
                changes["delivered_at"] = fact.delivered_at
            if fact.verification is not None and not self.verification:
                changes["verification"] = True
        elif isinstance(fact, ForwardVerified):
            if self.verified_at is None or fact.verified_at > self.verified_at:
                changes["verified_at"] = fact.verified_at
        elif self.failed_at is None or fact.failed_at > self.failed_at:
            changes["failed_at"] = fact.failed_at
            changes["failure"] = fact.reason
        if not changes:
            return self
        return self.model_copy(update={**changes, "seen_at": now})

    @classmethod
    def first(cls, fact: Fact, now: datetime) -> Entry:
        blank = cls(
            study_instance_uid=fact.study_instance_uid,
            series_instance_uid=fact.series_instance_uid,
            sop_instance_uid=fact.sop_instance_uid,
            destination=fact.destination,
            idempotency_key=fact.idempotency_key,
            lane=fact.lane.value,
            seen_at=now,
        )
        return blank.merge(fact, now)


class Mark(BaseModel):
    """What the last ``dicom.study.delivered`` of a study said; one changelog record, so
    that a restart neither repeats it nor loses the count."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    study_instance_uid: str
    revision: int
    entries: int
    """How many entries (instance and destination pairs) the study had when it was published."""
    published_at: AwareDatetime


@dataclass(frozen=True)
class Tally:
    """Counts of one study at one destination. ``delivered`` includes the verified;
    ``pending`` is routed and neither delivered nor failed."""

    destination: str
    routed: int
    delivered: int
    verified: int
    failed: int
    pending: int
    overdue: int
    verify: bool
    reached: int


def tally(
    destination: str, entries: Iterable[Entry], verify: bool, now: datetime, after: timedelta
) -> Tally:
    listed = list(entries)
    statuses = [e.status for e in listed]
    return Tally(
        destination=destination,
        routed=len(listed),
        delivered=sum(s in (Status.DELIVERED, Status.VERIFIED) for s in statuses),
        verified=sum(s is Status.VERIFIED for s in statuses),
        failed=sum(s is Status.FAILED for s in statuses),
        pending=sum(s is Status.PENDING for s in statuses),
        overdue=sum(e.overdue(verify, now, after) for e in listed),
        verify=verify or any(e.verification for e in listed),
        reached=sum(e.reached(verify) for e in listed),
    )


class Study:
    """Every entry of one study, and its last published mark."""

    def __init__(self, uid: str) -> None:
        self.uid = uid
        self.entries: dict[str, Entry] = {}
        """Idempotency key → entry."""
        self.mark: Mark | None = None
        self.last_seen: datetime | None = None
        """The latest ``seen_at`` of its entries (None without entries)."""

    def put(self, entry: Entry) -> None:
        self.entries[entry.idempotency_key] = entry
        if self.last_seen is None or entry.seen_at > self.last_seen:
            self.last_seen = entry.seen_at

    def diagnostic(self) -> list[Entry]:
        """The entries of diagnostic instances: every one but lossy previews'. A preview
        neither holds a study's delivery back nor counts in it. (An outcome read before
        its request counts until the request says it was a preview.)"""
        return [e for e in self.entries.values() if not e.preview]

    def watched(self, verify: frozenset[str]) -> bool:
        """Whether the tick must look at it again: an entry still on its way (neither
        reached nor failed, so it may become overdue; previews too), or every diagnostic
        entry reached and not yet published with this many. Any other study changes
        only with a new fact."""
        reached = 0
        for entry in self.entries.values():
            if entry.reached(entry.destination in verify):
                reached += not entry.preview
            elif entry.status is not Status.FAILED:
                return True
        diagnostic = len(self.diagnostic())
        published = self.mark is not None and self.mark.entries >= diagnostic
        return bool(diagnostic) and reached == diagnostic and not published

    def destinations(self, diagnostic: bool = False) -> dict[str, list[Entry]]:
        """Entries by destination (``diagnostic``: previews left out)."""
        found: dict[str, list[Entry]] = {}
        for entry in self.diagnostic() if diagnostic else self.entries.values():
            found.setdefault(entry.destination, []).append(entry)
        return dict(sorted(found.items()))

    def delivered(
        self, verify: frozenset[str], now: datetime, quiet: timedelta
    ) -> StudyDelivered | None:
        """The ``dicom.study.delivered`` event due now, if one is: every diagnostic
        entry's request seen and reached, nothing changed for ``quiet``, and more
        diagnostic entries than the last published one. Previews are left out."""
        entries = self.diagnostic()
        if not entries:
            return None
        if any(e.routed_at is None for e in entries):
            return None  # an outcome read before its request: the requests are behind
        if not all(e.reached(e.destination in verify) for e in entries):
            return None
        if self.last_seen is None or now - self.last_seen < quiet:
            return None
        if self.mark is not None and self.mark.entries >= len(entries):
            return None
        routed = [e.routed_at for e in entries if e.routed_at is not None]
        reached = [e.reached_at() for e in entries]
        return StudyDelivered(
            study_instance_uid=self.uid,
            revision=(self.mark.revision + 1) if self.mark else 1,
            instances=len({e.sop_instance_uid for e in entries}),
            destinations=tuple(
                DestinationTally(
                    destination=name,
                    instances=len(listed),
                    verified=name in verify or any(e.verification for e in listed),
                )
                for name, listed in self.destinations(diagnostic=True).items()
            ),
            first_routed_at=min(routed, default=None),
            last_reached_at=max(t for t in reached if t is not None),
        )


class Book:
    """The studies of the partitions this replica owns, by partition."""

    def __init__(self) -> None:
        self._partitions: dict[int, dict[str, Study]] = {}
        self._changed: set[tuple[int, str]] = set()

    def take_changed(self) -> set[tuple[int, str]]:
        """(partition, study) changed since the last call."""
        changed, self._changed = self._changed, set()
        return changed

    def get(self, partition: int, uid: str) -> Study | None:
        return self._partitions.get(partition, {}).get(uid)

    @property
    def partitions(self) -> set[int]:
        return set(self._partitions)

    def studies(self) -> Iterable[tuple[int, Study]]:
        for partition, studies in self._partitions.items():
            for study in studies.values():
                yield partition, study

    def study(self, uid: str) -> Study | None:
        for studies in self._partitions.values():
            if uid in studies:
                return studies[uid]
        return None

    def hold(self, partition: int) -> None:
        """Own ``partition`` (restored, possibly empty)."""
        self._partitions.setdefault(partition, {})

    def drop(self, partition: int) -> None:
        self._partitions.pop(partition, None)

    def apply(self, partition: int, fact: Fact, now: datetime) -> Entry | None:
        """Add ``fact``; returns the entry to write to the changelog, or None when the
        fact was known already."""
        studies = self._partitions.setdefault(partition, {})
        study = studies.setdefault(fact.study_instance_uid, Study(fact.study_instance_uid))
        known = study.entries.get(fact.idempotency_key)
        entry = Entry.first(fact, now) if known is None else known.merge(fact, now)
        if entry is known:
            return None
        study.put(entry)
        self._changed.add((partition, study.uid))
        return entry

    def restore_entry(self, partition: int, entry: Entry) -> None:
        studies = self._partitions.setdefault(partition, {})
        study = studies.setdefault(entry.study_instance_uid, Study(entry.study_instance_uid))
        study.put(entry)
        self._changed.add((partition, study.uid))

    def restore_mark(self, partition: int, mark: Mark) -> None:
        studies = self._partitions.setdefault(partition, {})
        study = studies.setdefault(mark.study_instance_uid, Study(mark.study_instance_uid))
        study.mark = mark
        self._changed.add((partition, study.uid))

    def forget(self, partition: int, uid: str) -> Study | None:
        return self._partitions.get(partition, {}).pop(uid, None)
