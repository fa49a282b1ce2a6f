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
