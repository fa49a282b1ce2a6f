"""Settings of the stow-forwarder (``RADFLOW_FORWARDER_*`` plus the shared sections)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import Field, SecretStr

from radflow_core.errors import ConfigurationError
from radflow_core.settings import (
    AuditSettings,
    KafkaSettings,
    LogSettings,
    OpsSettings,
    S3Settings,
    Section,
    ServiceConfig,
)


class ForwarderSettings(Section):
    prefix = "FORWARDER_"

    rules_file: Path = Path("rules.yaml")
    """The rule file whose ``destinations`` are delivered to (the router's file).
    Secrets it references must be set at start; a destination added later whose
    secret is missing is skipped and logged, the others keep going."""
    reload_interval_s: float = Field(default=2.0, gt=0, le=3600)
    """How often the rule file is checked for changed destinations (by content)."""
    http_host: str = "127.0.0.1"
    """Address of the operations endpoint (/metrics, /healthz, /readyz)."""
    http_port: int = Field(default=8083, ge=0, le=65535)
    """Port of the operations endpoint."""
    group_prefix: str = "radflow-forwarder"
    """Consumer groups are <prefix>.<destination>.<lane>: each destination reads at its
    own pace, so one that is down holds back nothing of the others."""
    max_batch_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Most bytes of instances in one STOW-RS request (besides the destination's
    max_batch count)."""
    io_concurrency: int = Field(default=8, ge=1, le=64)
    """Bucket requests (delivery-marker checks and writes, downloads) and outcome events
    in flight at once for one batch. While a request is on the wire the next batch is
    staged and the previous one settled, each with up to this many."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """TCP/TLS connect timeout to a destination."""
    request_timeout_s: float = Field(default=120.0, gt=0)
    """Longest wait for a destination's answer to one request."""
    retry_initial_s: float = Field(default=1.0, gt=0)
    """First backoff after a retriable failure (doubles each time, with jitter)."""
    retry_max_s: float = Field(default=60.0, gt=0)
    """Longest backoff between attempts (a Retry-After header may ask for more)."""
    retry_budget_s: float = Field(default=6 * 3600.0, gt=0)
    """How long one instance is retried (timeouts, 5xx, 429, connection errors) before
    it goes to dicom.forward.failed with reason retries_exhausted."""
    breaker_failures: int = Field(default=5, ge=1)
    """Consecutive failed requests that open a destination's circuit."""
    breaker_cooldown_s: float = Field(default=15.0, gt=0)
    """How long an open circuit waits before one probe request."""
    verify_delay_s: float = Field(default=2.0, gt=0, le=600)
    """For destinations with ``verify: qido``: how long after the acknowledgement the
    first QIDO-RS search waits (a PACS indexes what it stored asynchronously)."""
    verify_window_s: float = Field(default=120.0, gt=0, le=6 * 3600)
    """How long after the acknowledgement an instance QIDO-RS does not list yet is
    searched for again (each wait twice the last) before it is reported on
    dicom.forward.failed with not_held_after_delivery. Holds its fetch's commit."""
    commitment_host: str = "127.0.0.1"
    """Address the storage commitment listener binds (0.0.0.0 in a pod)."""
    commitment_port: int = Field(default=0, ge=0, le=65535)
    """Port where destinations with ``verify: storage-commitment`` open associations to
    send their N-EVENT-REPORT (the address they know our calling AE title at). 0: no
    listener; only reports sent on the N-ACTION's own association are received."""
    commitment_ae_title: str = Field(default="RADFLOW", min_length=1, max_length=16)
    """The AE title the storage commitment listener answers as."""
    commitment_same_association_s: float = Field(default=2.0, ge=0, le=600)
    """How long the N-ACTION's association stays open for a destination that sends its
    report on it, before it is released (the report may still come on a new one)."""
    commitment_timeout_s: float = Field(default=300.0, gt=0, le=6 * 3600)
    """Longest wait for a storage commitment report after the N-ACTION; then the
    instances go to dicom.forward.failed with verification_unanswered."""
    unknown_destination_grace_s: float = Field(default=120.0, ge=0, le=3600)
    """Age a forward request for a destination the rule file does not define must reach
    (from its ``routed_at``) before it is reported on dicom.instance.held: time for a
    rule-file change the router has already read to reach the forwarder too (a
    ConfigMap update reaches pods up to a minute or two apart)."""


class DeidSettings(Section):
    """The key of de-identification's pseudonyms (``RADFLOW_DEID_*``)."""

    prefix = "DEID_"

    key: SecretStr = SecretStr("")
    """Key of the keyed hashes (HMAC-SHA256) that make patient pseudonyms, remapped UIDs
    and date offsets for routes with ``deidentify:``. The same on every forwarder and
    kept for as long as pseudonyms must stay consistent (a Kubernetes Secret); changing
    it gives every patient and UID a new pseudonym. Empty (the default) with no key
    file: the forwarder does not start if the rule file defines de-identification
    profiles, and a request that asks for one anyway is dead-lettered, never sent
    identified."""
    key_file: Path | None = None
    """A file holding the key instead (a mounted secret; surrounding whitespace
    ignored). Takes precedence over RADFLOW_DEID_KEY."""

    def resolve(self) -> bytes | None:
        """The key's bytes, or None when none is configured.

        Raises:
            ConfigurationError: the key file cannot be read or is empty.
        """
        if self.key_file is not None:
            try:
                text = self.key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigurationError(
                    f"{self.env_name('key_file')}: {self.key_file} cannot be read "
                    f"({type(exc).__name__})"
                ) from None
            if not text:
                raise ConfigurationError(f"{self.env_name('key_file')}: {self.key_file} is empty")
            return text.encode()
        value = self.key.get_secret_value()
        return value.encode() if value else None


@dataclass(frozen=True)
class ForwarderConfig(ServiceConfig):
    forwarder: ForwarderSettings
    kafka: KafkaSettings
    s3: S3Settings
    log: LogSettings
    ops: OpsSettings
    audit: AuditSettings
    deid: DeidSettings

    SECTIONS: ClassVar[tuple[type[Section], ...]] = (
        ForwarderSettings,
        KafkaSettings,
        S3Settings,
        LogSettings,
        OpsSettings,
        AuditSettings,
        DeidSettings,
    )
