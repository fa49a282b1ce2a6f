"""The codec worker processes, and who is blamed when one dies.

A worker that dies (a codec crash, an out-of-memory kill) breaks its whole pool: every
instance queued in it fails at once, not only the one that killed it. Each of those is
run again alone, in a one-worker pool of its own, one at a time; only an instance
that kills a worker by itself is reported as :class:`CodecCrashed`.

No more calls are handed to the pool than it has workers, plus one queued to keep a
worker fed between calls, so almost nothing queues inside it where it could not be
overtaken: a STAT instance's call (``urgent``) goes ahead of every routine call
waiting, and so waits at most for the calls already running and the one queued.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
from collections import deque
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from radflow_core.errors import PipelineError

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class CodecCrashed(PipelineError):
    """A codec worker process died on this instance (crash or out of memory).

    Not retriable: the same bytes would kill the next worker too."""

    reason = "codec_crashed"


def _new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver"))


class Turns:
    """At most ``count`` holders at once; an urgent waiter gets the next free turn
    before any other waiter, and waiters of one kind are served in arrival order."""

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiting: dict[bool, deque[asyncio.Future[None]]] = {True: deque(), False: deque()}

    async def acquire(self, urgent: bool) -> None:
        if self._free and not self._waiting[True] and (urgent or not self._waiting[False]):
            self._free -= 1
            return
        turn = asyncio.get_running_loop().create_future()
        self._waiting[urgent].append(turn)
        try:
            await turn
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self.release()  # handed a turn as we were cancelled: pass it on
            raise

    def release(self) -> None:
        for urgent in (True, False):
            waiting = self._waiting[urgent]
            while waiting:
                turn = waiting.popleft()
                if not turn.done():  # a cancelled waiter is skipped
                    turn.set_result(None)
                    return
        self._free += 1


class CodecPool:
    """``workers`` processes shared by every instance in flight."""

    def __init__(self, workers: int) -> None:
        self._workers = workers
        self._pool = _new_pool(workers)
        self._alone = asyncio.Lock()
        self._turns = Turns(workers + 1)

    async def run(self, fn: Callable[..., _T], *args: Any, urgent: bool = False) -> _T:
        """``fn(*args)`` in a worker process, ahead of non-urgent calls if ``urgent``.

        Raises:
            CodecCrashed: the worker died, and died again with this call alone.
        """
        loop = asyncio.get_running_loop()
        await self._turns.acquire(urgent)
        pool = self._pool
        try:
            return await loop.run_in_executor(pool, fn, *args)
        except BrokenProcessPool:
            self._replace(pool)
        finally:
            self._turns.release()
        log.warning("codec worker died; running the instance again alone")
        async with self._alone:
            solo = _new_pool(1)
            try:
                return await loop.run_in_executor(solo, fn, *args)
            except BrokenProcessPool:
                raise CodecCrashed("codec worker died on this instance") from None
            finally:
                await asyncio.to_thread(solo.shutdown, wait=True)

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """Start a fresh pool, once per broken one (every call that was in it gets here)."""
        if self._pool is broken:
            self._pool = _new_pool(self._workers)
            broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Wait for the workers to finish their calls and exit; safe to call twice."""
        self._pool.shutdown(wait=True, cancel_futures=True)
