"""Logs are one JSON object per line, with only allow-listed context keys."""

from __future__ import annotations

import json
import logging

from radflow_core.logs import JsonFormatter


def test_json_lines_keep_routing_fields_and_drop_anything_else() -> None:
    record = logging.makeLogRecord(
        {
            "msg": "instance stored",
            "levelname": "INFO",
            "name": "ingest",
            "sop_instance_uid": "1.2.3",
            "patient_name": "DOE^JOHN",
            "calling_ae": "CT1",
        }
    )
    line = json.loads(JsonFormatter("ingest").format(record))
    assert line["message"] == "instance stored"
    assert line["sop_instance_uid"] == "1.2.3" and line["calling_ae"] == "CT1"
    assert "patient_name" not in line
    assert "DOE" not in json.dumps(line)


def test_exceptions_are_logged_by_type_and_frames_not_message() -> None:
    try:
        raise ValueError("Invalid value DOE^JOHN for PN")
    except ValueError:
        record = logging.makeLogRecord({"msg": "failed", "levelname": "ERROR", "name": "x"})
        import sys

        record.exc_info = sys.exc_info()
    line = JsonFormatter("ingest").format(record)
    assert "DOE" not in line
    parsed = json.loads(line)
    assert parsed["error_type"] == "ValueError"
    assert parsed["stack"] and "test_logs.py" in parsed["stack"][0]
