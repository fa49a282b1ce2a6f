"""Structured logging: one JSON object per line on stderr, with no patient data.

Callers pass context with ``extra={...}``. Only keys on an allow-list of routing
fields are emitted; anything else is dropped, so a careless ``extra`` cannot leak a
patient name into a log shipper. Exception text from third-party parsers is not
logged by callers (it can quote dataset values); they log the exception type.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from radflow_core.settings import LogFormat, LogSettings

SAFE_FIELDS = frozenset(
    {
        "event",
        "service",
        "topic",
        "partition",
        "offset",
        "reason",
        "status",
        "http_status",
        "sop_instance_uid",
        "sop_class_uid",
        "study_instance_uid",
        "series_instance_uid",
        "transfer_syntax_uid",
        "modality",
        "calling_ae",
        "identity",
        "called_ae",
        "peer_address",
        "protocol",
        "sha256",
        "size",
        "key",
        "bucket",
        "duplicate",
        "duration_ms",
        "error_type",
        "port",
        "host",
        "url",
        "count",
        "attempt",
        "component",
        "state",
        "parts",
        "stored",
        "failed",
        "association_id",
        "max_associations",
        "client",
        "destination",
        "lane",
        "level",
        "rules",
        "rules_digest",
        "generation",
        "destinations",
        "problem",
        "problems",
        "instances",
        "pending",
        "site",
        "report_id",
        "report_version",
        "control_id",
        "ack_code",
        "sites",
        "worker",
        "pid",
        "exit_code",
        "restarts",
        "message_type",
        "order_control",
        "hl7_error",
        "hl7_location",
        "step_id",
        "outcome",
    }
)
"""Keys that may appear in a log line; patient demographics are never among them."""

_RESERVED = frozenset(vars(logging.makeLogRecord({})))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in vars(record).items():
            if name in SAFE_FIELDS and name not in _RESERVED:
                line[name] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info and record.exc_info[0] is not None:
            line["error_type"] = record.exc_info[0].__name__
            # Frames only: the exception's message may quote dataset values.
            line["stack"] = [
                f"{frame.filename}:{frame.lineno}:{frame.name}"
                for frame in traceback.extract_tb(record.exc_info[2])
            ]
        return json.dumps(line, separators=(",", ":"))


class _Stamp(logging.Filter):
    def __init__(self, fields: Mapping[str, str | int]) -> None:
        super().__init__()
        self._fields = dict(fields)

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in self._fields.items():
            setattr(record, name, value)
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{k}={v}" for k, v in vars(record).items() if k in SAFE_FIELDS and k not in _RESERVED
        )
        return f"{record.levelname:<7} {record.name}: {record.getMessage()} {fields}".rstrip()


def configure_logging(
    settings: LogSettings, service: str, fields: Mapping[str, str | int] | None = None
) -> None:
    """Route all logging to stderr in the configured format (called once, in main).

    ``fields`` (safe fields only) go on every line: ingest's workers log their index,
    so that the lines of several processes sharing one stderr can be told apart."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(service) if settings.format is LogFormat.JSON else TextFormatter()
    )
    if fields:
        handler.addFilter(_Stamp(fields))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # Library loggers that would print dataset contents or every PDU at INFO.
    for noisy in ("pynetdicom", "pydicom", "aiokafka", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
