"""Session fixtures: the real broker (Tansu) and S3 server (SeaweedFS), started once on free
loopback ports; per-test topics and bucket; the ingest service as a real process."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from radflow_core.topics import Topic
from radflow_devstack.broker import Broker
from radflow_devstack.parts import (
    broker_storage,
    prepare,
    start_broker,
    start_orthanc,
    start_s3,
    start_service,
)
from radflow_devstack.processes import ManagedProcess, free_port
from radflow_devstack.stow_counter import StowCounter
from support.corpus import build_corpus
from support.fleet import Fleet
from support.stack import IngestProcess, Stack, make_stack
from support.stow import TEST_API_KEY_SETTING
from support.strict_s3 import StrictS3, start_strict_s3

os.environ.setdefault("TCP_NODELAY", "1")  # DCMTK tools: see docs/architecture.md on Nagle


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def ts_corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One instance per transfer syntax ingest accepts: {transfer syntax UID: file}."""
    return build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def broker(run_dir: Path) -> Iterator[ManagedProcess]:
    proc = start_broker(free_port(), run_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def s3_server(run_dir: Path) -> Iterator[ManagedProcess]:
    proc = start_s3(free_port(), run_dir)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def strict_s3(run_dir: Path) -> Iterator[StrictS3]:
    """A second S3 server, with random keys (the shared one has make run's, which are
    the settings' defaults): for the tests of a wrong secret or an unknown key."""
    server = start_strict_s3(run_dir)
    yield server
    server.proc.stop()


@pytest.fixture
def stack(broker: ManagedProcess, s3_server: ManagedProcess, tmp_path: Path) -> Stack:
    """A fresh bucket and fresh topics on the shared broker and S3 server."""
    assert broker.port and s3_server.port
    st = make_stack(broker.port, s3_server.port, tmp_path)
    prepare(st.kafka, st.s3, [st.topic(t) for t in Topic])
    return st


@pytest.fixture
def durable_broker(s3_server: ManagedProcess, tmp_path: Path) -> Iterator[Broker]:
    """This test's own Tansu, keeping its log in a bucket of the shared S3 server: it
    can be killed (``.kill()``, ``.restart()``) and comes back on its port with every
    acknowledged record and committed offset."""
    assert s3_server.port
    storage = broker_storage(s3_server.port, f"tansu-{uuid.uuid4().hex[:10]}")
    proc = start_broker(free_port(), tmp_path, storage=storage)
    yield proc
    proc.kill()


@pytest.fixture
def durable_stack(durable_broker: Broker, s3_server: ManagedProcess, tmp_path: Path) -> Stack:
    """Like ``stack``, on ``durable_broker``; pass it as ``stack_=`` to the ``start_*``
    fixtures. Its topics are read until idle, not to the broker's end offsets (which
    Tansu on S3 under-reports: see radflow_devstack.broker)."""
    assert durable_broker.port and s3_server.port
    st = make_stack(durable_broker.port, s3_server.port, tmp_path)
    st.read_idle_s = DURABLE_READ_IDLE_S
    prepare(st.kafka, st.s3, [st.topic(t) for t in Topic])
    return st


DURABLE_READ_IDLE_S = 2.0


LOG_TAIL_LINES = 30
QUIET = ('"level":"info"', '"level":"debug"')
"""How a JSON log line at info or debug level starts (after its timestamp)."""


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """A failed pipeline test carries, for every process log it started, its last
    warnings and errors and its tail: CI keeps no temporary directories, so this is
    all there is to diagnose it with (and a busy service's tail is all info lines)."""
    report = yield
    tmp_path = getattr(item, "funcargs", {}).get("tmp_path")
    if report.failed and isinstance(tmp_path, Path):
        for log in sorted(tmp_path.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            loud = [line for line in lines if not any(q in line[:70] for q in QUIET)]
            loud = loud[-LOG_TAIL_LINES:]
            tail = lines[-LOG_TAIL_LINES:]
            for what, picked in (("warnings and errors", loud), ("tail", tail)):
                body = "\n".join(line[:400] for line in picked)
                report.sections.append((f"log {log.name}: {what} ({len(picked)} lines)", body))
    return report


ServiceFactory = Callable[..., IngestProcess]
ENV_SECTION = {"stow_forwarder": "forwarder"}
"""Module → its settings prefix, where they differ."""


def _service_factory(
    module: str, stack: Stack, tmp_path: Path, started: list[IngestProcess]
) -> ServiceFactory:
    prefix = f"RADFLOW_{ENV_SECTION.get(module, module).upper()}_"

    def start(
        stack_: Stack | None = None,
        env: dict[str, str] | None = None,
        wait_ready: bool = True,
        wait_port: bool = True,
        **settings: str,
    ) -> IngestProcess:
        """``settings`` are RADFLOW_<SERVICE>_* values by lower-case name; ``env`` is raw.
        Without ``wait_ready`` it waits for the HTTP port only, or (``wait_port=False``,
        for a service expected not to start) for nothing."""
        st = stack_ or stack
        dimse_port, http_port = free_port(), free_port()
        ops_port = free_port() if module == "ingest" else None
        # Ingest authenticates STOW-RS in tests too: with the fixtures' API key.
        auth = {"RADFLOW_INGEST_AUTH_API_KEYS": TEST_API_KEY_SETTING} if ops_port else {}
        env = {
            **st.env,
            **auth,
            **(env or {}),
            f"{prefix}HTTP_PORT": str(http_port),
            **{f"{prefix}{k.upper()}": v for k, v in settings.items()},
        }
        dimse_tls_port = free_port()
        if ops_port is not None:
            env[f"{prefix}DIMSE_PORT"] = str(dimse_port)
            env[f"{prefix}DIMSE_TLS_PORT"] = str(dimse_tls_port)
            env[f"{prefix}OPS_PORT"] = str(ops_port)
        ops = ops_port or http_port
        ready = f"http://127.0.0.1:{ops}/readyz" if wait_ready else None
        name = f"{module}-{sum(h.proc.name.startswith(f'{module}-') for h in started)}"
        proc = start_service(name, module, env, tmp_path, ready)
        handle = IngestProcess(
            proc,
            dimse_port,
            http_port,
            extra=settings,
            dimse_tls_port=dimse_tls_port,
            ops_port=ops_port,
        )
        if not wait_ready and wait_port:
            proc.wait_for_port(ops)
        started.append(handle)
        return handle

    return start


@pytest.fixture
def services() -> Iterator[list[IngestProcess]]:
    """Every service process a test started. They are all stopped together at the end
    (SIGTERM to each, then the waits), which saves a second or two per process over
    stopping them one after the other; each must exit with its expected code."""
    started: list[IngestProcess] = []
    yield started
    for handle in started:
        handle.proc.terminate()
    for handle in started:
        code = handle.proc.stop()
        assert code == handle.expected_exit, (
            f"{handle.proc.name} exited {code}, expected {handle.expected_exit}; log:\n"
            f"{handle.proc.log_tail()}"
        )


@pytest.fixture
def start_ingest(stack: Stack, tmp_path: Path, services: list[IngestProcess]) -> ServiceFactory:
    """Start ``python -m ingest`` against ``stack``; stops it (gracefully) afterwards."""
    return _service_factory("ingest", stack, tmp_path, services)


@pytest.fixture
def start_transcode(stack: Stack, tmp_path: Path, services: list[IngestProcess]) -> ServiceFactory:
    """Start ``python -m transcode`` against ``stack``; stops it (gracefully) afterwards."""
    return _service_factory("transcode", stack, tmp_path, services)


@pytest.fixture
def start_router(stack: Stack, tmp_path: Path, services: list[IngestProcess]) -> ServiceFactory:
    """Start ``python -m router`` against ``stack`` (pass rules_file=...); stops it
    (gracefully) afterwards."""
    return _service_factory("router", stack, tmp_path, services)


@pytest.fixture
def start_forwarder(stack: Stack, tmp_path: Path, services: list[IngestProcess]) -> ServiceFactory:
    """Start ``python -m stow_forwarder`` against ``stack`` (pass rules_file=...)."""
    return _service_factory("stow_forwarder", stack, tmp_path, services)


@pytest.fixture
def start_report_return(
    stack: Stack, tmp_path: Path, services: list[IngestProcess]
) -> ServiceFactory:
    """Start ``python -m report_return`` against ``stack`` (pass sites_file=..., and
    rules_file=... for Structured Reports)."""
    return _service_factory("report_return", stack, tmp_path, services)


@pytest.fixture
def start_ledger(stack: Stack, tmp_path: Path, services: list[IngestProcess]) -> ServiceFactory:
    """Start ``python -m ledger`` against ``stack``; stops it (gracefully) afterwards."""
    return _service_factory("ledger", stack, tmp_path, services)


@pytest.fixture
def start_worklist(stack: Stack, tmp_path: Path, services: list[IngestProcess]) -> ServiceFactory:
    """Start ``python -m worklist`` against ``stack`` (pass sites_file=..., mllp_port=...,
    dimse_port=...); stops it (gracefully) afterwards."""
    return _service_factory("worklist", stack, tmp_path, services)


@pytest.fixture
def fleet(
    start_ingest: ServiceFactory,
    start_transcode: ServiceFactory,
    start_router: ServiceFactory,
    start_forwarder: ServiceFactory,
    start_report_return: ServiceFactory,
    services: list[IngestProcess],
) -> Fleet:
    """This test's service processes by name: start, kill, terminate, restart, scale."""
    return Fleet(
        {
            "ingest": start_ingest,
            "transcode": start_transcode,
            "router": start_router,
            "stow_forwarder": start_forwarder,
            "report_return": start_report_return,
        },
        services,
    )


@pytest.fixture
def stow_counter() -> Iterator[Callable[[ManagedProcess], StowCounter]]:
    """Put a counting proxy in front of an Orthanc: ``stow_counter(orthanc)``; point
    the forwarder at ``.url`` and read ``.deliveries()`` / ``.duplicates()``."""
    started: list[StowCounter] = []

    def start(orthanc: ManagedProcess) -> StowCounter:
        counter = StowCounter(f"http://127.0.0.1:{orthanc.port}").start()
        started.append(counter)
        return counter

    yield start
    for counter in started:
        counter.close()


@pytest.fixture
def start_orthanc_server(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """Start Orthanc with its DICOMweb plugin on free ports (``users=`` for basic auth)."""
    started: list[ManagedProcess] = []

    def start(**kwargs: object) -> ManagedProcess:
        proc = start_orthanc(
            free_port(), free_port(), tmp_path, name=f"orthanc-{len(started)}", **kwargs
        )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.kill()  # a test's Orthanc keeps nothing; its clean stop takes ~3 s
