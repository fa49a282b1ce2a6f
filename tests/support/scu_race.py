"""pynetdicom's reactor race, made to happen every time (see radflow_core.scu).

The race needs an association's reactor thread to be descheduled just after it went
past its checkpoint, until the peer's answer is in the DIMSE queue. A loaded machine
does that now and then; :func:`hold_reactor_once` holds the reactor at that very point
for the next send, over the real association, and holds the sender until the reactor
has looked at the queue, so the outcome does not depend on scheduling.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

HOLD_S = 30.0
"""Upper bound on every wait for the other thread (never reached when things work)."""


class HeldReactor(threading.Event):
    """An association's reactor checkpoint that, once armed, lets the reactor thread
    through as if it had passed before the sender paused it, but only once the peer's
    answer is in the DIMSE queue. ``back`` is set when the reactor comes round to the
    checkpoint again, i.e. after it looked at the queue."""

    def __init__(self, waiting: queue.Queue[Any]) -> None:
        super().__init__()
        self.set()  # as pynetdicom's checkpoint starts: not paused
        self._waiting = waiting
        self.armed = False
        self.released = threading.Event()
        self.back = threading.Event()

    def wait(self, timeout: float | None = None) -> bool:
        if self.armed:
            self.armed = False
            deadline = time.monotonic() + HOLD_S
            while self._waiting.empty() and time.monotonic() < deadline:
                time.sleep(0.001)
            self.released.set()
            return True
        if self.released.is_set():
            self.back.set()
        return super().wait(timeout)


def hold_reactor_once(assoc: Any) -> HeldReactor:
    """Make the next ``send_*`` on the established ``assoc`` meet the race: its reactor
    held past the checkpoint until the answer is in, its sender held after sending
    until the reactor has looked at the queue."""
    held = HeldReactor(assoc.dimse.msg_queue)
    assoc._reactor_checkpoint = held
    sending = assoc.dimse.send_msg
    first = threading.Event()

    def send_msg(primitive: Any, context_id: int) -> None:
        sending(primitive, context_id)
        if not first.is_set():
            first.set()
            assert held.back.wait(HOLD_S), "the reactor never came back to its checkpoint"

    assoc.dimse.send_msg = send_msg
    held.armed = True
    return held
