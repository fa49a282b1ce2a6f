"""A second S3 server with credentials of its own, for the tests of a wrong secret, an
unknown access key and a missing bucket.

The session's shared server checks signatures too (SeaweedFS), but with make run's
development keys, which are also the settings' defaults: a test on it could not tell
a client that used its configured keys from one that fell back to the defaults. This
server's keys are random, so only settings that carry them get in.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path

from minio import Minio

from radflow_devstack.parts import start_s3
from radflow_devstack.processes import ManagedProcess, free_port


@dataclass
class StrictS3:
    proc: ManagedProcess
    access_key: str
    secret_key: str

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.proc.port}"

    def env(self, bucket: str, secret_key: str | None = None) -> dict[str, str]:
        """RADFLOW_S3_* for ``bucket`` on this server, with the right secret unless
        another is given."""
        return {
            "RADFLOW_S3_ENDPOINT": self.endpoint,
            "RADFLOW_S3_ACCESS_KEY": self.access_key,
            "RADFLOW_S3_SECRET_KEY": secret_key or self.secret_key,
            "RADFLOW_S3_BUCKET": bucket,
            "RADFLOW_S3_RETRIES": "0",
        }

    def make_bucket(self, bucket: str) -> None:
        client = Minio(
            self.endpoint.split("://", 1)[1],
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            region="us-east-1",
        )
        client.make_bucket(bucket)


def start_strict_s3(log_dir: Path) -> StrictS3:
    access_key = f"STRICT{secrets.token_hex(7).upper()}"
    secret_key = secrets.token_urlsafe(30)
    proc = start_s3(
        free_port(), log_dir, name="strict-s3", access_key=access_key, secret_key=secret_key
    )
    return StrictS3(proc, access_key, secret_key)
