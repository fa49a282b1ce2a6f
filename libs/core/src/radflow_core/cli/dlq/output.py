"""How ``radflow dlq`` prints: an aligned table for people, JSON lines for scripts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO

from radflow_core.cli.dlq.letters import Letter
from radflow_core.cli.dlq.replay import Action

MESSAGE_WIDTH = 60


def table(rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        out.write("\n")


def letters_table(letters: Sequence[Letter], out: TextIO) -> None:
    header = ("ID", "APPENDED (UTC)", "REASON", "DESTINATION", "STUDY", "INSTANCE", "MESSAGE")
    rows = [header] + [
        (
            x.id,
            x.appended_at.strftime("%Y-%m-%d %H:%M:%S"),
            x.reason,
            x.destination or "-",
            x.study or "-",
            x.instance or "-",
            _short(x.message),
        )
        for x in letters
    ]
    table(rows, out)
    out.write(f"{len(letters)} dead letter{'s' if len(letters) != 1 else ''}\n")


def letter_detail(letter: Letter, out: TextIO) -> None:
    for name, value in letter.summary().items():
        if value is not None:
            out.write(f"{name + ':':17} {value}\n")
    if letter.original is not None:
        out.write("original record:\n")
        out.write(_pretty(letter.original.value))
    out.write("dead letter:\n")
    out.write(json.dumps(_without_original(letter.envelope), indent=2) + "\n")


def actions_table(actions: Sequence[Action], out: TextIO, dry_run: bool) -> None:
    verb = {"replay": "would replay" if dry_run else "replayed", "skip": "skipped"}
    header = ("OUTCOME", "ID", "DESTINATION", "INSTANCE", "WHY")
    rows = [header] + [
        (
            verb.get(a.outcome.value, "not replayable"),
            a.letter.id,
            a.letter.destination or "-",
            a.letter.instance or "-",
            a.why,
        )
        for a in actions
    ]
    table(rows, out)


def json_lines(items: Sequence[dict[str, Any]], out: TextIO) -> None:
    for item in items:
        out.write(json.dumps(item, sort_keys=True) + "\n")


def _without_original(envelope: dict[str, Any]) -> dict[str, Any]:
    """The dead letter as printed after its original: the original not twice."""
    data = envelope.get("data")
    if not isinstance(data, dict) or data.get("original_value") is None:
        return envelope
    return {**envelope, "data": {**data, "original_value": "(the original record, above)"}}


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MESSAGE_WIDTH else line[: MESSAGE_WIDTH - 1] + "…"


def _pretty(value: str) -> str:
    try:
        return json.dumps(json.loads(value), indent=2) + "\n"
    except ValueError:
        return value + "\n"
