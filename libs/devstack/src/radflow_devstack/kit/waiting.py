"""wait_for: poll a condition and, on timeout, say what was being waited for."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class WaitTimedOut(AssertionError):
    """A condition did not hold in time; an AssertionError so that pytest reports it as
    the failed expectation it is. The message names what was awaited and its last value."""


def wait_for(what: str, probe: Callable[[], T], timeout_s: float = 20.0, every_s: float = 0.1) -> T:
    """Call ``probe`` every ``every_s`` seconds until it returns something true, and
    return that; raise WaitTimedOut after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    last: T = probe()
    while not last:
        if time.monotonic() > deadline:
            raise WaitTimedOut(
                f"timed out after {timeout_s:g}s waiting for {what} (last: {last!r})"
            )
        time.sleep(every_s)
        last = probe()
    return last
