"""The service shell every service runs on: supervision turns a dead consumer or loop
into a failed service (main exits 3, Kubernetes restarts the pod), and stopping follows
one order whatever the service. Fakes stand in for the broker and the bucket: this is
the shell's own logic."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from aiohttp import web

from radflow_core.settings import OpsSettings
from radflow_core.shell import Door, Shell, State

ORDER: list[str] = []


class FakeProducer:
    async def start(self) -> None:
        ORDER.append("producer started")

    async def stop(self) -> None:
        ORDER.append("producer stopped")

    async def ping(self) -> None:
        return None


class FakeBlobs:
    async def ping(self) -> None:
        return None

    def close(self) -> None:
        ORDER.append("blobs closed")


class FakeConsumer:
    def __init__(self, name: str, fail_after_s: float | None = None) -> None:
        self.group = name
        self._fail_after_s = fail_after_s
        self._stop = asyncio.Event()

    async def run(self) -> None:
        if self._fail_after_s is not None:
            await asyncio.sleep(self._fail_after_s)
            raise RuntimeError("consumer broke")
        await self._stop.wait()
        ORDER.append(f"{self.group} ended")

    def stop(self) -> None:
        self._stop.set()


def _shell(**more: Any) -> Shell:
    ORDER.clear()
    return Shell(
        "test",
        producer=FakeProducer(),  # type: ignore[arg-type]
        blobs=FakeBlobs(),  # type: ignore[arg-type]
        ops=OpsSettings(),
        http_host="127.0.0.1",
        http_port=0,
        **more,
    )


async def _wait(event: asyncio.Event) -> None:
    async with asyncio.timeout(5):
        await event.wait()


async def test_a_consumer_that_dies_fails_the_service() -> None:
    shell = _shell()
    shell.consume(FakeConsumer("healthy"))  # type: ignore[arg-type]
    shell.consume(FakeConsumer("broken", fail_after_s=0.1))  # type: ignore[arg-type]
    await shell.start()
    await _wait(shell.failed)
    assert shell.state is State.FAILED
    await shell.stop()
    assert shell.state is State.STOPPED
    assert "healthy ended" in ORDER


async def test_a_loop_that_raises_fails_the_service_but_one_with_nothing_to_do_may_end() -> None:
    shell = _shell()

    async def nothing_to_do() -> None:
        return None

    async def broken() -> None:
        await asyncio.sleep(0.1)
        raise ValueError("loop broke")

    shell.loop("idle", nothing_to_do)
    await shell.start()
    await asyncio.sleep(0.3)
    assert not shell.failed.is_set()
    await shell.stop()

    shell = _shell()
    shell.loop("broken", broken)
    await shell.start()
    await _wait(shell.failed)
    await shell.stop()


async def test_stopping_follows_one_order_and_is_safe_twice() -> None:
    shell = _shell()
    shell.consume(FakeConsumer("consumer"))  # type: ignore[arg-type]

    async def drain() -> None:
        ORDER.append("drained")

    async def close() -> None:
        ORDER.append("closed")

    async def graceful() -> None:
        await shell.stopping.wait()
        ORDER.append("release finished")

    shell.on_drain(drain)
    shell.on_close(close)
    shell.loop("release", graceful, graceful=True)
    await shell.start()
    await _wait(shell.connected)
    await shell.stop()
    await shell.stop()
    assert ORDER == [
        "producer started",
        "drained",
        "consumer ended",
        "release finished",
        "closed",
        "producer stopped",
        "blobs closed",
    ]
    assert not shell.failed.is_set()


async def test_a_consumer_added_while_running_starts_and_a_retired_one_stops() -> None:
    shell = _shell()
    await shell.start()
    await _wait(shell.connected)
    late: Any = FakeConsumer("late")
    shell.consume(late)
    await asyncio.sleep(0.1)
    await shell.retire([late])
    assert ORDER[-1] == "late ended"
    assert shell.state is State.RUNNING
    await shell.stop()


async def _hello(_: web.Request) -> web.Response:
    return web.Response(text="hello")


async def test_public_routes_on_their_doors_never_share_the_ops_port() -> None:
    routes = [web.get("/hello", _hello)]
    shell = _shell(routes=routes, doors=[Door("public", "127.0.0.1", 0)])
    await shell.start()
    try:
        async with httpx.AsyncClient() as http:
            door = f"http://127.0.0.1:{shell.ports['public']}"
            ops = f"http://127.0.0.1:{shell.ports['ops']}"
            assert (await http.get(f"{door}/hello")).text == "hello"
            assert (await http.get(f"{door}/metrics")).status_code == 404
            assert (await http.get(f"{ops}/hello")).status_code == 404
            assert (await http.get(f"{ops}/healthz")).status_code == 200
    finally:
        await shell.stop()

    shell = _shell(routes=routes, doors=[])  # every door closed: the routes are nowhere
    await shell.start()
    try:
        async with httpx.AsyncClient() as http:
            ops = f"http://127.0.0.1:{shell.ports['ops']}"
            assert (await http.get(f"{ops}/hello")).status_code == 404
    finally:
        await shell.stop()
