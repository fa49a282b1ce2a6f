"""Entry point: ``python -m transcode`` (settings from RADFLOW_* variables; see --help)."""

from __future__ import annotations

from radflow_core.runtime import run_main
from radflow_rules.loader import load_file
from transcode.service import TranscodeService
from transcode.settings import TranscodeConfig


def main(argv: list[str] | None = None) -> int:
    return run_main(
        name="transcode",
        description=(
            "radflow transcode: reads dicom.instance.received, stores a canonical lossless "
            "variant whose pixels are proven identical to the original's, and emits "
            "dicom.instance.normalized; what cannot be decoded goes to dicom.instance.failed "
            "with its reason. With RADFLOW_TRANSCODE_RULES_FILE, the images a rule's "
            "'preview:' picks also get a lossy preview instance (dicom.instance.preview)."
        ),
        sections=TranscodeConfig.SECTIONS,
        load=TranscodeConfig.from_env,
        build=TranscodeService,
        argv=argv,
        files=_read_files,
    )


def _read_files(config: TranscodeConfig) -> None:
    """The rule file, when set (--check-config): its preview options."""
    if config.transcode.rules_file is not None:
        load_file(config.transcode.rules_file)


if __name__ == "__main__":
    raise SystemExit(main())
