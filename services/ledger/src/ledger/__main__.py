"""``python -m ledger`` runs the reconciliation ledger."""

from __future__ import annotations

import sys

from ledger.service import LedgerService
from ledger.settings import LedgerConfig
from radflow_core.runtime import run_main


def main(argv: list[str] | None = None) -> int:
    return run_main(
        name="ledger",
        description=(
            "radflow ledger: reads every dicom.forward.* topic and keeps, per study and "
            "destination, what was routed, delivered, verified, failed and pending (state "
            "in the compacted topic radflow.ledger). Serves GET /ledger/studies/{uid} and "
            "GET /ledger/overdue on its ops port (the 'radflow ledger' commands ask it), "
            "sets radflow_ledger_overdue_instances, and publishes dicom.study.delivered "
            "when every routed instance of a study has reached its destinations."
        ),
        sections=LedgerConfig.SECTIONS,
        load=LedgerConfig.from_env,
        build=LedgerService,
        argv=sys.argv[1:] if argv is None else argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
