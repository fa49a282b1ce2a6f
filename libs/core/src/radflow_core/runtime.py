"""What every service's ``__main__`` shares: ``--help`` generated from the settings,
``--check-config``, logging set-up, and running until SIGTERM with a clean stop.

A service provides an object with ``async start()``, ``async stop()`` (safe twice) and
a ``failed`` event it sets when it cannot run as configured (exit code 3).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from radflow_core.errors import BrokerUnavailable, ConfigurationError
from radflow_core.kafka import EventProducer
from radflow_core.logs import configure_logging
from radflow_core.settings import LogSettings, Section

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_CANNOT_RUN = 3


class Service(Protocol):
    failed: asyncio.Event

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class Config(Protocol):
    log: LogSettings


def _epilog(sections: Sequence[type[Section]]) -> str:
    lines = ["environment variables (default in brackets):"]
    for section in sections:
        for name, default, doc in section.describe():
            lines.append(f"  {name} [{default}]")
            lines.append(f"      {' '.join(doc.split())}")
    return "\n".join(lines)


async def serve(build: Callable[[], Service]) -> int:
    """Build the service inside the event loop (its clients bind to it), then run it
    until SIGTERM/SIGINT (exit 0) or until it fails (exit 3)."""
    service = build()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await service.start()
    except OSError as exc:  # a port taken, an address not on this host
        log.critical("cannot start", extra={"reason": f"{type(exc).__name__}: {exc}"})
        await service.stop()
        return EXIT_CANNOT_RUN
    try:
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(service.failed.wait())]
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            waiter.cancel()
        log.info("shutdown requested" if stop.is_set() else "shutting down: cannot run")
    finally:
        await service.stop()
    return EXIT_CANNOT_RUN if service.failed.is_set() else 0


def run_main(
    *,
    name: str,
    description: str,
    sections: Sequence[type[Section]],
    load: Callable[[Mapping[str, str]], Any],
    build: Callable[[Any], Service],
    argv: Sequence[str] | None = None,
    log_fields: Mapping[str, str | int] | None = None,
    files: Callable[[Any], object] | None = None,
) -> int:
    """Parse arguments, load settings from the environment, and serve (``log_fields``
    on every log line).

    ``files`` reads the files the settings name (a rule file, a sites file) with the
    loaders the service starts with, raising ConfigurationError if one is missing or
    unusable: ``--check-config`` runs it, so that a bad mount fails there (exit 2)
    instead of in the pod.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {name}",
        description=description,
        epilog=_epilog(sections),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the environment's settings, and the files they name, and exit (0 if valid)",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load(os.environ)
        if args.check_config and files is not None:
            files(config)
    except ConfigurationError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"{name}: settings are valid")
        return 0
    configure_logging(config.log, name, log_fields)
    # pydicom warns (unstructured, to stderr) about recoverable oddities in senders' data.
    warnings.filterwarnings("ignore", module="pydicom")
    return asyncio.run(serve(lambda: build(config)))


async def connect_producer(producer: EventProducer, failed: asyncio.Event) -> bool:
    """Start ``producer``, retrying with backoff while the broker is unreachable.

    Returns True once connected; on a configuration problem logs it, sets ``failed``
    and returns False (retrying would not help).
    """
    delay = 0.5
    while True:
        try:
            await producer.start()
        except ConfigurationError as exc:
            log.critical(str(exc), extra={"reason": exc.reason})
            failed.set()
            return False
        except BrokerUnavailable as exc:
            log.warning("waiting for the broker", extra={"reason": exc.reason})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
            continue
        log.info("connected to the broker")
        return True
