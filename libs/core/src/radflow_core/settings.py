"""Typed settings read from ``RADFLOW_*`` environment variables.

Each section is a frozen pydantic model whose field docstrings are the documentation
(``--help`` prints them). Sections are built once in a service's ``__main__`` with
:meth:`Section.from_env` and passed to what needs them; nothing reads the environment
at import time. A bad value fails at start with the variable's name and what was
expected, never with a traceback from deep inside a client library.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from radflow_core.errors import ConfigurationError
from radflow_core.topics import Topic

ENV_PREFIX = "RADFLOW_"


class Section(BaseModel):
    """A group of settings sharing one environment prefix, e.g. ``RADFLOW_KAFKA_``."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)
    prefix: ClassVar[str]

    @classmethod
    def env_name(cls, field: str) -> str:
        return f"{ENV_PREFIX}{cls.prefix}{field.upper()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        """Build the section from ``environ``; unset variables keep their defaults.

        Raises:
            ConfigurationError: naming every variable that is malformed.
        """
        values = {
            name: environ[cls.env_name(name)]
            for name in cls.model_fields
            if cls.env_name(name) in environ
        }
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                field = str(err["loc"][0]) if err["loc"] else "?"
                shown = "" if _is_secret(cls, field) else f" (got {err.get('input')!r})"
                problems.append(f"{cls.env_name(field)}: {err['msg']}{shown}")
            raise ConfigurationError("invalid settings: " + "; ".join(problems)) from None

    @classmethod
    def describe(cls) -> Iterator[tuple[str, str, str]]:
        """Yield (variable, default, documentation) for ``--help``."""
        for name, info in cls.model_fields.items():
            default = info.default
            if isinstance(default, SecretStr):
                shown = "(set)" if default.get_secret_value() else "(empty)"
            elif isinstance(default, tuple):
                shown = ",".join(str(v) for v in default) or "(empty)"
            elif default is None:
                shown = "(unset)"
            else:
                shown = str(default.value if isinstance(default, StrEnum) else default)
            yield cls.env_name(name), shown, (info.description or "").strip()


def _is_secret(cls: type[Section], field: str) -> bool:
    info = cls.model_fields.get(field)
    return info is not None and info.annotation in (SecretStr, SecretStr | None)


class KafkaSettings(Section):
    prefix = "KAFKA_"

    bootstrap_servers: str = "127.0.0.1:9092"
    """Comma-separated host:port list of Kafka brokers."""
    idempotence: bool = True
    """Use the idempotent producer. Keep on for Kafka; set false for brokers without
    InitProducerId support (Tansu, used in development). Consumers are idempotent anyway."""
    ack_timeout_s: float = Field(default=10.0, gt=0)
    """Seconds to wait for acks=all on one event before the send counts as failed."""
    fetch_max_wait_ms: int = Field(default=100, ge=1, le=30_000)
    """Longest a consumer's fetch waits for new records. Kafka answers a waiting fetch
    as soon as records arrive, so this only paces idle polling there; Tansu (the
    development broker) answers only when it runs out, so each pipeline hop costs up
    to this much (aiokafka's own default of 500 ms made three hops take most of a
    0.5 s latency budget)."""
    session_timeout_ms: int = Field(default=10_000, ge=1_000, le=300_000)
    """A consumer that sends no heartbeat for this long is dropped from its group and
    its partitions go to another replica (how long a crashed replica's partitions
    wait). Tansu also holds every group join for half of it."""
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    """How often a consumer tells its group it is alive; well under the session
    timeout (a third or less)."""
    max_poll_interval_ms: int = Field(default=300_000, ge=1_000)
    """A consumer that does not poll for this long leaves its group. Records waiting
    for a retry never hold the poll loop (their partition is paused while the
    consumer keeps polling), so an outage of any length stays within it; lower it
    only to prove that (the fault suite does)."""
    topic_prefix: str = ""
    """Prepended to every topic name and consumer group id (e.g. 'site1.'), so that
    several pipelines can share one cluster; empty in production."""
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    """How to talk to the brokers."""
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-512"
    """SASL mechanism when security_protocol is SASL_*."""
    sasl_username: str = ""
    """SASL user name."""
    sasl_password: SecretStr = SecretStr("")
    """SASL password (never logged)."""
    ssl_cafile: Path | None = None
    """CA bundle to verify the brokers' certificates (SSL and SASL_SSL)."""

    @field_validator("heartbeat_interval_ms")
    @classmethod
    def _heartbeat_within_session(cls, value: int, info: ValidationInfo) -> int:
        session = info.data.get("session_timeout_ms")
        if session is not None and value * 2 > session:
            raise ValueError(f"must be at most half of the session timeout ({session} ms)")
        return value

    def topic(self, topic: Topic) -> str:
        """The real topic name, with the deployment's prefix."""
        return f"{self.topic_prefix}{topic.value}"

    def group(self, group_id: str) -> str:
        """The consumer group id as used on the cluster (with the prefix)."""
        return f"{self.topic_prefix}{group_id}"


class S3Settings(Section):
    prefix = "S3_"

    endpoint: str = "http://127.0.0.1:9000"
    """URL of the S3 server (MinIO in Kubernetes); https:// turns TLS on."""
    access_key: str = "radflow"
    """S3 access key id."""
    secret_key: SecretStr = SecretStr("radflow-secret")
    """S3 secret key (never logged)."""
    bucket: str = Field(default="radflow", min_length=3, max_length=63)
    """Bucket holding originals and derived variants (the PHI store)."""
    region: str = "us-east-1"
    """Region name sent in signatures."""
    connect_timeout_s: float = Field(default=2.0, gt=0)
    """Seconds to wait for a TCP connection to the S3 server."""
    read_timeout_s: float = Field(default=30.0, gt=0)
    """Seconds to wait for data on an open S3 connection."""
    retries: int = Field(default=2, ge=0, le=10)
    """Transport-level retries on connection errors and 5xx before giving up."""
    ca_file: Path | None = None
    """CA bundle to verify the S3 server's certificate."""
    part_size: int = Field(default=16 * 1024 * 1024, ge=5 * 1024 * 1024)
    """Multipart upload part size in bytes; larger instances stream in parts of this size."""

    @field_validator("endpoint")
    @classmethod
    def _endpoint_is_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected a URL starting with http:// or https://")
        return value.rstrip("/")


class LogFormat(StrEnum):
    JSON = "json"
    TEXT = "text"


class LogSettings(Section):
    prefix = "LOG_"

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Minimum level written to stderr."""
    format: LogFormat = LogFormat.JSON
    """json: one JSON object per line (for log shippers); text: for a terminal."""


class OpsSettings(Section):
    prefix = "OPS_"

    readiness_cache_s: float = Field(default=2.0, ge=0)
    """Seconds a /readyz answer is reused, so probes do not hammer the broker and S3."""


class AuditSettings(Section):
    prefix = "AUDIT_"

    enabled: bool = True
    """Publish DICOM audit messages (PS3.15 A.5) on radflow.audit (and to syslog, when
    a syslog host is set). Off only where another component audits the same events."""
    source_id: str = ""
    """AuditSourceID of every message; empty: 'radflow-<service>'."""
    enterprise_site_id: str = ""
    """AuditEnterpriseSiteID (the hospital or site running this pipeline); empty: left out."""
    transfer_window_s: float = Field(default=5.0, gt=0, le=300)
    """Seconds the instances of one study from one sender (received) or to one
    destination (forwarded) are collected into one DICOM Instances Transferred message,
    as an archive writes one per association and study."""
    transfer_max_instances: int = Field(default=1000, ge=1, le=100_000)
    """A collected transfer message is written early when it names this many instances."""
    max_pending: int = Field(default=1000, ge=1)
    """Audit messages waiting for the broker's acknowledgement at most; more are dropped
    (radflow_audit_dropped_total{reason="backlog"}) rather than slowing the work."""
    syslog_host: str = ""
    """Audit record repository to send every message to as RFC 5424 syslog over TLS
    (RFC 5425); empty: the topic only."""
    syslog_port: int = Field(default=6514, ge=1, le=65535)
    """Its port (6514: syslog over TLS)."""
    syslog_ca_file: Path | None = None
    """CA bundle to verify the repository's certificate (default: the system's)."""
    syslog_cert_file: Path | None = None
    """Client certificate (PEM) when the repository requires mutual TLS."""
    syslog_key_file: Path | None = None
    """Its private key (PEM)."""
    syslog_queue_size: int = Field(default=10_000, ge=1)
    """Messages waiting for the repository at most; more are dropped and counted."""
    syslog_timeout_s: float = Field(default=5.0, gt=0)
    """Seconds to connect to the repository, or to write one message, before retrying."""

    @model_validator(mode="after")
    def _key_with_cert(self) -> Self:
        if (self.syslog_cert_file is None) != (self.syslog_key_file is None):
            raise ValueError(
                f"set {self.env_name('syslog_cert_file')} and {self.env_name('syslog_key_file')}"
                " together"
            )
        return self


def csv_tuple(value: Any) -> Any:
    """Validator helper: accept ``a,b,c`` from the environment as a tuple."""
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


class ServiceConfig:
    """Base of a service's frozen dataclass of settings sections.

    The dataclass declares one field per section, in the order of ``SECTIONS``; every
    section reads its own ``RADFLOW_<PREFIX>*`` variables.
    """

    SECTIONS: ClassVar[tuple[type[Section], ...]]

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Self:
        return cls(*(section.from_env(environ) for section in cls.SECTIONS))
