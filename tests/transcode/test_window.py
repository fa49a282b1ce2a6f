"""The admission window of transcode: by count, by bytes, in order; pure logic."""

from __future__ import annotations

import asyncio

import pytest

from transcode.window import Window


async def _admitted(window: Window, size: int, alone: bool = False) -> bool:
    """Whether an item of ``size`` is admitted now (without waiting)."""
    try:
        async with asyncio.timeout(0.05):
            await window.acquire(size, alone)
    except TimeoutError:
        return False
    return True


async def test_no_more_than_count_items_are_in_flight() -> None:
    window = Window(count=2, max_bytes=1000)
    assert await _admitted(window, 1)
    assert await _admitted(window, 1)
    assert not await _admitted(window, 1)
    window.release(1)
    assert await _admitted(window, 1)
    assert window.items == 2


async def test_no_more_than_max_bytes_are_in_flight() -> None:
    window = Window(count=10, max_bytes=100)
    assert await _admitted(window, 60)
    assert not await _admitted(window, 50)
    assert await _admitted(window, 40)
    window.release(60)
    assert await _admitted(window, 50)
    assert window.items == 2


async def test_an_item_larger_than_max_bytes_runs_alone() -> None:
    window = Window(count=10, max_bytes=100)
    assert await _admitted(window, 1)
    assert not await _admitted(window, 10_000)
    window.release(1)
    assert await _admitted(window, 10_000)
    assert not await _admitted(window, 1)
    window.release(100)
    assert await _admitted(window, 1)


async def test_an_item_asked_to_run_alone_waits_for_the_others_and_blocks_them() -> None:
    window = Window(count=10, max_bytes=100)
    assert await _admitted(window, 1)
    assert not await _admitted(window, 1, alone=True)
    window.release(1)
    assert await _admitted(window, 1, alone=True)
    assert not await _admitted(window, 1)
    window.release(100)
    assert await _admitted(window, 1)


async def test_a_waiting_item_is_admitted_as_soon_as_room_is_freed() -> None:
    window = Window(count=1, max_bytes=100)
    weight = await window.acquire(10)
    waiting = asyncio.create_task(window.acquire(10))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    window.release(weight)
    async with asyncio.timeout(1):
        await waiting
    assert window.items == 1


def test_an_empty_window_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Window(count=0, max_bytes=1)
