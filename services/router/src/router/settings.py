"""Settings of the router (``RADFLOW_ROUTER_*`` plus the shared sections)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from radflow_core.order_table import OrderLookupSettings
from radflow_core.settings import (
    AuditSettings,
    KafkaSettings,
    LogSettings,
    OpsSettings,
    S3Settings,
    Section,
    ServiceConfig,
)


class RouterSettings(Section):
    prefix = "ROUTER_"

    rules_file: Path = Path("rules.yaml")
    """The rule file (YAML; see services/router/examples/rules.yaml). Validated at start
    (the router does not start on an invalid file) and watched for changes."""
    reload_interval_s: float = Field(default=2.0, gt=0, le=3600)
    """How often the rule file is checked for changes. A valid change takes effect at
    once; an invalid one is rejected and the last valid rules stay live."""
    release_interval_s: float = Field(default=0.5, gt=0, le=60)
    """How often studies waiting to be complete are checked for their quiet period."""
    header_limit_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024)
    """Most bytes read from the start of a blob to find the attributes rules need."""
    http_host: str = "127.0.0.1"
    """Address of the operations endpoint (/metrics, /healthz, /readyz)."""
    http_port: int = Field(default=8082, ge=0, le=65535)
    """Port of the operations endpoint."""
    group_id: str = "radflow-router"
    """Kafka consumer group of the routine lane; the STAT lane's is '<group_id>.stat',
    the lossy previews' '<group_id>.preview'."""


@dataclass(frozen=True)
class RouterConfig(ServiceConfig):
    router: RouterSettings
    kafka: KafkaSettings
    s3: S3Settings
    log: LogSettings
    ops: OpsSettings
    audit: AuditSettings
    order_lookup: OrderLookupSettings

    SECTIONS: ClassVar[tuple[type[Section], ...]] = (
        RouterSettings,
        KafkaSettings,
        S3Settings,
        LogSettings,
        OpsSettings,
        AuditSettings,
        OrderLookupSettings,
    )
