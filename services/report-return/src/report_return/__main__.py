"""``python -m report_return`` runs the service; ``python -m report_return check SITES``
validates a sites file, and ``python -m report_return preview SITES SITE FILE`` prints
the ORU^R01 (``--fhir``: the FHIR DiagnosticReport) a report document (JSON) or a
Structured Report (DICOM) would become for that site, without sending it.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from radflow_core.errors import PipelineError
from radflow_core.events import ReportStatus
from radflow_core.runtime import run_main
from radflow_rules.loader import load_file
from report_return.fhir_report import build_diagnostic_report
from report_return.hl7 import build_oru, control_id
from report_return.report import document_from
from report_return.service import ReportReturnService
from report_return.settings import ReportReturnConfig
from report_return.sites import SitesFileError, load_sites
from report_return.sr import document_from_sr

TOOLS = ("check", "preview")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in TOOLS:
        return tools(args)
    return run_main(
        name="report_return",
        description=(
            "radflow report-return: reads reports.finalized (and, with a rule file, the "
            "Structured Reports the router sends to destinations of kind report-return), "
            "builds an HL7 ORU^R01 per report as each site's settings say, sends it over "
            "MLLP and waits for the ACK; AA → report.returned, AE (after its retries), AR, "
            "an unreadable answer or retries run out → report.failed. Tools: 'python -m "
            "report_return check SITES', 'python -m report_return preview SITES SITE FILE'."
        ),
        sections=ReportReturnConfig.SECTIONS,
        load=ReportReturnConfig.from_env,
        build=ReportReturnService,
        argv=args,
        files=_read_files,
    )


def _read_files(config: ReportReturnConfig) -> None:
    """The sites file, and the rule file when set (--check-config)."""
    load_sites(config.report_return.sites_file)
    if config.report_return.rules_file is not None:
        load_file(config.report_return.rules_file)


def tools(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m report_return", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a sites file (exit 0 if usable)")
    check.add_argument("sites", type=Path)
    preview = commands.add_parser("preview", help="print the ORU^R01 a report would become")
    preview.add_argument("sites", type=Path)
    preview.add_argument("site", help="the site's name in the sites file")
    preview.add_argument("report", type=Path, help="a report document (.json) or an SR")
    preview.add_argument(
        "--status", choices=[s.value for s in ReportStatus], default=ReportStatus.FINAL.value
    )
    preview.add_argument(
        "--fhir",
        action="store_true",
        help="print the FHIR DiagnosticReport (validated) instead of the ORU^R01",
    )
    args = parser.parse_args(argv)
    try:
        sites = load_sites(args.sites)
    except SitesFileError as exc:
        print(exc, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); the sites file cannot be used", file=sys.stderr)
        return 1
    if args.command == "check":
        for site in sites.values():
            hl7 = f" HL7 {site.hl7_version} {site.encoding} {site.text.value}"
            print(f"{site.name}: {site}{hl7 if site.output.oru else ''}")
        print(f"{args.sites}: {len(sites)} site(s): OK")
        return 0
    if args.site not in sites:
        print(f"no site {args.site!r} in {args.sites} (known: {', '.join(sorted(sites))})")
        return 1
    data = args.report.read_bytes()
    try:
        if args.report.suffix.lower() == ".json":
            document = document_from(json.loads(data))
        else:
            document = document_from_sr(data)
        site = sites[args.site]
        if args.fhir:
            if site.fhir is None:
                print(f"site {args.site!r} has no fhir: block", file=sys.stderr)
                return 1
            built = build_diagnostic_report(
                document,
                ReportStatus(args.status),
                site,
                report_id=args.report.stem,
                report_version=1,
                structured=args.report.suffix.lower() != ".json",
            )
            print(json.dumps(json.loads(built.body), indent=2))
            return 0
        oru = build_oru(
            document,
            ReportStatus(args.status),
            site,
            control_id(args.site, f"preview\n{args.report.name}"),
            datetime.now(UTC),
        )
    except (PipelineError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, PipelineError) else "invalid_report"
        print(f"{args.report}: {reason}: {exc}", file=sys.stderr)
        return 1
    print(oru.er7.replace("\r", "\n"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
