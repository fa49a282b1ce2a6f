"""The codec pool with real worker processes: a worker that dies fails only the call
that kills it, not the others that were queued in the same pool."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from transcode.pool import CodecCrashed, CodecPool


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
