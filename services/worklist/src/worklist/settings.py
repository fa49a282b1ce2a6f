"""Settings of the worklist (``RADFLOW_WORKLIST_*`` plus the shared sections)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

from pydantic import Field, model_validator

from radflow_core.orders import OrderSettings
from radflow_core.settings import (
    AuditSettings,
    KafkaSettings,
    LogSettings,
    OpsSettings,
    S3Settings,
    Section,
    ServiceConfig,
)


class WorklistSettings(Section):
    prefix = "WORKLIST_"

    sites_file: Path = Path("sites.yaml")
    """The sites file: which MSH-4/MSH-3 is which site, its modalities' calling AE
    titles, which sites they see, character sets. Read at start (restart after changing
    it); an invalid file stops the service (exit 3)."""
    http_host: str = "127.0.0.1"
    """Address of the operations endpoint (/metrics, /healthz, /readyz)."""
    http_port: int = Field(default=8088, ge=0, le=65535)
    """Port of the operations endpoint."""
    mllp_host: str = "127.0.0.1"
    """Address of the HL7 order listener (MLLP)."""
    mllp_port: int = Field(default=2576, ge=0, le=65535)
    """Port of the HL7 order listener."""
    mllp_tls_cert_file: Path | None = None
    """PEM certificate of the order listener; with its key set, the listener speaks
    MLLP over TLS only. Unset: plain MLLP."""
    mllp_tls_key_file: Path | None = None
    """Its private key (PEM)."""
    mllp_tls_client_ca_file: Path | None = None
    """With TLS: RIS interface engines must present a certificate signed by this CA."""
    mllp_idle_timeout_s: float = Field(default=300.0, gt=0)
    """An MLLP connection that sends nothing for this long is closed."""
    max_message_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest HL7 message read; a larger one is refused (AR) and its connection closed."""
    dimse_host: str = "127.0.0.1"
    """Address of the Modality Worklist SCP."""
    dimse_port: int = Field(default=11113, ge=0, le=65535)
    """Port of the Modality Worklist SCP."""
    ae_title: str = Field(default="RADFLOW_MWL", min_length=1, max_length=16)
    """The SCP's AE title (called AE title modalities must use)."""
    max_associations: int = Field(default=20, ge=1)
    """Concurrent worklist associations at most; more are rejected (transient)."""
    network_timeout_s: float = Field(default=60.0, gt=0)
    """Idle seconds before an association is closed."""
    restore_idle_ms: int = Field(default=500, ge=50)
    """When rebuilding the view from worklist.items at start, how long a fetch must
    bring nothing past the end offsets to mean the end (radflow_core.compacted)."""

    @model_validator(mode="after")
    def _key_with_cert(self) -> Self:
        if (self.mllp_tls_cert_file is None) != (self.mllp_tls_key_file is None):
            raise ValueError(
                f"set {self.env_name('mllp_tls_cert_file')} and "
                f"{self.env_name('mllp_tls_key_file')} together"
            )
        return self


@dataclass(frozen=True)
class WorklistConfig(ServiceConfig):
    worklist: WorklistSettings
    order: OrderSettings
    kafka: KafkaSettings
    s3: S3Settings
    log: LogSettings
    ops: OpsSettings
    audit: AuditSettings

    SECTIONS: ClassVar[tuple[type[Section], ...]] = (
        WorklistSettings,
        OrderSettings,
        KafkaSettings,
        S3Settings,
        LogSettings,
        OpsSettings,
        AuditSettings,
    )
