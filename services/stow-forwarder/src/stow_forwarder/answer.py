"""What every kind of destination client takes and gives back, so one delivery loop
(batches, retries, circuit breaker, outcome events) serves STOW-RS and DIMSE alike."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from radflow_core.events import Lane


@dataclass(frozen=True)
class SentAs:
    """The UIDs an instance has at the destination: its own, or the remapped ones of a
    de-identified delivery. What the destination is asked about (QIDO-RS, storage
    commitment, "do you hold it already") is named by these; the events and markers
    keep the pipeline's own (the original's)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Outgoing:
    """One instance ready to send: verified bytes on disk, in ``transfer_syntax_uid``."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path


@dataclass
class Answer:
    """The destination's answer to one request, per SOP Instance UID."""

    http_status: int | None
    """The HTTP status of a STOW-RS answer; None without one (no answer, or DIMSE)."""
    delivered: set[str] = field(default_factory=set)
    refused: dict[str, tuple[int | None, str]] = field(default_factory=dict)
    """uid → (DICOM status or FailureReason, or None; message)."""
    retry: dict[str, str] = field(default_factory=dict)
    """uid → why it is worth another try."""
    retry_after_s: float | None = None
    peer_unavailable: bool = False
    """The destination itself did not answer or was overloaded (not one instance's
    problem): counts against its circuit breaker."""


class DestinationClient(Protocol):
    """Sends a batch of one study's instances to one destination."""

    async def store(self, items: Sequence[Outgoing], lane: Lane) -> Answer: ...

    async def holds(self, study_instance_uid: str, sop_instance_uids: Sequence[str]) -> set[str]:
        """Which of these instances the destination already has (as far as it can
        tell; an empty set when it cannot be asked). Used only for instances a crash
        may have sent without their delivery marker: asking is cheaper than a second
        copy at the destination."""
        ...

    async def close(self) -> None: ...
