"""Watching `make run`'s children: say when one dies, and start it again.

A service that crashes under ``make run`` must not go unnoticed while the terminal
keeps saying everything is up. The supervisor polls each child; when one has exited
it prints its name, exit code (or signal) and the last lines of its log, then starts
it again after a backoff that doubles for each crash that follows a short run (1 s,
2 s, 4 s … up to 30 s), so a crash-looping service neither spins nor floods the
terminal. A part whose state lived only in its memory (the in-memory broker) is
reported but not restarted: a fresh one would have lost its topics, and the honest fix
is to start ``make run`` again. The S3 server keeps its objects on disk and is
restarted like a service.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from radflow_devstack.processes import ManagedProcess, StartupFailed

LOG_LINES = 12
"""Lines of a dead child's log printed on the terminal."""


def describe_exit(code: int) -> str:
    """``exit 1``, or ``killed by SIGKILL`` for a negative Popen return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit {code}"


@dataclass
class Child:
    """One supervised process and what the supervisor knows of it."""

    proc: ManagedProcess
    ready: Callable[[], bool] | None = None
    """Readiness probe (its /readyz answering 200); None: running is ready."""
    restart: bool = True
    not_restarted_because: str = ""
    restarts: int = 0
    """How many times the supervisor started it again."""
    crashes_in_a_row: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    waiting_ready: bool = False
    given_up: bool = False
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Call ``poll()`` every half second or so from the launcher's main loop."""

    def __init__(
        self,
        out: TextIO | None = None,
        *,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        stable_after_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out or sys.stdout
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.stable_after_s = stable_after_s
        """A child that ran this long before dying starts again after ``backoff_s``."""
        self.clock = clock
        self.children: dict[str, Child] = {}

    def watch(
        self,
        proc: ManagedProcess,
        ready: Callable[[], bool] | None = None,
        *,
        restart: bool = True,
        not_restarted_because: str = "",
    ) -> Child:
        child = Child(proc, ready, restart, not_restarted_because, started_at=self.clock())
        self.children[proc.name] = child
        return child

    def poll(self) -> None:
        now = self.clock()
        for child in self.children.values():
            if child.given_up:
                continue
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._start_again(child, now)
                continue
            code = child.proc.proc.poll() if child.proc.proc is not None else None
            if code is not None:
                self._died(child, code, now)
            elif child.waiting_ready and (child.ready is None or child.ready()):
                child.waiting_ready = False
                self._say(f"ok       {child.proc.name} is ready again (restart {child.restarts})")

    def _died(self, child: Child, code: int, now: float) -> None:
        child.exits.append(code)
        name = child.proc.name
        ran = now - child.started_at
        self._say(
            f"!!       {name} died: {describe_exit(code)} after {ran:.1f} s; "
            f"last lines of {child.proc.log_path}:"
        )
        for line in child.proc.log_tail(LOG_LINES).splitlines():
            self._say(f"   | {line[:300]}")
        if not child.restart:
            child.given_up = True
            self._say(f"!!       {name} is not restarted: {child.not_restarted_because}")
            return
        child.crashes_in_a_row = 1 if ran >= self.stable_after_s else child.crashes_in_a_row + 1
        delay = min(self.backoff_s * 2 ** (child.crashes_in_a_row - 1), self.max_backoff_s)
        child.restart_at = now + delay
        child.waiting_ready = False
        self._say(f"!!       restarting {name} in {delay:.0f} s (restart {child.restarts + 1})")

    def _start_again(self, child: Child, now: float) -> None:
        child.restart_at = None
        child.restarts += 1
        child.started_at = now
        child.waiting_ready = True
        # A child that exits at once is reported by the next poll, which schedules the next try.
        with contextlib.suppress(StartupFailed):
            child.proc.start()

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)
