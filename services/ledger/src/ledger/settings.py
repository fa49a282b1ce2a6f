"""Settings of the ledger (``RADFLOW_LEDGER_*`` plus the shared sections)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from pydantic import Field, field_validator

from radflow_core.settings import (
    AuditSettings,
    KafkaSettings,
    LogSettings,
    OpsSettings,
    Section,
    ServiceConfig,
    csv_tuple,
)


class LedgerSettings(Section):
    prefix = "LEDGER_"

    http_host: str = "127.0.0.1"
    """Address of the operations endpoint (/metrics, /healthz, /readyz, /ledger/...)."""
    http_port: int = Field(default=8087, ge=0, le=65535)
    """Port of the operations endpoint; the ``radflow ledger`` commands ask it."""
    group_id: str = "radflow-ledger"
    """Kafka consumer group reading every forward topic."""
    overdue_after_s: float = Field(default=900.0, gt=0)
    """Seconds after ``routed_at`` an instance that has not reached its destination (and
    has not failed) counts as overdue (``radflow_ledger_overdue_instances``)."""
    quiet_s: float = Field(default=60.0, ge=0)
    """Seconds without any change to a study whose routed instances have all reached
    their destinations before ``dicom.study.delivered`` is published: instances still
    on their way through the router are given time to show up."""
    verify_destinations: tuple[str, ...] = ()
    """Comma-separated destinations whose instances reach them only once
    ``dicom.forward.verified`` says so, besides those the forwarder verifies (its
    completions say so: ``verification``, from the rule file's ``verify:``). Only for a
    check made outside radflow that publishes ``dicom.forward.verified``."""
    tick_interval_s: float = Field(default=1.0, gt=0, le=60)
    """How often studies are checked for being delivered, for being old enough to
    forget, and the overdue gauge is refreshed."""
    forget_after_s: float = Field(default=2 * 24 * 3600.0, gt=0)
    """Seconds after a study's last change that it is forgotten (tombstones in the
    changelog), whatever its state; default 2 days. Memory grows with it: about 1.5 KB
    per request kept (docs/operations.md, The delivery ledger)."""

    _csv = field_validator("verify_destinations", mode="before")(csv_tuple)


@dataclass(frozen=True)
class LedgerConfig(ServiceConfig):
    ledger: LedgerSettings
    kafka: KafkaSettings
    log: LogSettings
    ops: OpsSettings
    audit: AuditSettings

    SECTIONS: ClassVar[tuple[type[Section], ...]] = (
        LedgerSettings,
        KafkaSettings,
        LogSettings,
        OpsSettings,
        AuditSettings,
    )
