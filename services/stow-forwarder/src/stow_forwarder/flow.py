"""Per-destination flow control: a circuit breaker so a destination that is down is
probed, not hammered; and a gate that lets the STAT lane go before the routine lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from enum import IntEnum

from radflow_core.events import Lane
from radflow_core.retry import HandedBack
from stow_forwarder.metrics import CIRCUIT


class Circuit(IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    """Closed until ``failures`` requests in a row fail; then open for ``cooldown_s``;
    then one probe at a time (half-open) until a request succeeds.

    A request that gets any answer the destination meant (2xx, or a final 4xx) counts
    as success: the destination is up, even if it refused an instance.
    """

    def __init__(self, destination: str, failures: int, cooldown_s: float) -> None:
        self._destination = destination
        self._threshold = failures
        self._cooldown_s = cooldown_s
        self._failures = 0
        self._opened = 0.0
        self.state = Circuit.CLOSED
        self._probe = asyncio.Lock()
        CIRCUIT.labels(destination).set(0)

    def _set(self, state: Circuit) -> None:
        self.state = state
        CIRCUIT.labels(self._destination).set(int(state))

    @contextlib.asynccontextmanager
    async def attempt(self, hand_back: asyncio.Event) -> AsyncIterator[None]:
        """Wait until a request may go out (returns at once while closed).

        Raises:
            HandedBack: ``hand_back`` was set while the circuit was open.
        """
        while self.state is Circuit.OPEN:
            left = self._opened + self._cooldown_s - time.monotonic()
            if left <= 0:
                self._set(Circuit.HALF_OPEN)
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hand_back.wait(), timeout=left)
            if hand_back.is_set():
                raise HandedBack("handed back while the destination's circuit is open")
        if self.state is Circuit.HALF_OPEN:
            async with self._probe:  # one probe at a time
                yield
        else:
            yield

    def succeeded(self) -> None:
        self._failures = 0
        if self.state is not Circuit.CLOSED:
            self._set(Circuit.CLOSED)

    def failed(self) -> None:
        self._failures += 1
        if self.state is Circuit.HALF_OPEN or self._failures >= self._threshold:
            self._opened = time.monotonic()
            self._set(Circuit.OPEN)


class StatFirst:
    """Routine sends wait while a STAT send is waiting or in progress; STAT never
    waits for routine (beyond a request already on the wire)."""

    def __init__(self) -> None:
        self._stat = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def turn(self, lane: Lane) -> AsyncIterator[None]:
        if lane is Lane.STAT:
            async with self._changed:
                self._stat += 1
            try:
                yield
            finally:
                async with self._changed:
                    self._stat -= 1
                    self._changed.notify_all()
        else:
            async with self._changed:
                await self._changed.wait_for(lambda: self._stat == 0)
            yield
