"""Settings of report-return (``RADFLOW_REPORT_RETURN_*`` plus the shared sections)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import Field

from radflow_core.settings import (
    AuditSettings,
    KafkaSettings,
    LogSettings,
    OpsSettings,
    S3Settings,
    Section,
    ServiceConfig,
)


class ReportReturnSettings(Section):
    prefix = "REPORT_RETURN_"

    sites_file: Path = Path("sites.yaml")
    """The sites file: each RIS's MLLP peer, HL7 settings and identifier mapping. Read
    at start (restart after changing it); an invalid file stops the service (exit 3)."""
    rules_file: Path | None = None
    """The router's rule file, for Structured Reports routed to destinations of kind
    report-return; unset: only reports.finalized is read. Watched like the router
    watches it: a site newly routed to starts reading Structured Reports, one no longer
    routed to stops; an invalid change is rejected and the rules in force stay."""
    reload_interval_s: float = Field(default=2.0, gt=0)
    """Seconds between checks of the rule file for changes (by content)."""
    http_host: str = "127.0.0.1"
    """Address of the operations endpoint (/metrics, /healthz, /readyz)."""
    http_port: int = Field(default=8084, ge=0, le=65535)
    """Port of the operations endpoint."""
    group_prefix: str = "radflow-report-return"
    """Consumer groups are <prefix>.<site>.<input> (reports, stat, routine): a RIS that is
    down holds back only its own reports; <prefix>.unknown-sites dead-letters reports for
    sites not in the sites file."""
    retry_initial_s: float = Field(default=1.0, gt=0)
    """First backoff after a timeout, a connection failure or an AE (doubles each time,
    with jitter)."""
    retry_max_s: float = Field(default=60.0, gt=0)
    """Longest backoff between attempts."""
    retry_budget_s: float = Field(default=6 * 3600.0, gt=0)
    """How long one report is retried while its RIS cannot be reached or does not
    answer, before it goes to report.failed with reason retries_exhausted."""
    max_report_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Largest report document or Structured Report read from the blob store; larger
    ones go to report.failed (report_too_large)."""


@dataclass(frozen=True)
class ReportReturnConfig(ServiceConfig):
    report_return: ReportReturnSettings
    kafka: KafkaSettings
    s3: S3Settings
    log: LogSettings
    ops: OpsSettings
    audit: AuditSettings

    SECTIONS: ClassVar[tuple[type[Section], ...]] = (
        ReportReturnSettings,
        KafkaSettings,
        S3Settings,
        LogSettings,
        OpsSettings,
        AuditSettings,
    )
