"""Admission of instances by count and by bytes, in arrival order."""

from __future__ import annotations

import asyncio


class Window:
    """At most ``count`` items and ``max_bytes`` bytes in flight.

    Items are admitted in the order :meth:`acquire` is called, by one admitting task
    (the batch loop): a large item that does not fit yet is not overtaken by smaller
    ones behind it. An item larger than ``max_bytes`` counts as ``max_bytes``, so it is
    admitted once nothing else is in flight and runs alone.
    """

    def __init__(self, count: int, max_bytes: int) -> None:
        if count < 1 or max_bytes < 1:
            raise ValueError("a window holds at least one item and one byte")
        self._count = count
        self._max_bytes = max_bytes
        self._items = 0
        self._bytes = 0
        self._freed = asyncio.Event()

    @property
    def items(self) -> int:
        """Items in flight now."""
        return self._items

    def _weight(self, size: int) -> int:
        return min(max(size, 0), self._max_bytes)

    def _fits(self, weight: int) -> bool:
        return self._items < self._count and self._bytes + weight <= self._max_bytes

    async def acquire(self, size: int, alone: bool = False) -> int:
        """Wait until an item of ``size`` bytes fits (``alone``: until nothing else is in
        flight, and nothing else is admitted beside it), then count it in.

        Returns:
            The weight counted, to give back to :meth:`release`.
        """
        weight = self._max_bytes if alone else self._weight(size)
        while not self._fits(weight):
            self._freed.clear()
            await self._freed.wait()
        self._items += 1
        self._bytes += weight
        return weight

    def release(self, weight: int) -> None:
        """Count out an item admitted with ``weight``."""
        self._items -= 1
        self._bytes -= weight
        self._freed.set()
