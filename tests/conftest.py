"""Session fixtures: the real broker (Tansu) and S3 server (moto), started once on free
loopback ports; per-test topics and bucket; the ingest service as a real process."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from radflow_core.settings import KafkaSettings, S3Settings
from radflow_core.topics import Topic
from radflow_devstack.__main__ import local_env
from radflow_devstack.parts import prepare, start_broker, start_s3, start_service
from radflow_devstack.processes import ManagedProcess, free_port

from support.stack import IngestProcess, Stack

os.environ.setdefault("TCP_NODELAY", "1")  # DCMTK tools: see DESIGN.md on Nagle


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


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


def make_stack(broker_port: int, s3_port: int, log_dir: Path) -> Stack:
    tag = uuid.uuid4().hex[:10]
    env = local_env(broker_port, s3_port)
    env["RADFLOW_KAFKA_TOPIC_PREFIX"] = f"t{tag}."
    env["RADFLOW_S3_BUCKET"] = f"t-{tag}"
    env["RADFLOW_LOG_FORMAT"] = "json"
    env["RADFLOW_KAFKA_ACK_TIMEOUT_S"] = "5"
    kafka = KafkaSettings.from_env(env)
    s3 = S3Settings.from_env(env)
    return Stack(env=env, kafka=kafka, s3=s3, log_dir=log_dir)


@pytest.fixture
def stack(broker: ManagedProcess, s3_server: ManagedProcess, tmp_path: Path) -> Stack:
    """A fresh bucket and fresh topics on the shared broker and S3 server."""
    assert broker.port and s3_server.port
    st = make_stack(broker.port, s3_server.port, tmp_path)
    prepare(st.kafka, st.s3, [st.topic(t) for t in Topic])
    return st


IngestFactory = Callable[..., IngestProcess]


@pytest.fixture
def start_ingest(stack: Stack, tmp_path: Path) -> Iterator[IngestFactory]:
    """Start ``python -m ingest`` against ``stack``; stops it (gracefully) afterwards."""
    started: list[IngestProcess] = []

    def start(stack_: Stack | None = None, wait_ready: bool = True, **settings: str) -> IngestProcess:
        st = stack_ or stack
        dimse_port, http_port = free_port(), free_port()
        env = {
            **st.env,
            "RADFLOW_INGEST_DIMSE_PORT": str(dimse_port),
            "RADFLOW_INGEST_HTTP_PORT": str(http_port),
            **{f"RADFLOW_INGEST_{k.upper()}": v for k, v in settings.items()},
        }
        ready = f"http://127.0.0.1:{http_port}/readyz" if wait_ready else None
        name = f"ingest-{len(started)}"
        proc = start_service(name, "ingest", env, tmp_path, ready)
        handle = IngestProcess(proc, dimse_port, http_port, extra=settings)
        if not wait_ready:
            proc.wait_for_port(http_port)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        code = handle.proc.stop()
        assert code == 0, f"ingest did not stop cleanly ({code}); log:\n{handle.proc.log_tail()}"
