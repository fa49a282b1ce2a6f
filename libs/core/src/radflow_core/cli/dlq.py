"""``radflow dlq``: (being built, issue 19)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    command = subparsers.add_parser("dlq", help="(being built)")
    command.set_defaults(handler=_not_built)


def _not_built(args: argparse.Namespace) -> int:
    raise SystemExit("radflow dlq: not built yet")
