"""An S3 server that checks credentials: moto in its authenticating mode, for the tests
of a wrong secret, an unknown access key and a missing bucket.

The shared S3 server of the session accepts any key and any signature (moto's
default), which is what every other test wants. This one is moto started with
``INITIAL_NO_AUTH_ACTION_COUNT``: the first few requests (creating an IAM user, its
access key and an allow-all S3 policy) go unchecked, every later one is verified
like AWS would (InvalidAccessKeyId, SignatureDoesNotMatch, AccessDenied).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
from minio import Minio

from radflow_devstack.parts import http_status
from radflow_devstack.processes import ManagedProcess, free_port

_SETUP_ACTIONS = 4
"""create_user, create_access_key, create_policy, attach_user_policy."""
_ALLOW_S3 = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}


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
    port = free_port()
    proc = ManagedProcess(
        "strict-s3",
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        log_dir / "strict-s3.log",
        env={"INITIAL_NO_AUTH_ACTION_COUNT": str(_SETUP_ACTIONS)},
    )
    proc.start()
    proc.port = port
    proc.wait_until(lambda: http_status(f"http://127.0.0.1:{port}/moto-api/") == 200)
    iam = boto3.client(
        "iam",
        endpoint_url=f"http://127.0.0.1:{port}",
        region_name="us-east-1",
        aws_access_key_id="setup",
        aws_secret_access_key="setup",  # not checked during the set-up actions
    )
    iam.create_user(UserName="radflow")
    key = iam.create_access_key(UserName="radflow")["AccessKey"]
    policy = iam.create_policy(PolicyName="s3-all", PolicyDocument=json.dumps(_ALLOW_S3))
    iam.attach_user_policy(UserName="radflow", PolicyArn=policy["Policy"]["Arn"])
    return StrictS3(proc, key["AccessKeyId"], key["SecretAccessKey"])
