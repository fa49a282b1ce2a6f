"""The codec pool with real worker processes: a worker that dies fails only the call
that kills it, not the others that were queued in the same pool."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from transcode.pool import CodecCrashed, CodecPool, Turns


async def test_only_the_call_that_kills_a_worker_is_blamed() -> None:
    pool = CodecPool(workers=1)
    try:
        slow = asyncio.create_task(pool.run(time.sleep, 0.3))
        await asyncio.sleep(0.05)
        crash = asyncio.create_task(pool.run(os._exit, 3))
        queued = [asyncio.create_task(pool.run(pow, 2, n)) for n in range(4)]
        async with asyncio.timeout(120):
            results = await asyncio.gather(slow, crash, *queued, return_exceptions=True)
    finally:
        await asyncio.to_thread(pool.close)
    assert results[0] is None
    assert isinstance(results[1], CodecCrashed)
    assert results[2:] == [1, 2, 4, 8]


async def test_the_pool_works_again_after_a_worker_died() -> None:
    pool = CodecPool(workers=1)
    try:
        async with asyncio.timeout(120):
            with pytest.raises(CodecCrashed):
                await pool.run(os._exit, 3)
            assert await pool.run(pow, 3, 2) == 9
    finally:
        await asyncio.to_thread(pool.close)
    pool.close()  # safe twice


async def test_a_stat_call_goes_ahead_of_every_routine_call_not_yet_in_the_pool() -> None:
    pool = CodecPool(workers=1)
    try:
        busy = asyncio.create_task(pool.run(time.sleep, 0.3))
        await asyncio.sleep(0.05)
        routine = [asyncio.create_task(pool.run(time.time)) for _ in range(4)]
        await asyncio.sleep(0.05)
        stat = asyncio.create_task(pool.run(time.time, urgent=True))
        async with asyncio.timeout(120):
            await asyncio.gather(busy, stat, *routine)
    finally:
        await asyncio.to_thread(pool.close)
    # Each call records when it ran in the worker: the STAT one right after the busy one
    # and the one routine call queued in the pool to keep the worker fed.
    ran = sorted(
        [("stat", stat.result())] + [("routine", t.result()) for t in routine], key=lambda x: x[1]
    )
    assert [who for who, _ in ran] == ["routine", "stat", "routine", "routine", "routine"]
    assert [t.result() for t in routine] == sorted(t.result() for t in routine), "in order"


async def test_a_waiter_cancelled_while_handed_a_turn_passes_it_on() -> None:
    turns = Turns(1)
    await turns.acquire(urgent=False)
    cancelled = asyncio.create_task(turns.acquire(urgent=True))
    second = asyncio.create_task(turns.acquire(urgent=False))
    await asyncio.sleep(0)
    turns.release()  # hands the turn to the urgent waiter ...
    cancelled.cancel()  # ... which is cancelled before it runs
    async with asyncio.timeout(5):
        await second  # the turn went on to the next waiter, not lost
    turns.release()
    await asyncio.wait_for(turns.acquire(urgent=False), timeout=1)  # and is free again
