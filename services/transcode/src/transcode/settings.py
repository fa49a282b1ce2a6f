"""Settings of the transcode service (``RADFLOW_TRANSCODE_*`` plus the shared sections)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from radflow_codecs.codecs import Target
from radflow_core.settings import (
    AuditSettings,
    KafkaSettings,
    LogSettings,
    OpsSettings,
    S3Settings,
    Section,
    ServiceConfig,
)


class TranscodeSettings(Section):
    prefix = "TRANSCODE_"

    target: Target = Target.JPEG_LS_LOSSLESS
    """Canonical transfer syntax UID (all lossless): 1.2.840.10008.1.2.1 Explicit VR
    Little Endian, 1.2.840.10008.1.2.5 RLE, 1.2.840.10008.1.2.4.90 JPEG 2000 Lossless,
    1.2.840.10008.1.2.4.80 JPEG-LS Lossless. The default is chosen from bench/ numbers."""
    workers: int = Field(default=1, ge=1, le=64)
    """Codec worker processes; CPU-bound work never runs on the consumer's event loop."""
    concurrency: int = Field(default=8, ge=1, le=256)
    """Instances in flight at once in each lane (default 8): while some wait on S3 or
    the broker, another is in the codec workers. Each holds a spool directory under
    TMPDIR."""
    max_inflight_bytes: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    """Bytes of originals in flight at once in each lane (default 256 MiB). Bounds
    spool space (about twice this per lane) and upload buffers; an instance larger
    than this is handled alone in its lane."""
    http_host: str = "127.0.0.1"
    """Address of the operations endpoint (/metrics, /healthz, /readyz)."""
    http_port: int = Field(default=8081, ge=0, le=65535)
    """Port of the operations endpoint."""
    group_id: str = "radflow-transcode"
    """Kafka consumer group of the routine lane; the STAT lane's is '<group_id>.stat'."""
    rules_file: Path | None = None
    """The router's rule file: an instance that a rule with 'preview:' routes, and that
    the rule's selection picks, gets a lossy preview instance (dicom.instance.preview).
    Unset: no previews. Invalid: logged, no previews until a valid file is seen (the
    lossless path never waits for it)."""
    reload_interval_s: float = Field(default=2.0, gt=0, le=3600)
    """How often the rule file is checked for changes (by content)."""
    preview_quality: int = Field(default=85, ge=10, le=95)
    """JPEG quality of previews (10-95, Pillow's scale; default 85: about 10:1 on CT)."""


@dataclass(frozen=True)
class TranscodeConfig(ServiceConfig):
    transcode: TranscodeSettings
    kafka: KafkaSettings
    s3: S3Settings
    log: LogSettings
    ops: OpsSettings
    audit: AuditSettings

    SECTIONS: ClassVar[tuple[type[Section], ...]] = (
        TranscodeSettings,
        KafkaSettings,
        S3Settings,
        LogSettings,
        OpsSettings,
        AuditSettings,
    )
