"""``python -m router`` runs the router service; ``python -m router check RULES`` and
``python -m router explain RULES FILE|DIR`` are the tools for an integration engineer
to validate a rule file and see, before deploying it, which rules match each instance
and where it would go.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path

from radflow_core.runtime import run_main
from radflow_rules.loader import RuleFileError, load_file
from radflow_rules.rules import evaluate
from router.explain import describe, instance_from_file
from router.service import RouterService
from router.settings import RouterConfig


def _files(target: Path) -> list[Path]:
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.is_file())
    return [target]


TOOLS = ("check", "explain")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in TOOLS:
        return tools(args)
    return run_main(
        name="router",
        description=(
            "radflow router: reads dicom.instance.normalized, applies the rule file, and "
            "emits one dicom.forward.requested(.stat) event per instance and destination; "
            "studies can wait until complete (state kept in the broker). Tools: "
            "'python -m router check RULES' validates a rule file, 'python -m router "
            "explain RULES FILE|DIR [--at TIME]' shows which rules match and why."
        ),
        sections=RouterConfig.SECTIONS,
        load=RouterConfig.from_env,
        build=RouterService,
        argv=args,
    )


def tools(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m router", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a rule file (exit 0 if usable)")
    check.add_argument("rules", type=Path)
    explain = commands.add_parser("explain", help="show which rules match DICOM files")
    explain.add_argument("rules", type=Path)
    explain.add_argument("target", type=Path, help="a DICOM file or a folder of them")
    explain.add_argument(
        "--at",
        type=datetime.fromisoformat,
        default=None,
        help="evaluate as if at this time, e.g. 2026-11-23T19:30+01:00",
    )
    explain.add_argument("--calling-ae", default=None, help="the sender's AE title")
    explain.add_argument(
        "--sender-identity",
        default=None,
        help="who the STOW-RS sender authenticated as (apikey:NAME, cert:CN, jwt:ISSUER#SUB)",
    )
    explain.add_argument(
        "--priority",
        choices=("low", "medium", "high"),
        default="medium",
        help="DIMSE C-STORE priority of the send",
    )
    args = parser.parse_args(argv)
    try:
        rules = load_file(args.rules)
    except RuleFileError as exc:
        print(exc, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s); the rule file cannot be used", file=sys.stderr)
        return 1
    for warning in rules.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.command == "check":
        print(f"{args.rules}: {len(rules.rules)} rules, {len(rules.destinations)} destinations: OK")
        return 0
    at = args.at or datetime.now(UTC)
    if at.tzinfo is None:
        parser.error("--at needs a UTC offset, e.g. 2026-11-23T19:30+01:00")
    status = 0
    for path in _files(args.target):
        try:
            instance = instance_from_file(
                path, rules, args.calling_ae, args.priority, args.sender_identity
            )
        except Exception as exc:  # noqa: BLE001 - report the file, go on with the others
            print(f"{path}\n  not a readable DICOM file ({type(exc).__name__})")
            status = 1
            continue
        print(describe(str(path), evaluate(rules, instance, at)))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
