"""``python -m router`` runs the router service; ``python -m router check RULES`` and
``python -m router explain RULES FILE|DIR`` are the tools for an integration engineer
to validate a rule file and see, before deploying it, which rules match each instance
and where it would go; ``python -m router replay --rules RULES --from T1 --to T2``
sets what a new rule file would have decided against what the router requested for
the instances of a past window (read from the topics; nothing is sent).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

from aiokafka.errors import KafkaError

from radflow_core.blobstore import BlobStore
from radflow_core.cli.common import output_arguments, when
from radflow_core.errors import PipelineError
from radflow_core.runtime import run_main
from radflow_core.settings import KafkaSettings, S3Settings
from radflow_rules.loader import RuleFileError, load_file
from radflow_rules.rules import RuleSet, evaluate
from router import replay
from router.explain import describe, instance_from_file
from router.service import RouterService
from router.settings import RouterConfig, RouterSettings
from router.whatif import render


def _files(target: Path) -> list[Path]:
    if target.is_dir():
        return sorted(p for p in target.rglob("*") if p.is_file())
    return [target]


TOOLS = ("check", "explain", "replay")


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
            "explain RULES FILE|DIR [--at TIME]' shows which rules match and why, "
            "'python -m router replay --rules RULES --from T1 [--to T2]' what a rule "
            "change would have changed over past instances."
        ),
        sections=RouterConfig.SECTIONS,
        load=RouterConfig.from_env,
        build=RouterService,
        argv=args,
        files=lambda config: load_file(config.router.rules_file),
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
    what_if = commands.add_parser(
        "replay",
        help="what a new rule file would have decided for a past window, against what "
        "was requested (reads the topics; sends nothing)",
        description="Reads the normalized events of the window and the router's forward "
        "requests, holds and waiting studies, with no consumer group; evaluates the new "
        "rules on each instance at the time the router decided; prints, per destination "
        "and rule, what was requested and what would be, and every instance whose "
        "destinations change. Uses the RADFLOW_KAFKA_*, RADFLOW_S3_* and "
        "RADFLOW_ROUTER_HEADER_LIMIT_BYTES settings.",
    )
    what_if.add_argument("--rules", type=Path, required=True, help="the new rule file")
    what_if.add_argument(
        "--from",
        dest="since",
        type=when,
        required=True,
        help="start of the window (normalized events appended from then), e.g. "
        "2026-11-23T18:00+01:00",
    )
    what_if.add_argument(
        "--to", dest="until", type=when, default=None, help="end of the window (default now)"
    )
    output_arguments(what_if, "one JSON document, for scripts", idle_s=2.0)
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
    if args.command == "replay":
        return _replay(args, rules)
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


def _replay(args: argparse.Namespace, rules: RuleSet) -> int:
    until = args.until or datetime.now(UTC)
    if until <= args.since:
        print("--to must be after --from", file=sys.stderr)
        return 2
    try:
        kafka = KafkaSettings.from_env(os.environ)
        s3 = S3Settings.from_env(os.environ)
        header_limit = RouterSettings.from_env(os.environ).header_limit_bytes
    except PipelineError as exc:
        print(exc, file=sys.stderr)
        return 2
    blobs = BlobStore(s3)
    try:
        report, history = asyncio.run(
            replay.what_if(
                rules,
                kafka,
                blobs,
                since=args.since,
                until=until,
                header_limit=header_limit,
                idle_s=args.idle_s,
            )
        )
    except (PipelineError, KafkaError, OSError) as exc:
        print(f"cannot read the history: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        blobs.close()
    if args.json:
        print(replay.as_json(report, rules, args.since, until))
    else:
        heading = (
            f"{args.rules} (rules {rules.digest}) over instances normalized "
            f"{args.since.isoformat()} .. {until.isoformat()}"
        )
        print(render(report, heading))
    if history.unreadable:
        print(f"warning: {history.unreadable} record(s) not readable as events", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
