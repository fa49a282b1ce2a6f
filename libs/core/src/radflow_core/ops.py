"""The operational HTTP surface every service exposes: /metrics, /healthz, /readyz.

``/healthz`` answers 200 while the event loop runs (liveness: restart me if not).
``/readyz`` runs the service's dependency checks (broker, blob store, peers) and
answers 503 with the failing check named while any fails or while shutting down, so
Kubernetes stops routing senders to a pod that would only refuse them. Answers are
cached briefly so that probes do not hammer the dependencies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from radflow_core.errors import PipelineError

ReadinessCheck = Callable[[], Awaitable[None]]
"""Returns when the dependency is usable; raises a PipelineError when it is not."""


class Health:
    def __init__(self, checks: Mapping[str, ReadinessCheck], cache_s: float = 2.0) -> None:
        self._checks = dict(checks)
        self._cache_s = cache_s
        self._cached: tuple[float, bool, dict[str, str]] | None = None
        self._lock = asyncio.Lock()
        self.stopping = False

    async def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, {check: "ok" or the reason it failed})."""
        if self.stopping:
            return False, {"service": "shutting down"}
        async with self._lock:
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self._cache_s:
                return self._cached[1], self._cached[2]
            names = list(self._checks)
            results = await asyncio.gather(
                *(self._checks[n]() for n in names), return_exceptions=True
            )
            report: dict[str, str] = {}
            for name, result in zip(names, results, strict=True):
                if isinstance(result, PipelineError):
                    report[name] = f"{result.reason}: {result}"
                elif isinstance(result, BaseException):
                    report[name] = f"unexpected: {type(result).__name__}"
                else:
                    report[name] = "ok"
            ready = all(v == "ok" for v in report.values())
            self._cached = (now, ready, report)
            return ready, report


def ops_routes(health: Health) -> list[web.RouteDef]:
    """Routes to mount on a service's aiohttp application."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"alive": True})

    async def readyz(_: web.Request) -> web.Response:
        ready, report = await health.readiness()
        return web.json_response({"ready": ready, "checks": report}, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        body = await asyncio.to_thread(generate_latest, REGISTRY)
        response = web.Response(body=body)
        response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return response

    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]
