"""Entry point of ``radflow``: one sub-command module per operator question."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

COMMANDS = ("dlq", "trace", "ledger")
"""Modules of :mod:`radflow_core.cli`; each has ``register(subparsers)``, which adds its
parser and sets ``handler`` (args -> exit status) as its default."""


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="radflow",
        description="Operate a radflow pipeline: dead letters, traces, the delivery ledger. "
        "Reads the RADFLOW_* settings of the services (brokers, blob store).",
    )
    subparsers = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"radflow_core.cli.{name}").register(subparsers)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    status: int = args.handler(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
