"""Waiting out failures that time fixes, without holding a consumer.

Every stage waits the same way: capped exponential backoff with jitter, for as long as
the failure lasts. The wait happens inside a :class:`Turn` (one partition's work, run
by :class:`~radflow_core.consumer.EventConsumer` beside its poll loop, so a wait of
hours never drops the consumer from its group). A turn is interrupted when its records
must be handed back: the service stops, or the partition moved to another replica.
Then :class:`HandedBack` is raised: nothing more is done, nothing unsettled is
committed, and whoever reads the partition next handles the records again.

While a turn waits it is shown: ``radflow_consumer_waiting_since_timestamp_seconds``
(per consumer group and reason) holds the time the current run of retries began,
until the work succeeds.
"""

from __future__ import annotations

import asyncio
import random
import time
from contextvars import ContextVar
from dataclasses import dataclass, field

from prometheus_client import Gauge

from radflow_core.errors import PipelineError

WAITING_SINCE = Gauge(
    "radflow_consumer_waiting_since_timestamp_seconds",
    "Unix time at which a consumer group's current run of retries for one reason began "
    "(a dependency or destination that time should fix); absent while nothing waits.",
    ["group", "reason"],
)


class HandedBack(PipelineError):
    """The records in hand are given up uncommitted (the service stops, or their
    partition moved to another replica); whoever reads the partition next handles
    them again."""

    retriable = True
    reason = "handed_back"


def backoff_delay(attempt: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff with jitter before retry number ``attempt`` (1-based):
    between half and all of ``initial_s * 2**(attempt-1)``, capped at ``max_s``, so
    many clients retrying after one outage do not all come back at once."""
    ceiling = min(max_s, initial_s * 2 ** min(attempt - 1, 62))
    return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not crypto


class Waiting:
    """Which partitions of one consumer group wait, for which reason, since when.

    Two partitions of a group waiting on the same dependency show one series; it goes
    away when the last of them recovers."""

    def __init__(self, group: str) -> None:
        self._group = group
        self._waiters: dict[str, set[object]] = {}

    def began(self, reason: str, who: object) -> None:
        waiters = self._waiters.setdefault(reason, set())
        if not waiters:
            WAITING_SINCE.labels(self._group, reason).set(time.time())
        waiters.add(who)

    def ended(self, who: object) -> None:
        for reason, waiters in list(self._waiters.items()):
            waiters.discard(who)
            if not waiters:
                del self._waiters[reason]
                WAITING_SINCE.remove(self._group, reason)

    def reasons(self) -> set[str]:
        """The reasons something in this group waits for now."""
        return set(self._waiters)


@dataclass(eq=False)
class Turn:
    """One partition's work in hand: when to hand it back, and where to show waits."""

    waiting: Waiting | None = None
    hand_back: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the records in hand must be handed back (stop or revocation)."""

    def check(self) -> None:
        """Raise HandedBack if the work must stop before its next step."""
        if self.hand_back.is_set():
            raise HandedBack("handing the records back before the next step")

    async def pause(
        self,
        attempt: int,
        reason: str,
        *,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        at_least_s: float | None = None,
    ) -> None:
        """Wait before retry number ``attempt`` after a failure of ``reason``.

        ``at_least_s`` (a peer's Retry-After) lengthens the wait. Shows the wait on the
        group's gauge until :meth:`recovered`.

        Raises:
            HandedBack: the records must be handed back; the wait is cut short.
        """
        delay = backoff_delay(attempt, initial_s, max_s)
        if at_least_s is not None:
            delay = max(delay, at_least_s)
        if self.waiting is not None:
            self.waiting.began(reason, self)
        if await self.wait_for_hand_back(delay):
            raise HandedBack(f"handed back while waiting to retry ({reason})")

    async def wait_for_hand_back(self, seconds: float) -> bool:
        """Wait ``seconds`` (a grace period, not a retry); True if the work must be
        handed back meanwhile."""
        try:
            await asyncio.wait_for(self.hand_back.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    def recovered(self) -> None:
        """The work went through: this turn no longer waits."""
        if self.waiting is not None:
            self.waiting.ended(self)


_CURRENT: ContextVar[Turn | None] = ContextVar("radflow_turn", default=None)


def current_turn() -> Turn:
    """The turn of the partition whose records are being handled here.

    Outside a consumer (a test, a command-line tool) a detached turn that is never
    handed back and shows no gauge."""
    turn = _CURRENT.get()
    return turn if turn is not None else Turn()


def enter(turn: Turn) -> None:
    """Make ``turn`` current in this task (and in the tasks it starts)."""
    _CURRENT.set(turn)
