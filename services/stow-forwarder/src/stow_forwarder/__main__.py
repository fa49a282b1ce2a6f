"""Entry point: ``python -m stow_forwarder`` (settings from RADFLOW_* variables; see --help)."""

from __future__ import annotations

from radflow_core.runtime import run_main
from radflow_rules.loader import load_file
from stow_forwarder.service import ForwarderService, pseudonyms_for
from stow_forwarder.settings import ForwarderConfig


def main(argv: list[str] | None = None) -> int:
    return run_main(
        name="stow_forwarder",
        description=(
            "radflow stow-forwarder: reads dicom.forward.requested.stat ahead of "
            "dicom.forward.requested, sends each instance by STOW-RS to its destination "
            "(from the rule file's destinations), batched per study, verified, converted "
            "when the destination needs another syntax; retries outages within a budget "
            "behind a circuit breaker; emits dicom.forward.completed, or "
            "dicom.forward.failed with the destination's answer."
        ),
        sections=ForwarderConfig.SECTIONS,
        load=ForwarderConfig.from_env,
        build=ForwarderService,
        argv=argv,
        files=lambda config: pseudonyms_for(load_file(config.forwarder.rules_file), config.deid),
    )


if __name__ == "__main__":
    raise SystemExit(main())
