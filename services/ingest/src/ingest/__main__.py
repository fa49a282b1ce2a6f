"""Entry point: ``python -m ingest`` (settings from RADFLOW_* variables; see --help)."""

from __future__ import annotations

from ingest.service import IngestService
from ingest.settings import IngestConfig
from radflow_core.runtime import run_main


def main(argv: list[str] | None = None) -> int:
    return run_main(
        name="ingest",
        description=(
            "radflow ingest: a DICOM C-STORE/C-ECHO SCP and STOW-RS receiver. Each instance "
            "is acknowledged only once its bytes are in S3 and its dicom.instance.received "
            "event is acknowledged by Kafka."
        ),
        sections=IngestConfig.SECTIONS,
        load=IngestConfig.from_env,
        build=IngestService,
        argv=argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
