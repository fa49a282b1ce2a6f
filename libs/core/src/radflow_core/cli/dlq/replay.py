"""Deciding what a replay re-publishes, and why the rest is left alone.

Pure: letters, what ``dicom.forward.completed`` says was delivered and what the
lookups found go in; one :class:`Action` per letter comes out. The same request is
re-published once however many letters it has (a replayed request that failed again
has two): the newest letter stands for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from radflow_core.cli.dlq.letters import Letter, Original


class Outcome(StrEnum):
    REPLAY = "replay"
    """Published again to its source topic with its original key."""
    SKIP = "skip"
    """Nothing to do: already delivered (or returned), or the same request is replayed
    by another letter."""
    CANNOT = "cannot"
    """Not replayable (no original, or it is no longer retained)."""


@dataclass(frozen=True, slots=True)
class Action:
    letter: Letter
    outcome: Outcome
    why: str
    original: Original | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.letter.id,
            "outcome": self.outcome.value,
            "why": self.why,
            "topic": self.original.topic if self.original else None,
            "key": self.original.key if self.original else None,
            "destination": self.letter.destination,
            "study": self.letter.study,
            "instance": self.letter.instance,
            "idempotency_key": self.letter.idempotency_key,
        }


def plan(
    letters: Iterable[Letter],
    settled: Mapping[str, str],
    found: Mapping[str, Original],
) -> list[Action]:
    """One action per letter, in the letters' order.

    ``settled``: a letter's ``settled_by`` key → what says it was done after all
    (``delivered (dicom.forward.completed at …)``; empty to let the consumers' own
    markers decide); ``found``: letter id → the original a lookup found on the
    retained topics.
    """
    ordered = list(letters)
    replayed_by: dict[str, str] = {}
    decided: dict[str, Action] = {}
    for letter in sorted(ordered, key=lambda item: item.appended_at, reverse=True):
        original = letter.original or found.get(letter.id)
        if original is None:
            why = letter.not_replayable or (
                "its original is no longer retained on "
                + ", ".join(t.value for t in letter.lookup.topics)
                if letter.lookup
                else "it carries no original"
            )
            decided[letter.id] = Action(letter, Outcome.CANNOT, why)
            continue
        key = letter.settled_by
        if key is not None and key in settled:
            why = f"already {settled[key]}"
            decided[letter.id] = Action(letter, Outcome.SKIP, why, original)
            continue
        same = key or _fingerprint(original)
        if same in replayed_by:
            why = f"the same request is replayed by {replayed_by[same]}"
            decided[letter.id] = Action(letter, Outcome.SKIP, why, original)
            continue
        replayed_by[same] = letter.id
        decided[letter.id] = Action(letter, Outcome.REPLAY, f"to {original.topic}", original)
    return [decided[letter.id] for letter in ordered]


def _fingerprint(original: Original) -> str:
    digest = hashlib.sha256()
    for part in (original.topic, original.key or "", original.value):
        digest.update(part.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()
