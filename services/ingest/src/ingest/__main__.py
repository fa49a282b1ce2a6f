"""Entry point: ``python -m ingest`` (settings from RADFLOW_* variables; see --help).

With RADFLOW_INGEST_WORKERS > 1 this process is the workers' parent (ingest.workers),
and starts itself again once per worker with ``--worker I --worker-dir D``.
"""

from __future__ import annotations

import sys

from ingest.settings import IngestConfig
from ingest.workers import WorkerPool, split_worker_arguments
from radflow_core.runtime import Service, run_main


def main(argv: list[str] | None = None) -> int:
    role, rest = split_worker_arguments(list(sys.argv[1:] if argv is None else argv))

    def build(config: IngestConfig) -> Service:
        # Imported here: the workers' parent runs no receiver and needs none of it.
        from ingest.service import IngestService

        if role is None and config.ingest.workers > 1:
            return WorkerPool(config)
        return IngestService(config, role)

    return run_main(
        name="ingest",
        description=(
            "radflow ingest: a DICOM C-STORE/C-ECHO SCP and STOW-RS receiver. Each instance "
            "is acknowledged only once its bytes are in S3 and its dicom.instance.received "
            "event is acknowledged by Kafka. With RADFLOW_INGEST_WORKERS > 1, that many "
            "processes share the public ports (SO_REUSEPORT) under one supervising parent, "
            "which serves the pod's /metrics, /healthz and /readyz."
        ),
        sections=IngestConfig.SECTIONS,
        load=IngestConfig.from_env,
        build=build,
        argv=rest,
        log_fields=None if role is None else {"worker": role.index},
        files=_read_files,
    )


def _read_files(config: IngestConfig) -> None:
    """The rule file, when set (--check-config)."""
    if config.ingest.rules_file is not None:
        from radflow_rules.loader import load_file

        load_file(config.ingest.rules_file)


if __name__ == "__main__":
    raise SystemExit(main())
