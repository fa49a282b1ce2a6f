"""Child processes with a log file, a readiness wait and a clean stop."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_handed_out: set[int] = set()
"""Ports free_port has already returned in this process."""

_LOW_PORT = 20000
"""free_port's ports start here: above every documented default port (make run's)."""


def _ephemeral_start() -> int:
    """The first port the kernel hands to outgoing connections (ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, that no outgoing
    connection will take, and that this process has not been given before.

    Between this call and the bind of the process the port is for, the port is free for
    anyone: the kernel could give it to a second bind(0) or, were it in the ephemeral
    range, to any outgoing connection of any process (a client of the broker, S3 or
    Orthanc). Two listeners given one port either fail to start ("address already in
    use") or, both bound with SO_REUSEPORT (ingest's workers), silently share it so
    that some DICOM TLS associations reach the plain listener. So the port is drawn at
    random below the ephemeral range, where only explicit binds go, and never twice.
    """
    top = _ephemeral_start()
    if top - _LOW_PORT >= 1000:
        for _ in range(1000):
            port = random.randrange(_LOW_PORT, top)  # noqa: S311 (not a secret)
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    for _ in range(1000):  # a machine whose ephemeral range leaves no room below it
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise RuntimeError("no loopback port left that free_port has not already handed out")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class StartupFailed(RuntimeError):
    """A child did not become ready; the message ends with the tail of its log."""


class ManagedProcess:
    """One child process whose stdout and stderr go to ``log_path``."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        """The main port the process listens on, when the starter knows it."""
        self.dicom_port: int | None = None
        """Its DIMSE port, for a process that is a DICOM peer too (Orthanc)."""
        self._terminated = False

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self._terminated = False
        self.proc = subprocess.Popen(
            self.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            start_new_session=True,
        )
        log.close()
        return self

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def wait_until(self, ready: Callable[[], bool], timeout_s: float = 30.0) -> None:
        """Poll ``ready`` until it is true; raise StartupFailed with the log otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise StartupFailed(
                    f"{self.name} exited with {self.proc.returncode}; log:\n{self.log_tail()}"
                )
            if ready():
                return
            time.sleep(0.05)
        raise StartupFailed(f"{self.name} not ready after {timeout_s}s; log:\n{self.log_tail()}")

    def wait_for_port(self, port: int, timeout_s: float = 30.0, host: str = "127.0.0.1") -> None:
        self.wait_until(lambda: port_open(host, port), timeout_s)

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def terminate(self) -> None:
        """SIGTERM without waiting, so that several processes stop at the same time;
        ``stop()`` then waits (and does not signal again)."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; returns the exit code. Safe to call twice."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        """Hard stop (SIGKILL), as a crash or an OOM kill would do it."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
