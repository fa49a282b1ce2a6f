"""Write the JSON Schema of every published event into a folder (docs/events/).

Usage: ``python -m radflow_core.schema docs/events``. A test fails when the committed
files differ from what the models generate, so the published contract cannot drift.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from radflow_core.events import (
    AuditRecorded,
    DeadLetter,
    Envelope,
    EventModel,
    ForwardCompleted,
    ForwardFailed,
    ForwardRequested,
    ForwardVerified,
    InstanceHeld,
    InstanceNormalized,
    InstancePreview,
    InstanceReceived,
    ReportFailed,
    ReportFinalized,
    ReportReturned,
    StudyDelivered,
    WorklistItem,
    schema_name,
)
from radflow_core.order_document import OrderDocument
from radflow_core.report_document import ReportDocument

PUBLISHED: tuple[type[EventModel], ...] = (
    InstanceReceived,
    InstanceNormalized,
    InstancePreview,
    ForwardRequested,
    ForwardCompleted,
    ForwardVerified,
    ForwardFailed,
    ForwardVerified,
    StudyDelivered,
    InstanceHeld,
    DeadLetter,
    ReportFinalized,
    ReportReturned,
    ReportFailed,
    WorklistItem,
    AuditRecorded,
)

DOCUMENTS: tuple[type[EventModel], ...] = (ReportDocument, OrderDocument)
"""Documents kept in the blob store that events point at (they hold PHI, so they are
never event payloads); their schema is published beside the events'."""


def event_schema(model: type[EventModel]) -> dict[str, Any]:
    """The JSON Schema of an envelope carrying ``model``, with type and dataschema fixed."""
    schema = Envelope[model].model_json_schema()  # type: ignore[valid-type]
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = schema_name(model)
    schema["title"] = f"{model.type_name} v{model.version}"
    schema["description"] = (model.__doc__ or "").strip()
    props = schema["properties"]
    props["type"] = {"const": model.type_name, "type": "string", "description": "Event type."}
    props["dataschema"] = {"const": schema_name(model), "type": "string"}
    return schema


def document_schema(model: type[EventModel]) -> dict[str, Any]:
    """The JSON Schema of a blob-store document (no envelope)."""
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = schema_name(model)
    schema["title"] = f"{model.type_name} v{model.version}"
    return schema


def render(model: type[EventModel]) -> str:
    schema = document_schema(model) if model in DOCUMENTS else event_schema(model)
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def file_name(model: type[EventModel]) -> str:
    return f"{model.type_name}.v{model.version}.schema.json"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m radflow_core.schema OUTPUT_DIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for model in (*PUBLISHED, *DOCUMENTS):
        (out / file_name(model)).write_text(render(model), encoding="utf-8")
        print(out / file_name(model))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
