"""Starting each real part: the Tansu broker, the S3 server, and radflow services."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from radflow_core.blobstore import BlobStore
from radflow_core.kafka import ensure_topics
from radflow_core.settings import KafkaSettings, S3Settings
from radflow_devstack.broker import Broker, S3Storage
from radflow_devstack.processes import ManagedProcess
from radflow_devstack.s3server import SeaweedS3

LOCAL_S3_ACCESS_KEY = "radflow"
LOCAL_S3_SECRET_KEY = "radflow-secret"  # noqa: S105 - the loopback dev server's key


def start_broker(
    port: int,
    log_dir: Path,
    advertised_port: int | None = None,
    storage: S3Storage | None = None,
) -> Broker:
    """Tansu on 127.0.0.1:port, advertising ``advertised_port``; in memory unless
    ``storage`` names a bucket (see :class:`~radflow_devstack.broker.Broker`).

    Advertising another port lets a test put a fault-injecting proxy in front of it.
    """
    return Broker(port, log_dir, advertised_port=advertised_port, storage=storage).start()


def broker_storage(s3_port: int, bucket: str) -> S3Storage:
    """Storage for a durable broker in ``bucket`` of the local S3 server, which this
    creates if it is missing."""
    storage = S3Storage(
        f"http://127.0.0.1:{s3_port}", bucket, LOCAL_S3_ACCESS_KEY, LOCAL_S3_SECRET_KEY
    )
    settings = S3Settings.from_env(
        {
            "RADFLOW_S3_ENDPOINT": storage.endpoint,
            "RADFLOW_S3_ACCESS_KEY": storage.access_key,
            "RADFLOW_S3_SECRET_KEY": storage.secret_key,
            "RADFLOW_S3_BUCKET": bucket,
        }
    )

    async def make_bucket() -> None:
        blobs = BlobStore(settings)
        try:
            await blobs.ensure_bucket()
        finally:
            blobs.close()

    asyncio.run(make_bucket())
    return storage


def start_s3(
    port: int,
    log_dir: Path,
    data_dir: Path | None = None,
    *,
    name: str = "s3",
    access_key: str = LOCAL_S3_ACCESS_KEY,
    secret_key: str = LOCAL_S3_SECRET_KEY,
    timeout_s: float = 30.0,
) -> SeaweedS3:
    """SeaweedFS's S3 server on 127.0.0.1:port (see :mod:`radflow_devstack.s3server`),
    its objects in ``data_dir`` (default ``log_dir/<name>-data``), accepting only
    ``access_key``/``secret_key``; returns once a signed request succeeds."""
    proc = SeaweedS3(
        port,
        data_dir or log_dir / f"{name}-data",
        log_dir / f"{name}.log",
        access_key=access_key,
        secret_key=secret_key,
        name=name,
    ).start()
    try:
        proc.wait_until(proc.answers, timeout_s)
    except BaseException:
        proc.stop()
        raise
    return proc


ORTHANC_PLUGINS = Path("/usr/share/orthanc/plugins")


def start_orthanc(
    http_port: int,
    dicom_port: int,
    run_dir: Path,
    *,
    users: Mapping[str, str] | None = None,
    name: str = "orthanc",
    config: Mapping[str, object] | None = None,
) -> ManagedProcess:
    """Orthanc (Debian packages ``orthanc`` and ``orthanc-dicomweb``) on loopback, with
    its DICOMweb plugin at ``/dicom-web/``, storing in ``run_dir/<name>``.

    ``users`` turns on HTTP basic authentication with those user names and passwords;
    ``config`` adds or overrides configuration keys (e.g. ``DicomTlsEnabled``).
    Orthanc's DIMSE side uses DCMTK, so Nagle's algorithm is turned off for it too.
    """
    binary = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
    if not Path(binary).exists():
        raise FileNotFoundError(
            "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
        )
    home = run_dir / name
    home.mkdir(parents=True, exist_ok=True)
    settings = {
        "Name": name,
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": bool(users),
        "RegisteredUsers": dict(users or {}),
        "HttpCompressionEnabled": False,
        "Plugins": [str(ORTHANC_PLUGINS / "libOrthancDicomWeb.so")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        "StableAge": 2,
        "ConcurrentJobs": 2,
        "HttpThreadsCount": 16,
        "DicomScpTimeout": 30,
        "DicomModalities": {},
        "UnknownSopClassAccepted": True,
        **(config or {}),
    }
    config_path = home / "orthanc.json"
    config_path.write_text(json.dumps(settings, indent=2))
    proc = ManagedProcess(
        name,
        [binary, str(config_path)],
        run_dir / f"{name}.log",
        {"TCP_NODELAY": "1"},
    ).start()
    proc.port = http_port
    proc.dicom_port = dicom_port
    proc.wait_until(lambda: http_status(f"http://127.0.0.1:{http_port}/") in (200, 401), 60)
    return proc


def start_mllp_peer(
    port: int, log_dir: Path, *, tls_cert: Path | None = None, tls_key: Path | None = None
) -> ManagedProcess:
    """The stand-in RIS (:mod:`radflow_devstack.mllp_peer`) on 127.0.0.1:port, over
    TLS with ``tls_cert`` and ``tls_key``."""
    tls = ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)] if tls_cert else []
    proc = ManagedProcess(
        "mllp-peer",
        [sys.executable, "-m", "radflow_devstack.mllp_peer", "--port", str(port), *tls],
        log_dir / "mllp-peer.log",
    ).start()
    proc.port = port
    proc.wait_for_port(port)
    return proc


def start_issuer(port: int, folder: Path, log_dir: Path) -> ManagedProcess:
    """The development OAuth2 issuer (:mod:`radflow_devstack.issuer`) serving its JWKS on
    127.0.0.1:port, its key kept in ``folder``."""
    proc = ManagedProcess(
        "issuer",
        [
            sys.executable,
            "-m",
            "radflow_devstack.issuer",
            "--port",
            str(port),
            "--folder",
            str(folder),
        ],
        log_dir / "issuer.log",
    ).start()
    proc.port = port
    proc.wait_until(lambda: http_status(f"http://127.0.0.1:{port}/jwks.json") == 200)
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
