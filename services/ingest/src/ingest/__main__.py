"""Entry point: ``python -m ingest`` (settings from RADFLOW_* variables; see --help)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import warnings

from ingest.service import IngestService
from ingest.settings import IngestConfig
from radflow_core.errors import ConfigurationError
from radflow_core.logs import configure_logging

log = logging.getLogger("ingest")


def _help_epilog() -> str:
    lines = ["environment variables (default in brackets):"]
    for section in IngestConfig.SECTIONS:
        for name, default, doc in section.describe():
            lines.append(f"  {name} [{default}]")
            lines.append(f"      {' '.join(doc.split())}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ingest",
        description=(
            "radflow ingest: a DICOM C-STORE/C-ECHO SCP and STOW-RS receiver. Each instance "
            "is acknowledged only once its bytes are in S3 and its dicom.instance.received "
            "event is acknowledged by Kafka."
        ),
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the environment's settings and exit (0 if valid)",
    )
    return parser.parse_args(argv)


async def serve(config: IngestConfig) -> int:
    """Run until SIGTERM/SIGINT (exit 0) or until the service cannot run (exit 3)."""
    service = IngestService(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    try:
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(service.failed.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        log.info("shutdown requested" if stop.is_set() else "shutting down: cannot run")
    finally:
        await service.stop()
    return 3 if service.failed.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = IngestConfig.from_env(os.environ)
    except ConfigurationError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        print("ingest: settings are valid")
        return 0
    configure_logging(config.log, "ingest")
    # pydicom warns (to stderr, unstructured) about recoverable oddities in senders' data.
    warnings.filterwarnings("ignore", module="pydicom")
    return asyncio.run(serve(config))


if __name__ == "__main__":
    raise SystemExit(main())
