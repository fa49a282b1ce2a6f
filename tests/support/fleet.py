"""A test's service processes by name: crash them, stop them, start them again, scale
a consumer out — while a stream is being sent.

Names are those the ``start_*`` fixtures give (``transcode-0``, ``transcode-1`` …); a
module name (``transcode``) stands for its only replica. Every handle stays in the
``services`` fixture's list, which stops them all at the end and checks each exit
code against ``expected_exit`` (which ``kill`` and ``terminate`` set to what the test
did to it, and a restart puts back to 0).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping

from support.stack import IngestProcess

ServiceFactory = Callable[..., IngestProcess]


class Fleet:
    def __init__(self, factories: Mapping[str, ServiceFactory], started: list[IngestProcess]):
        self._factories = dict(factories)
        self._started = started

    def start(self, module: str, **settings: str) -> IngestProcess:
        """One more replica of ``module`` (``ingest``, ``transcode``, ``router``,
        ``stow_forwarder``, ``report_return``), with its own ports, ready."""
        return self._factories[module](**settings)

    def get(self, name: str) -> IngestProcess:
        found = [h for h in self._started if h.proc.name == name]
        if not found:
            found = self.replicas(name)
            if len(found) > 1:
                raise LookupError(f"{name} has {len(found)} replicas; name one of them")
        if not found:
            raise LookupError(f"no service process named {name}")
        return found[0]

    def replicas(self, module: str) -> list[IngestProcess]:
        """The running replicas of ``module``."""
        return [
            h
            for h in self._started
            if h.proc.name.rsplit("-", 1)[0] == module
            and h.proc.proc is not None
            and h.proc.proc.poll() is None
        ]

    def kill(self, name: str) -> IngestProcess:
        """SIGKILL (a crash, an OOM kill): nothing is finished, nothing committed."""
        handle = self.get(name)
        handle.proc.kill()
        handle.expected_exit = -signal.SIGKILL
        return handle

    def terminate(self, name: str, timeout_s: float = 30.0) -> int:
        """SIGTERM and wait (a rolling update); returns the exit code."""
        handle = self.get(name)
        code = handle.proc.stop(timeout_s)
        assert code is not None
        handle.expected_exit = code
        return code

    def restart(self, name: str, *, hard: bool = True, wait_ready: bool = True) -> IngestProcess:
        """Kill it (or, ``hard=False``, stop it gracefully) if it runs, and start the same
        process again: same settings, same ports, same consumer group; its log goes on
        in the same file."""
        handle = self.get(name)
        if hard:
            handle.proc.kill()
        else:
            handle.proc.stop()
        handle.proc.start()
        handle.expected_exit = 0
        if wait_ready:
            handle.wait_ready()
        return handle

    def scale(self, module: str, n: int, **settings: str) -> list[IngestProcess]:
        """Run exactly ``n`` replicas of ``module`` (one consumer group: same settings,
        each with its own ports): start the missing ones, ready, or stop the newest ones
        gracefully. ``settings`` apply to replicas started now."""
        running = self.replicas(module)
        for handle in running[n:][::-1]:
            self.terminate(handle.proc.name)
        added = [
            self._factories[module](wait_ready=False, wait_port=False, **settings)
            for _ in range(n - len(running))
        ]
        for handle in added:
            handle.wait_ready()
        return self.replicas(module)
