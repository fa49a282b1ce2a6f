"""Fixtures of the fault suite: the whole pipeline with two counted destinations."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from faults.harness import Destinations, Pipeline, size, write_rules
from radflow_devstack.processes import ManagedProcess
from radflow_devstack.stow_counter import StowCounter
from support.fleet import Fleet
from support.stack import Stack


@pytest.fixture
def pipeline_env() -> dict[str, str]:
    """Settings every service of a scenario runs with: a poll interval the outages
    outlast, and quick recovery once a destination answers again."""
    return {
        "RADFLOW_KAFKA_MAX_POLL_INTERVAL_MS": str(size().max_poll_interval_ms),
        "RADFLOW_FORWARDER_RETRY_INITIAL_S": "0.5",
        "RADFLOW_FORWARDER_RETRY_MAX_S": "4",
        "RADFLOW_FORWARDER_BREAKER_COOLDOWN_S": "2",
    }


@pytest.fixture
def destinations(
    start_orthanc_server: Callable[..., ManagedProcess],
    stow_counter: Callable[[ManagedProcess], StowCounter],
) -> Destinations:
    """Two Orthancs, ``a`` and ``b``, each behind a proxy that counts every instance it
    passes on (Orthanc keeps one copy per UID and would hide a second send)."""
    return Destinations({name: stow_counter(start_orthanc_server()) for name in ("a", "b")})


@pytest.fixture
def start_pipeline(
    stack: Stack,
    fleet: Fleet,
    destinations: Destinations,
    pipeline_env: dict[str, str],
    tmp_path: Path,
) -> Callable[..., Pipeline]:
    """Start ingest, transcode, router and stow-forwarder (all ready) routing every
    instance to both destinations; ``modules`` picks a subset, ``on`` another stack
    (``durable_stack``), ``env`` more settings for every service.

    ``pipeline.settings`` holds everything a service of the scenario needs beyond the
    ``stack`` fixture's environment (on another stack, that stack's environment too):
    a replica started later with ``env=pipeline.settings`` joins the same pipeline."""

    def start(
        modules: tuple[str, ...] = ("ingest", "transcode", "router", "stow_forwarder"),
        *,
        on: Stack | None = None,
        env: dict[str, str] | None = None,
    ) -> Pipeline:
        rules = write_rules(
            tmp_path / "rules.yaml",
            {n: f"{c.url}/dicom-web" for n, c in destinations.counters.items()},
        )
        settings = {**(on.env if on else {}), **pipeline_env, **(env or {})}
        pipeline = Pipeline(on or stack, destinations, rules, settings)
        for module in modules:
            extra = {"rules_file": str(rules)} if module in ("router", "stow_forwarder") else {}
            pipeline.started[module] = fleet.start(
                module, env=settings, wait_ready=False, wait_port=False, **extra
            )
        for handle in pipeline.started.values():
            handle.wait_ready()
        return pipeline

    return start
