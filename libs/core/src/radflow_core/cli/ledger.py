"""``radflow ledger``: what the reconciliation ledger knows, asked of its HTTP endpoint.

``radflow ledger study UID`` shows, per destination, the routed / delivered / verified /
failed / pending counts of a study and the instances behind them; ``radflow ledger
overdue [--destination NAME]`` lists the instances routed longer ago than the ledger's
threshold that have not reached their destination. The ledger service holds the state
(in the broker); this command only reads it, so it needs the service's URL:
``--url``, else ``RADFLOW_LEDGER_URL``, else ``make run``'s ``http://127.0.0.1:8087``.

Exit status: 0 answered, 1 the study is not in the ledger (or ``overdue`` found some:
a script can alert on it), 2 the ledger could not be asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8087"
"""The ledger's ops port in ``make run``."""
URL_VARIABLE = "RADFLOW_LEDGER_URL"


class LedgerUnreachable(Exception):
    """The ledger did not answer, or answered something that is not its JSON."""


def register(subparsers: Any) -> None:
    command = subparsers.add_parser(
        "ledger",
        help="per study and destination: routed, delivered, verified, failed, pending",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=None,
        help=f"the ledger service (default: ${URL_VARIABLE}, else {DEFAULT_URL})",
    )
    common.add_argument("--json", action="store_true", help="print the ledger's JSON answer")
    commands = command.add_subparsers(dest="ledger_command", required=True, metavar="WHAT")
    study = commands.add_parser(
        "study", parents=[common], help="one study, per destination and instance"
    )
    study.add_argument("uid", help="Study Instance UID")
    study.set_defaults(handler=_study)
    overdue = commands.add_parser(
        "overdue", parents=[common], help="instances that have not arrived in time"
    )
    overdue.add_argument("--destination", default=None, help="only this destination")
    overdue.set_defaults(handler=_overdue)


def _base(args: argparse.Namespace) -> str:
    return str(args.url or os.environ.get(URL_VARIABLE) or DEFAULT_URL).rstrip("/")


def _get(url: str) -> tuple[int, Any]:
    """GET ``url``; (HTTP status, decoded JSON)."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - http(s) URL from the operator
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            raise LedgerUnreachable(f"{url}: HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LedgerUnreachable(f"{url}: {exc}") from exc


def _ask(args: argparse.Namespace, path: str) -> tuple[int, Any] | None:
    url = _base(args) + path
    try:
        return _get(url)
    except LedgerUnreachable as exc:
        print(f"radflow ledger: cannot ask the ledger: {exc}", file=sys.stderr)
        return None


def _study(args: argparse.Namespace) -> int:
    answer = _ask(args, "/ledger/studies/" + urllib.parse.quote(args.uid, safe=""))
    if answer is None:
        return 2
    status, body = answer
    if args.json:
        print(json.dumps(body, indent=2))
        return 0 if status == 200 else 1
    if status == 404:
        print(f"study {args.uid} is not in the ledger", file=sys.stderr)
        return 1
    if status != 200:
        print(f"radflow ledger: HTTP {status}: {body}", file=sys.stderr)
        return 2
    print(f"study {body['study_instance_uid']}: {body['instances']} instances")
    delivered = body.get("delivered")
    if delivered:
        print(
            f"dicom.study.delivered: revision {delivered['revision']} "
            f"at {delivered['published_at']}"
        )
    columns = ("routed", "delivered", "verified", "failed", "pending", "overdue")
    print(f"{'destination':<24}" + "".join(f"{c:>10}" for c in columns) + "  verification")
    for row in body["destinations"]:
        print(
            f"{row['destination']:<24}"
            + "".join(f"{row[c]:>10}" for c in columns)
            + ("  on" if row["verification"] else "  off")
        )
    for row in body["destinations"]:
        print(f"\n{row['destination']}:")
        for instance in row["instances"]:
            print("  " + _instance_line(instance))
    return 0


def _overdue(args: argparse.Namespace) -> int:
    query = (
        ""
        if args.destination is None
        else "?" + urllib.parse.urlencode({"destination": args.destination})
    )
    answer = _ask(args, "/ledger/overdue" + query)
    if answer is None:
        return 2
    status, body = answer
    if status != 200:
        print(f"radflow ledger: HTTP {status}: {body}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(body, indent=2))
    else:
        late = body["instances"]
        print(
            f"{len(late)} instances overdue (routed more than {body['overdue_after_s']:g} s ago, "
            "not arrived, not failed)"
        )
        for destination, count in body["destinations"].items():
            print(f"  {destination}: {count}")
        for instance in late:
            print(f"  study {instance['study_instance_uid']} " + _instance_line(instance))
    return 1 if body["instances"] else 0


def _instance_line(instance: dict[str, Any]) -> str:
    line = (
        f"{instance['sop_instance_uid']}  {instance['destination']}  {instance['status']}"
        f"  routed {instance['routed_at'] or '?'}"
    )
    if instance["age_s"] is not None and not instance["reached"]:
        line += f" ({instance['age_s']} s ago)"
    if instance["failure"] and instance["status"] == "failed":
        line += f"  failure: {instance['failure']}"
    if instance["overdue"]:
        line += "  OVERDUE"
    return line
