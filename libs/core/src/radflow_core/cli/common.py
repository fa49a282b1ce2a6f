"""What the operator commands share: how a time is written on their command lines."""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime, timedelta

AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def when(text: str) -> datetime:
    """An ISO 8601 time (UTC when it has no offset), or a duration ago (``90m``, ``2h``):
    the forms ``--since``/``--until``/``--from``/``--to`` take in every command."""
    ago = AGO.match(text)
    if ago:
        return datetime.now(UTC) - timedelta(**{UNITS[ago[2]]: float(ago[1])})
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected an ISO 8601 time or a duration like 30m, 2h, 3d"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def output_arguments(parser: argparse.ArgumentParser, json_help: str, idle_s: float) -> None:
    """``--json`` and ``--idle-s``, which every command that reads the topics takes.

    ``--idle-s`` is how reading ends (see :mod:`radflow_core.history`): a broker that has
    had nothing more for that long has given everything it retains.
    """
    parser.add_argument("--json", action="store_true", help=json_help)
    parser.add_argument(
        "--idle-s",
        type=float,
        default=idle_s,
        help="stop reading when the broker has had nothing more for this long "
        f"(seconds, default {idle_s})",
    )
