"""Handles on the real parts a test runs against."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minio import Minio

from radflow_core.settings import KafkaSettings, S3Settings
from radflow_core.topics import Topic
from radflow_devstack.__main__ import local_env
from radflow_devstack.parts import http_status
from radflow_devstack.processes import ManagedProcess
from support.kafka import read_topic


@dataclass
class Stack:
    """One test's slice of the shared broker and S3 server: its own topics and bucket."""

    env: dict[str, str]
    kafka: KafkaSettings
    s3: S3Settings
    log_dir: Path
    read_idle_s: float | None = None
    """Read topics until no record came for this long, instead of to their end
    offsets (for a broker whose end offsets cannot be trusted)."""

    def topic(self, topic: Topic) -> str:
        return self.kafka.topic(topic)

    def events(self, topic: Topic = Topic.INSTANCE_RECEIVED) -> list[dict[str, Any]]:
        records = read_topic(self.kafka, self.topic(topic), idle_s=self.read_idle_s)
        return [r["value"] for r in records]

    def routed(self, routine: int, stat: int) -> bool:
        """True when exactly this many forward requests are in each lane's topic."""
        return (
            len(self.events(Topic.FORWARD_REQUESTED)) == routine
            and len(self.events(Topic.FORWARD_REQUESTED_STAT)) == stat
        )

    def make_bucket(self) -> None:
        if not self.minio().bucket_exists(self.s3.bucket):
            self.minio().make_bucket(self.s3.bucket)

    def minio(self) -> Minio:
        endpoint = self.s3.endpoint.split("://", 1)[1]
        return Minio(
            endpoint,
            access_key=self.s3.access_key,
            secret_key=self.s3.secret_key.get_secret_value(),
            secure=False,
        )

    def object_bytes(self, key: str) -> bytes:
        response = self.minio().get_object(self.s3.bucket, key)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(
            o.object_name
            for o in self.minio().list_objects(self.s3.bucket, prefix, recursive=True)
            if o.object_name
        )

    def assert_event_matches_blob(self, event: dict[str, Any]) -> bytes:
        """The claim check: the blob exists and hashes to what the event says."""
        blob = event["data"]["blob"]
        assert blob["bucket"] == self.s3.bucket
        data = self.object_bytes(blob["key"])
        assert len(data) == blob["size"]
        assert hashlib.sha256(data).hexdigest() == blob["sha256"]
        return data


def make_stack(broker_port: int, s3_port: int, log_dir: Path) -> Stack:
    """Settings for a fresh slice (unique topic prefix and bucket) of a broker and S3."""
    tag = uuid.uuid4().hex[:10]
    env = local_env(broker_port, s3_port)
    env["RADFLOW_KAFKA_TOPIC_PREFIX"] = f"t{tag}."
    env["RADFLOW_S3_BUCKET"] = f"t-{tag}"
    env["RADFLOW_LOG_FORMAT"] = "json"
    env["RADFLOW_KAFKA_ACK_TIMEOUT_S"] = "5"
    return Stack(
        env=env, kafka=KafkaSettings.from_env(env), s3=S3Settings.from_env(env), log_dir=log_dir
    )


@dataclass
class IngestProcess:
    proc: ManagedProcess
    dimse_port: int
    http_port: int
    ae_title: str = "RADFLOW"
    extra: dict[str, str] = field(default_factory=dict)
    ops_port: int | None = None
    """Ingest's ops port (/metrics, /readyz), apart from STOW-RS on http_port; the
    other services serve ops on http_port."""
    expected_exit: int = 0
    """The exit code the fixture expects when it stops the process."""
    dimse_tls_port: int = 0
    """ingest's DICOM TLS port (listening only when a certificate is configured)."""

    @property
    def url(self) -> str:
        """Where /metrics, /healthz and /readyz are."""
        return f"http://127.0.0.1:{self.ops_port or self.http_port}"

    @property
    def stow_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}/dicomweb/studies"

    def log(self) -> str:
        return self.proc.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        return http_status(f"{self.url}/readyz") == 200

    def wait_ready(self, timeout_s: float = 60.0) -> IngestProcess:
        """For a service started with ``wait_ready=False, wait_port=False`` so that
        several start at once (each takes a second or two to import and connect)."""
        self.proc.wait_until(self.ready, timeout_s)
        return self
